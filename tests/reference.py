"""The correctness reference: the plain, one-process diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def reference_images(model: str | Path, prompts: list[str], seed: int, **call_kwargs) -> list[np.ndarray]:
    """`DiffusionPipeline.from_pretrained(model)(prompt, generator=Generator("cpu").manual_seed(seed + i), ...)`."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        images.append(np.asarray(pipe(prompt, generator=generator, **call_kwargs).images[0]))
    return images


def read_image(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))
