"""Stage 1: prompts (and negative prompts) -> text embeddings, persisted as one safetensors file per item."""

from __future__ import annotations

import torch

from stagediff.family import family_for
from stagediff.jobs import EncodeJob, ItemRef, StageContext, StageResult
from stagediff.stages.devices import accelerate_max_memory, accelerator_count
from stagediff.stages.loading import load_pipeline, quantized_text_encoders
from stagediff.stages.work import Loaded, batches, done, log, metadata

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
    pipe = load_pipeline(ctx, family.text_components, **kwargs, **quantized_text_encoders(ctx))
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
def encode(job: EncodeJob) -> StageResult:
    """Encode the items the store lacks, in batches of one sequence length; store each under its key.

    The family decides which tensors an item gets (with or without negative embeddings).
    """
    ctx, family, store = job.ctx, family_for(job.ctx.model), job.ctx.open_store()
    result = StageResult()
    models = Loaded(lambda: load_text_encoders(ctx), result, "encode")
    group_of = lambda item: (item.max_sequence_length, item.negative_prompt is not None)  # noqa: E731
    for batch in batches(store, "embeddings", job.items, group_of, ctx.batch_size):
        pipe, placement = models.get()
        if result.device_map is None:
            result.device_map = placement
            log.debug("text encoders loaded (placement: %s)", placement)
            if accelerator_count():
                for name in (name for name, device in placement.items() if device == "cpu"):
                    log.warning(CPU_FALLBACK, name)
                    result.warnings.append(CPU_FALLBACK % name)
        negatives = [item.negative_prompt for item in batch] if batch[0].negative_prompt is not None else None
        embeddings = family.encode(pipe, [item.prompt for item in batch], negatives, batch[0].max_sequence_length)
        for row, item in enumerate(batch):
            tensors = {name: tensor[row] for name, tensor in embeddings.items()}
            meta = metadata(
                ctx, "encode", index=item.index, prompt=item.prompt, max_sequence_length=item.max_sequence_length
            )
            if item.negative_prompt is not None:
                meta["negative_prompt"] = item.negative_prompt
            record = store.save_tensors("embeddings", item.key, tensors, meta)
            done(result, ItemRef(item.index, "embeddings", record.key, record.sha256))
        log.debug("encoded %d prompts (%d so far)", len(batch), len(result.items))
    return models.finish()
