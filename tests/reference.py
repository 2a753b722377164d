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
    **call_kwargs,
) -> list[np.ndarray]:
    """`DiffusionPipeline.from_pretrained(model)(prompt, generator=Generator("cpu").manual_seed(seed + i), ...)`,
    with `negative_prompt=negative_prompts[i]` when given."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model), **({"dtype": getattr(torch, dtype)} if dtype else {}))
    pipe.set_progress_bar_config(disable=True)
    if tiled_decode:
        pipe.vae.enable_tiling()
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        negative = {"negative_prompt": negative_prompts[i]} if negative_prompts is not None else {}
        images.append(np.asarray(pipe(prompt, generator=generator, **negative, **call_kwargs).images[0]))
    return images


def read_image(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))
