"""The correctness reference: the plain, one-process diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def reference_images(
    model: str | Path,
    prompts: list[str],
    seed: int,
    negative_prompts: list[str] | None = None,
    dtype: str | None = None,
    tiled_decode: bool = False,
    variant: str | None = None,
    compile: bool = False,
    cache: object | None = None,
    quantization_config: object | None = None,
    **call_kwargs,
) -> list[np.ndarray]:
    """`DiffusionPipeline.from_pretrained(model)(prompt, generator=Generator("cpu").manual_seed(seed + i), ...)`,
    with `negative_prompt=negative_prompts[i]` when given; `compile`: the denoiser's repeated blocks compiled as
    diffusers' docs show (`compile_repeated_blocks(fullgraph=True)`); `cache`: a diffusers cache config enabled on
    the denoiser (`pipe.transformer.enable_cache(cache)`); `quantization_config`: to `from_pretrained`."""
    import torch
    from diffusers import DiffusionPipeline

    options = {"dtype": getattr(torch, dtype)} if dtype else {}
    if quantization_config is not None:
        options["quantization_config"] = quantization_config
    pipe = DiffusionPipeline.from_pretrained(str(model), **options, **({"variant": variant} if variant else {}))
    pipe.set_progress_bar_config(disable=True)
    if tiled_decode:
        pipe.vae.enable_tiling()
    if cache is not None:
        pipe.transformer.enable_cache(cache)
    if compile:
        (pipe.transformer if hasattr(pipe, "transformer") else pipe.unet).compile_repeated_blocks(fullgraph=True)
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        negative = {"negative_prompt": negative_prompts[i]} if negative_prompts is not None else {}
        images.append(np.asarray(pipe(prompt, generator=generator, **negative, **call_kwargs).images[0]))
    return images


def read_image(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def run_generate(flow_run_name: str | None = None, **fields):
    """The `generate` flow called with flat keyword arguments (`steps=2, out=..., strict=True`), each put into
    its parameter model (prompts, settings, placement, output, options), as the CLI does."""
    from stagediff.flows.generate import generate
    from stagediff.request import ImageSettings, Output, Placement, Prompts, RunOptions

    groups = {}
    for model in (Prompts, ImageSettings, Placement, Output, RunOptions):
        groups[model] = model(**{name: fields.pop(name) for name in list(fields) if name in model.model_fields})
    flow = generate.with_options(flow_run_name=flow_run_name) if flow_run_name else generate
    return flow(
        groups[Prompts], groups[ImageSettings], fields.pop("model", None), groups[Placement], groups[Output],
        groups[RunOptions], **fields,
    )  # fmt: skip
