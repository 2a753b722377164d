"""Stage 3: latents -> PNG images, with only the VAE (and SD 1.5's safety checker, if any) loaded."""

from __future__ import annotations

import torch

from stagediff.family import family_for, model_index
from stagediff.stages.common import (
    ItemRef,
    StageContext,
    accelerator_count,
    load_item,
    load_pipeline,
    log,
    metadata,
    open_store,
)


def decode_device(ctx: StageContext) -> str:
    """One device for the VAE: the first accelerator `max_memory` names (or cuda:0), else the CPU."""
    if not accelerator_count():
        return "cpu"
    if not ctx.max_memory:
        return "cuda:0"
    gpus = [d.removeprefix("cuda:") for d in ctx.max_memory if d.removeprefix("cuda:").isdigit()]
    return f"cuda:{gpus[0]}" if gpus else "cpu"


def load_decoder(ctx: StageContext, tiled: bool = False, sliced: bool = False):
    """The pipeline with only its VAE (and what `decode_components` adds, when on disk), on one device."""
    family, index = family_for(ctx.model), model_index(ctx.model)
    present = tuple(name for name in family.decode_components if (index.get(name) or [None])[0])  # not null
    pipe = load_pipeline(ctx, present).to(decode_device(ctx))
    if family.upcast_vae and pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # as the pipeline does: this VAE overflows in float16
    if tiled:
        pipe.vae.enable_tiling()  # tiles of the VAE's sample_size: bounded memory for large images
    if sliced:
        pipe.vae.enable_slicing()  # one image of the batch at a time
    return pipe


@torch.no_grad()  # as the pipelines; inference_mode would change float16 CPU kernels
def decode(
    ctx: StageContext,
    items: list[ItemRef],
    height: int,
    width: int,
    keys: dict[int, str],
    tiled: bool = False,
    sliced: bool = False,
) -> dict:
    """Decode the latents refs whose images the store lacks, in batches; store PNGs under `keys[index]`."""
    family = family_for(ctx.model)
    store = open_store(ctx)
    pipe = vae = None
    refs: list[ItemRef] = []
    for chunk in store.claimed_batches("images", items, lambda r: keys[r.index], ctx.batch_size, ctx.pause_after_batch):
        if pipe is None:  # loaded only if this process has something to compute
            pipe = load_decoder(ctx, tiled, sliced)
            vae = pipe.vae
            log.info("vae loaded on %s (tiled: %s, sliced: %s)", vae.device, tiled, sliced)
        latents = torch.stack([load_item(ctx, ref)["latents"] for ref in chunk]).to(vae.device, vae.dtype)
        latents = family.latents_for_vae(latents, vae.config, height, width)
        images = family.postprocess(pipe, vae.decode(latents, return_dict=False)[0])
        for ref, image in zip(chunk, images, strict=True):
            record = store.save_png("images", keys[ref.index], image, metadata(ctx, "decode", index=ref.index))
            refs.append(ItemRef(ref.index, "images", record.key, record.sha256))
            log.info("wrote image %d", ref.index)
    return {"items": refs, "device_map": None if vae is None else {"": str(vae.device)}}
