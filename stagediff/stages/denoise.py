"""Stage 2: embeddings + seeded noise -> latents, with the denoiser sharded by accelerate."""

from __future__ import annotations

from pathlib import Path

import torch

from artifacts import save_tensors
from stagediff.family import family_for, vae_scale_factor
from stagediff.stages.common import (
    ItemRef,
    StageContext,
    accelerate_max_memory,
    accelerator_count,
    batches,
    device_map_of,
    item_path,
    load_item,
    log,
    metadata,
    run_path,
    torch_dtype,
)


def load_denoiser(ctx: StageContext):
    """A pipeline holding only the scheduler and the denoiser (no text encoders, no VAE).

    With accelerators or an explicit `max_memory`, the denoiser is placed by accelerate
    (`device_map="auto"`): over the accelerators first, then CPU, then the offload folder on disk.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = family_for(ctx.model)
    kwargs: dict = {}
    if accelerator_count() or ctx.max_memory:
        offload_dir = ctx.offload_dir or str(Path(ctx.run_dir) / "offload")
        kwargs.update(device_map="auto", max_memory=accelerate_max_memory(ctx.max_memory), offload_folder=offload_dir)
    denoiser = family.denoiser_cls().from_pretrained(
        ctx.model, subfolder=family.denoiser, dtype=torch_dtype(ctx.dtype), use_safetensors=True, **kwargs
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(ctx.model, subfolder="scheduler")
    pipe = family.pipeline_cls()(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        **{family.denoiser: denoiser},
    )
    # Without a VAE, diffusers assumes a scale factor of 8; take the real one from the VAE's config.
    pipe.vae_scale_factor = vae_scale_factor(ctx.model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device_map_of(denoiser)


@torch.inference_mode()
def denoise(
    ctx: StageContext,
    items: list[tuple[ItemRef, int]],
    steps: int,
    guidance: float,
    height: int,
    width: int,
    max_sequence_length: int,
) -> dict:
    """Denoise `(embeddings ref, seed)` pairs in batches; write `latents/{index:05d}.safetensors`."""
    family = family_for(ctx.model)
    pipe, device_map = load_denoiser(ctx)
    log.info("%s loaded (device map: %s)", family.denoiser, device_map or "cpu")
    refs: list[ItemRef] = []
    chunks = batches(items, ctx.batch_size)
    for n, chunk in enumerate(chunks, 1):
        loaded = [load_item(ctx, ref) for ref, _ in chunk]
        embeddings = {name: torch.stack([t[name] for t in loaded]) for name in loaded[0]}
        # One generator per item: prompt i's noise never depends on its batch.
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]

        def on_step(pipe, step, timestep, callback_kwargs, n=n):
            log.info("batch %d/%d: step %d/%d", n, len(chunks), step + 1, steps)
            return callback_kwargs

        latents = pipe(
            **family.denoise_kwargs(embeddings, guidance, max_sequence_length),
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=generators,
            output_type="latent",
            callback_on_step_end=on_step,
        ).images
        for row, (ref, seed) in enumerate(chunk):
            relative = item_path(ctx, "latents", ref.index, ".safetensors")
            meta = metadata(
                ctx, "denoise", index=ref.index, seed=seed, steps=steps, guidance=guidance, height=height, width=width
            )
            sha256 = save_tensors(run_path(ctx, relative), {"latents": latents[row]}, meta)
            refs.append(ItemRef(ref.index, relative, sha256))
    return {"items": refs, "device_map": device_map}
