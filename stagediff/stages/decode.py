"""Stage 3: latents -> PNG images, with only the VAE (and SD 1.5's safety checker, if any) loaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stagediff.family import family_for, model_index
from stagediff.jobs import DecodeItem, DecodeJob, ItemRef, StageContext, StageResult
from stagediff.stages.devices import accelerator_count
from stagediff.stages.loading import load_pipeline
from stagediff.stages.work import Loaded, batches, done, load_tensors, log, metadata


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


def png_text(ctx: StageContext, item: DecodeItem) -> dict[str, str]:
    """The PNG's text chunks: what made it, as A1111 writes it (`parameters`, which many tools read) and as
    JSON (`stagediff`: the whole item request and a `stagediff generate` command that makes it again);
    without metadata only the store key (every object carries it)."""
    p = item.parameters
    if p is None:
        return {}
    s = p["settings"]
    lines = [p["prompt"]]
    if p["negative_prompt"]:
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    lines.append(
        f"Steps: {s['steps']}, Sampler: {p['scheduler']}, CFG scale: {s['guidance']}, Seed: {p['seed']}, "
        f"Size: {s['width']}x{s['height']}, Model: {Path(p['model']).name}, Model hash: {p['model_hash']}"
    )
    return {"parameters": "\n".join(lines), "stagediff": json.dumps(p, sort_keys=True), **metadata(ctx, "decode")}


@torch.no_grad()  # as the pipelines; inference_mode would change float16 CPU kernels
def decode(job: DecodeJob) -> StageResult:
    """Decode the latents whose images the store lacks, in batches of one size; store PNGs under their keys."""
    ctx, family, store = job.ctx, family_for(job.ctx.model), job.ctx.open_store()
    result = StageResult()
    models = Loaded(lambda: load_decoder(ctx, job.tiled, job.sliced), result, "decode")
    for batch in batches(store, "images", job.items, lambda item: (item.height, item.width), ctx.batch_size):
        pipe = models.get()
        vae = pipe.vae
        if result.device_map is None:
            result.device_map = {"": str(vae.device)}
            log.debug("vae loaded on %s (tiled: %s, sliced: %s)", vae.device, job.tiled, job.sliced)
        latents = torch.stack([load_tensors(store, item.latents)["latents"] for item in batch])
        latents = family.latents_for_vae(latents.to(vae.device, vae.dtype), vae.config, batch[0].height, batch[0].width)
        images = family.postprocess(pipe, vae.decode(latents, return_dict=False)[0])
        for item, image in zip(batch, images, strict=True):
            record = store.save_png("images", item.key, image, png_text(ctx, item))
            done(result, ItemRef(item.index, "images", record.key, record.sha256))
            log.debug("wrote image %d", item.index)
    return models.finish()
