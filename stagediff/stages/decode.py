"""Stage 3: latents -> PNG images, with only the VAE loaded."""

from __future__ import annotations

import torch

from artifacts import save_png
from stagediff.family import family_for
from stagediff.stages.common import (
    ItemRef,
    StageContext,
    accelerator_count,
    batches,
    item_path,
    load_item,
    log,
    run_path,
    torch_dtype,
)


def load_vae(ctx: StageContext):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ctx.model, subfolder="vae", dtype=torch_dtype(ctx.dtype), use_safetensors=True)
    return vae.to("cuda" if accelerator_count() else "cpu")


@torch.inference_mode()
def decode(ctx: StageContext, items: list[ItemRef], height: int, width: int) -> dict:
    """Decode latents refs in batches; write `images/{index:05d}.png`."""
    from diffusers.image_processor import VaeImageProcessor

    family = family_for(ctx.model)
    vae = load_vae(ctx)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
    log.info("vae loaded on %s", vae.device)
    refs: list[ItemRef] = []
    for chunk in batches(items, ctx.batch_size):
        latents = torch.stack([load_item(ctx, ref)["latents"] for ref in chunk])
        latents = family.latents_for_vae(latents, vae.config, height, width).to(vae.device, vae.dtype)
        images = processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")
        for ref, image in zip(chunk, images, strict=True):
            relative = item_path(ctx, "images", ref.index, ".png")
            refs.append(ItemRef(ref.index, relative, save_png(run_path(ctx, relative), image, {"model": ctx.model})))
            log.info("wrote %s", relative)
    return {"items": refs, "device_map": {"": str(vae.device)}}
