"""Stage 2: embeddings + seeded noise -> latents, with the denoiser sharded by accelerate."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from stagediff.artifacts import Store
from stagediff.family import family_for, vae_scale_factor
from stagediff.jobs import DenoiseItem, DenoiseJob, ItemRef, StageContext, StageResult
from stagediff.stages.compiled import CompileCache, compile_blocks, compile_mode, shape_of
from stagediff.stages.devices import accelerate_max_memory, accelerator_count, device_map_of, torch_dtype
from stagediff.stages.loading import empty_denoiser, load_denoiser_model, load_pipeline
from stagediff.stages.work import Loaded, batches, done, load_tensors, log, metadata

STEP_LOG_LINES = 4  # log a batch's progress this many times over its steps, not at every step


def auto_device_map(ctx: StageContext) -> dict[str, int | str]:
    """What `device_map="auto"` computes: the model's blocks over the accelerators, then CPU, then disk.

    Computed here because accelerate, splitting a module that does not fit, keeps its parameters but
    drops its own buffers (SD3's `pos_embed.pos_embed`), and loading then fails; such modules stay whole.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_max_memory

    empty = empty_denoiser(ctx.model)
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
    (`device_map="auto"`): over the accelerators first, then CPU, then the offload folder on disk. With
    `group_offload`, it stays in CPU memory and diffusers' group offloading moves each group (a block, or each
    leaf module) to the GPU as it runs, with CUDA streams overlapping the next group's transfer if asked.
    """
    family = family_for(ctx.model)
    kwargs: dict = {}
    if (accelerator_count() or ctx.max_memory) and not ctx.group_offload:
        offload_dir = ctx.offload_dir or str(Path(ctx.work_dir) / "offload")
        kwargs.update(device_map=auto_device_map(ctx), offload_folder=offload_dir)
    denoiser = load_denoiser_model(ctx, **kwargs)
    if ctx.group_offload:
        block = ctx.group_offload == "block"
        denoiser.enable_group_offload(
            onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
            offload_type="block_level" if block else "leaf_level", num_blocks_per_group=1 if block else None,
            use_stream=ctx.offload_stream,
        )  # fmt: skip
    pipe = load_pipeline(ctx, (), **{family.denoiser: denoiser})
    # Without a VAE, diffusers assumes a scale factor of 8; take the real one from the VAE's config.
    pipe.vae_scale_factor = vae_scale_factor(ctx.model)
    if ctx.group_offload:
        return pipe, {"": f"cpu, {ctx.group_offload}s onloaded to cuda as they run"}
    return pipe, device_map_of(denoiser) or {"": str(denoiser.device)}


@torch.no_grad()  # as the pipelines; inference_mode would change float16 CPU kernels
def denoise(job: DenoiseJob) -> StageResult:
    """Denoise the items whose latents the store lacks, in batches of one setting; store each under its key."""
    if job.ctx.pipeline_stages > 1:
        from stagediff.stages.parts import denoise_in_parts

        return denoise_in_parts(job)
    ctx, family, store = job.ctx, family_for(job.ctx.model), job.ctx.open_store()
    result = StageResult()
    compiled: list[CompileCache] = []  # --compile: the compiled code's cache, once the denoiser is loaded

    def load():
        pipe, device_map = load_denoiser(ctx)
        if ctx.compile:
            denoiser = getattr(pipe, family.denoiser)
            mode = compile_mode(ctx, denoiser)
            compiled.append(CompileCache(ctx, store, mode))
            compile_blocks(denoiser, mode)
        return pipe, device_map

    models = Loaded(load, result, "denoise")
    shapes: set[tuple] = set()
    cached_steps: int | None = None  # the steps the block cache is configured for
    # first-block's skip decision is taken over the whole batch: each item alone, so its image never depends on it
    size = 1 if ctx.cache and ctx.cache.startswith("first-block") else ctx.batch_size
    for n, batch in enumerate(batches(store, "latents", job.items, lambda item: item.settings, size), 1):
        pipe, device_map = models.get()
        if result.device_map is None:
            result.device_map = device_map
            log.debug("%s loaded (device map: %s)", family.denoiser, device_map)
        steps = batch[0].settings.steps
        if ctx.cache and cached_steps != steps:
            cached_steps = enable_cache(getattr(pipe, family.denoiser), ctx.cache, steps, cached_steps)
        start, shape = time.perf_counter(), shape_of(batch, batch[0].settings)
        latents = denoise_batch(pipe, job, store, batch, n)
        if compiled and shape not in shapes:  # compiled (or its code loaded) as it ran: counted as loading
            shapes.add(shape)
            compiled[0].timed(time.perf_counter() - start, first=True)
            result.load_seconds += time.perf_counter() - start
        elif compiled and len(batch) == ctx.batch_size:
            compiled[0].timed(time.perf_counter() - start, first=False)
        store_latents(job, store, result, batch, latents)
    if compiled:
        result.compiled = compiled[0].finish()
        log.info("denoise: blocks compiled, code %s (key %s…); first batch of each shape: %s s; compiling: %s s",
                 result.compiled["from"], compiled[0].key[:12], result.compiled["first_batch_seconds"],
                 result.compiled.get("compile_seconds", "?"))  # fmt: skip
    return models.finish()


def enable_cache(denoiser, spec: str, steps: int, enabled_for: int | None) -> int:
    """diffusers' cache config `spec` ("first-block:0.05", "taylorseer", "magcache") on the denoiser, for `steps`
    (MagCache interpolates its per-step ratios, FLUX.1-dev's, to the steps); returns `steps`."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    name, _, threshold = spec.partition(":")
    if name == "first-block":
        config = FirstBlockCacheConfig(threshold=float(threshold))
    elif name == "taylorseer":
        config = TaylorSeerCacheConfig()
    else:
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        config = MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps)
    if enabled_for is not None:
        denoiser.disable_cache()
    denoiser.enable_cache(config)
    return steps


@torch.no_grad()
def denoise_batch(pipe, job: DenoiseJob, store: Store, batch: list[DenoiseItem], n: int) -> torch.Tensor:
    """One batch (one setting) through the family's own diffusers loop: the latents, one row per item."""
    family, settings = family_for(job.ctx.model), batch[0].settings
    loaded = [load_tensors(store, item.embeddings) for item in batch]
    embeddings = {name: torch.stack([t[name] for t in loaded]) for name in loaded[0]}
    # One generator per item: an item's noise never depends on its batch.
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
    every = max(1, settings.steps // STEP_LOG_LINES)

    def on_step(pipe, step, timestep, callback_kwargs):
        if (step + 1) % every == 0 or step + 1 == settings.steps:
            log.debug("batch %d: step %d/%d", n, step + 1, settings.steps)
        return callback_kwargs

    return pipe(
        **family.denoise_kwargs(embeddings, settings),
        num_inference_steps=settings.steps,
        height=settings.height,
        width=settings.width,
        generator=generators,
        output_type="latent",
        callback_on_step_end=on_step,
    ).images


def store_latents(
    job: DenoiseJob, store: Store, result: StageResult, batch: list[DenoiseItem], latents: torch.Tensor
) -> None:
    for row, item in enumerate(batch):
        meta = metadata(job.ctx, "denoise", index=item.index, seed=item.seed, **asdict(item.settings))
        record = store.save_tensors("latents", item.key, {"latents": latents[row]}, meta)
        done(result, ItemRef(item.index, "latents", record.key, record.sha256))
