"""Stage 1: prompts -> text embeddings, persisted as one safetensors file per item."""

from __future__ import annotations

import torch

from stagediff.family import family_for
from stagediff.stages.common import (
    ItemRef,
    StageContext,
    accelerate_max_memory,
    accelerator_count,
    device_map_of,
    log,
    metadata,
    open_store,
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
def encode(ctx: StageContext, prompts: list[tuple[int, str]], max_sequence_length: int, keys: dict[int, str]) -> dict:
    """Encode the `(index, prompt)` pairs the store lacks, in batches; store them under `keys[index]`."""
    family = family_for(ctx.model)
    store = open_store(ctx)
    pipe = device_map = None
    refs: list[ItemRef] = []
    work = store.claimed_batches("embeddings", prompts, lambda p: keys[p[0]], ctx.batch_size, ctx.pause_after_batch)
    for chunk in work:
        if pipe is None:  # loaded only if this process has something to compute
            pipe = load_text_encoders(ctx)
            device_map = device_map_of(pipe)
            log.info("text encoders loaded (device map: %s)", device_map or "cpu")
        embeddings = family.encode(pipe, [prompt for _, prompt in chunk], max_sequence_length)
        for row, (index, prompt) in enumerate(chunk):
            tensors = {name: tensor[row] for name, tensor in embeddings.items()}
            meta = metadata(ctx, "encode", index=index, prompt=prompt, max_sequence_length=max_sequence_length)
            record = store.save_tensors("embeddings", keys[index], tensors, meta)
            refs.append(ItemRef(index, "embeddings", record.key, record.sha256))
        log.info("encoded %d prompts (%d so far)", len(chunk), len(refs))
    return {"items": refs, "device_map": device_map}
