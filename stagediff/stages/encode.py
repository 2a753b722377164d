"""Stage 1: prompts (and negative prompts) -> text embeddings, persisted as one safetensors file per item."""

from __future__ import annotations

import torch

from stagediff.family import family_for
from stagediff.stages.common import (
    ItemRef,
    StageContext,
    accelerate_max_memory,
    accelerator_count,
    load_pipeline,
    log,
    metadata,
    open_store,
)

# diffusers' balanced placement puts a component that fits on no accelerator on the CPU without a word.
CPU_FALLBACK = (
    "%s fits in no accelerator's max_memory and runs on the CPU (diffusers' balanced placement, "
    "diffusers issue #9195): encoding will be slow; raise max_memory or free an accelerator"
)


def load_text_encoders(ctx: StageContext):
    """The pipeline with only its tokenizers and text encoders, and where each encoder ended up.

    With accelerators, diffusers places whole components over them (`device_map="balanced"`, capped by
    `max_memory`); without, everything is on the CPU.
    """
    family = family_for(ctx.model)
    kwargs = {}
    if accelerator_count():
        kwargs.update(device_map="balanced", max_memory=accelerate_max_memory(ctx.max_memory))
    pipe = load_pipeline(ctx, family.text_components, **kwargs)
    placement = {
        name: str(module.device)
        for name in family.text_components
        if isinstance(module := getattr(pipe, name), torch.nn.Module)
    }
    if len(set(placement.values())) > 1:
        # Some pipelines (SD3, SD 1.5) send every encoder's input ids to one device; move them to each encoder's.
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        for name, device in placement.items():
            add_hook_to_module(getattr(pipe, name), AlignDevicesHook(execution_device=device, io_same_device=True))
    return pipe, placement


@torch.no_grad()  # as the pipelines; inference_mode would change float16 CPU kernels
def encode(
    ctx: StageContext,
    prompts: list[tuple[int, str]],
    max_sequence_length: int,
    keys: dict[int, str],
    negative_prompts: list[str] | None = None,
) -> dict:
    """Encode the `(index, prompt)` pairs the store lacks, in batches; store them under `keys[index]`.

    `negative_prompts[i]` belongs to `prompts[i]`; the family decides which tensors an item gets.
    """
    family = family_for(ctx.model)
    store = open_store(ctx)
    pipe = placement = None
    warnings = []
    negatives = dict(zip((index for index, _ in prompts), negative_prompts, strict=True)) if negative_prompts else None
    refs: list[ItemRef] = []
    work = store.claimed_batches("embeddings", prompts, lambda p: keys[p[0]], ctx.batch_size, ctx.pause_after_batch)
    for chunk in work:
        if pipe is None:  # loaded only if this process has something to compute
            pipe, placement = load_text_encoders(ctx)
            log.info("text encoders loaded (placement: %s)", placement)
            if accelerator_count():
                for name in (name for name, device in placement.items() if device == "cpu"):
                    log.warning(CPU_FALLBACK, name)
                    warnings.append(CPU_FALLBACK % name)
        chunk_negatives = [negatives[index] for index, _ in chunk] if negatives else None
        embeddings = family.encode(pipe, [prompt for _, prompt in chunk], chunk_negatives, max_sequence_length)
        for row, (index, prompt) in enumerate(chunk):
            tensors = {name: tensor[row] for name, tensor in embeddings.items()}
            meta = metadata(ctx, "encode", index=index, prompt=prompt, max_sequence_length=max_sequence_length)
            if negatives:
                meta["negative_prompt"] = negatives[index]
            record = store.save_tensors("embeddings", keys[index], tensors, meta)
            refs.append(ItemRef(index, "embeddings", record.key, record.sha256))
        log.info("encoded %d prompts (%d so far)", len(chunk), len(refs))
    return {"items": refs, "device_map": placement, "warnings": warnings}
