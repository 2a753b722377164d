"""Stage 1: prompts -> text embeddings, persisted as one safetensors file per item."""

from __future__ import annotations

import torch

from artifacts import save_tensors
from stagediff.family import family_for
from stagediff.stages.common import (
    ItemRef,
    StageContext,
    accelerate_max_memory,
    accelerator_count,
    batches,
    device_map_of,
    item_path,
    log,
    metadata,
    run_path,
    torch_dtype,
)


def load_text_encoders(ctx: StageContext):
    """The pipeline with only its tokenizers and text encoders; `balanced` over accelerators if any."""
    family = family_for(ctx.model)
    kwargs = {family.denoiser: None, "vae": None}
    if accelerator_count():
        kwargs.update(device_map="balanced", max_memory=accelerate_max_memory(ctx.max_memory))
    pipe = family.pipeline_cls().from_pretrained(
        ctx.model, dtype=torch_dtype(ctx.dtype), use_safetensors=True, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.inference_mode()
def encode(ctx: StageContext, prompts: list[tuple[int, str]], max_sequence_length: int) -> dict:
    """Encode `(index, prompt)` pairs in batches of `ctx.batch_size`; write `embeddings/{index:05d}.safetensors`."""
    family = family_for(ctx.model)
    pipe = load_text_encoders(ctx)
    device_map = device_map_of(pipe)
    log.info("text encoders loaded (device map: %s)", device_map or "cpu")
    refs: list[ItemRef] = []
    chunks = batches(prompts, ctx.batch_size)
    for n, chunk in enumerate(chunks, 1):
        embeddings = family.encode(pipe, [prompt for _, prompt in chunk], max_sequence_length)
        for row, (index, prompt) in enumerate(chunk):
            relative = item_path(ctx, "embeddings", index, ".safetensors")
            tensors = {name: tensor[row] for name, tensor in embeddings.items()}
            meta = metadata(ctx, "encode", index=index, prompt=prompt, max_sequence_length=max_sequence_length)
            refs.append(ItemRef(index, relative, save_tensors(run_path(ctx, relative), tensors, meta)))
        log.info("encoded batch %d/%d (%d prompts)", n, len(chunks), len(chunk))
    return {"items": refs, "device_map": device_map}
