"""Stage 3: latents -> PNG images, with only the VAE loaded."""

from __future__ import annotations

import torch

from stagediff.family import family_for
from stagediff.stages.common import (
    ItemRef,
    StageContext,
    accelerator_count,
    load_item,
    log,
    metadata,
    open_store,
    torch_dtype,
)


def load_vae(ctx: StageContext):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ctx.model, subfolder="vae", dtype=torch_dtype(ctx.dtype), use_safetensors=True)
    return vae.to("cuda" if accelerator_count() else "cpu")


@torch.inference_mode()
def decode(ctx: StageContext, items: list[ItemRef], height: int, width: int, keys: dict[int, str]) -> dict:
    """Decode the latents refs whose images the store lacks, in batches; store PNGs under `keys[index]`."""
    from diffusers.image_processor import VaeImageProcessor

    family = family_for(ctx.model)
    store = open_store(ctx)
    vae = processor = None
    refs: list[ItemRef] = []
    work = store.claimed_batches("images", items, lambda ref: keys[ref.index], ctx.batch_size, ctx.pause_after_batch)
    for chunk in work:
        if vae is None:  # loaded only if this process has something to compute
            vae = load_vae(ctx)
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
            log.info("vae loaded on %s", vae.device)
        latents = torch.stack([load_item(ctx, ref)["latents"] for ref in chunk])
        latents = family.latents_for_vae(latents, vae.config, height, width).to(vae.device, vae.dtype)
        images = processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")
        for ref, image in zip(chunk, images, strict=True):
            record = store.save_png("images", keys[ref.index], image, metadata(ctx, "decode", index=ref.index))
            refs.append(ItemRef(ref.index, "images", record.key, record.sha256))
            log.info("wrote image %d", ref.index)
    return {"items": refs, "device_map": None if vae is None else {"": str(vae.device)}}
