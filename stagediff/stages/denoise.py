"""Stage 2: embeddings + seeded noise -> latents, with the denoiser sharded by accelerate."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from stagediff.family import family_for, model_index, vae_scale_factor
from stagediff.spec import DenoiseSettings
from stagediff.stages.common import (
    ItemRef,
    StageContext,
    accelerate_max_memory,
    accelerator_count,
    device_map_of,
    load_item,
    load_pipeline,
    log,
    metadata,
    open_store,
    torch_dtype,
)


def auto_device_map(cls: type, ctx: StageContext, subfolder: str) -> dict[str, int | str]:
    """What `device_map="auto"` computes: the model's blocks over the accelerators, then CPU, then disk.

    Computed here because accelerate, splitting a module that does not fit, keeps its parameters but
    drops its own buffers (SD3's `pos_embed.pos_embed`), and loading then fails; such modules stay whole.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_max_memory

    with init_empty_weights():
        empty = cls.from_config(cls.load_config(ctx.model, subfolder=subfolder))
    keep_whole = {
        type(module).__name__
        for module in empty.modules()
        if next(module.children(), None) is not None and next(module.buffers(recurse=False), None) is not None
    }
    return infer_auto_device_map(
        empty,
        max_memory=get_max_memory(accelerate_max_memory(ctx.max_memory)),
        no_split_module_classes=[*(empty._no_split_modules or []), *keep_whole],
        dtype=torch_dtype(ctx.dtype),
    )


def load_denoiser(ctx: StageContext):
    """A pipeline holding only the scheduler and the denoiser (no text encoders, no VAE).

    With accelerators or an explicit `max_memory`, the denoiser is placed by accelerate
    (`device_map="auto"`): over the accelerators first, then CPU, then the offload folder on disk.
    """
    import diffusers

    family = family_for(ctx.model)
    _, class_name = model_index(ctx.model)[family.denoiser]
    cls = getattr(diffusers, class_name)
    kwargs: dict = {}
    if accelerator_count() or ctx.max_memory:
        offload_dir = ctx.offload_dir or str(Path(ctx.run_dir) / "offload")
        kwargs.update(device_map=auto_device_map(cls, ctx, family.denoiser), offload_folder=offload_dir)
    denoiser = cls.from_pretrained(
        ctx.model, subfolder=family.denoiser, dtype=torch_dtype(ctx.dtype), use_safetensors=True, **kwargs
    )
    pipe = load_pipeline(ctx, (), **{family.denoiser: denoiser})
    # Without a VAE, diffusers assumes a scale factor of 8; take the real one from the VAE's config.
    pipe.vae_scale_factor = vae_scale_factor(ctx.model)
    return pipe, device_map_of(denoiser) or {"": str(denoiser.device)}


@torch.no_grad()  # as the pipelines; inference_mode would change float16 CPU kernels
def denoise(
    ctx: StageContext, items: list[tuple[ItemRef, int]], settings: DenoiseSettings, keys: dict[int, str]
) -> dict:
    """Denoise the `(embeddings ref, seed)` pairs the store lacks, in batches; store latents under `keys[index]`."""
    family = family_for(ctx.model)
    store = open_store(ctx)
    pipe = device_map = None
    refs: list[ItemRef] = []
    work = store.claimed_batches(
        "latents", items, lambda item: keys[item[0].index], ctx.batch_size, ctx.pause_after_batch
    )
    for n, chunk in enumerate(work, 1):
        if pipe is None:  # loaded only if this process has something to compute
            pipe, device_map = load_denoiser(ctx)
            log.info("%s loaded (device map: %s)", family.denoiser, device_map)
        loaded = [load_item(ctx, ref) for ref, _ in chunk]
        embeddings = {name: torch.stack([t[name] for t in loaded]) for name in loaded[0]}
        # One generator per item: prompt i's noise never depends on its batch.
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]

        def on_step(pipe, step, timestep, callback_kwargs, n=n):
            log.info("batch %d: step %d/%d", n, step + 1, settings.steps)
            return callback_kwargs

        latents = pipe(
            **family.denoise_kwargs(embeddings, settings),
            num_inference_steps=settings.steps,
            height=settings.height,
            width=settings.width,
            generator=generators,
            output_type="latent",
            callback_on_step_end=on_step,
        ).images
        for row, (ref, seed) in enumerate(chunk):
            meta = metadata(ctx, "denoise", index=ref.index, seed=seed, **asdict(settings))
            record = store.save_tensors("latents", keys[ref.index], {"latents": latents[row]}, meta)
            refs.append(ItemRef(ref.index, "latents", record.key, record.sha256))
    return {"items": refs, "device_map": device_map}
