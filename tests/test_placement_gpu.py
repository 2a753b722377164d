"""Placement on accelerators (opt in: `pytest -m gpu` on a CUDA machine; deselected by default).

The CPU suite covers a denoiser spread over CPU and disk; these check what only CUDA can show: the
text encoders placed whole by diffusers' `balanced` map (and the CPU fallback it does silently), a
denoiser spread over GPU, CPU and disk, and the VAE on one GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagediff.tiny_model import build_tiny_model
from tests.test_families import PROMPTS, SHAPES, run_stages, settings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    def get(family: str) -> Path:
        return build_tiny_model(tmp_path_factory.mktemp("models") / family, SHAPES[family]["default"])

    return get


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_text_encoders_balanced_on_the_gpu(tiny, tmp_path: Path) -> None:
    _, stages = run_stages(tiny("sdxl"), tmp_path, settings("sdxl", False), PROMPTS[:1], seed=0)
    assert set(stages["encode"].device_map.values()) == {"cuda:0"}
    assert stages["encode"].warnings == []
    assert stages["decode"].device_map == {"": "cuda:0"}


def test_text_encoder_that_fits_no_gpu_falls_back_to_cpu_and_is_reported(tiny, tmp_path: Path) -> None:
    model = tiny("flux")
    small, large = sorted(folder_bytes(model / name) for name in ("text_encoder", "text_encoder_2"))
    budget = f"{(small + large) // 2}B"  # the smaller encoder fits on GPU 0, the larger one does not
    max_memory = {"0": budget, "cpu": "8GiB"}
    images, stages = run_stages(model, tmp_path, settings("flux", False), PROMPTS, seed=0, max_memory=max_memory)
    placement = stages["encode"].device_map
    assert sorted(placement.values()) == ["cpu", "cuda:0"], placement  # one process, two devices
    assert len(stages["encode"].warnings) == 1 and "diffusers issue #9195" in stages["encode"].warnings[0]
    assert len(images) == 2


def test_denoiser_spreads_over_gpu_cpu_and_disk(tiny, tmp_path: Path) -> None:
    model = tiny("sdxl")
    half = f"{folder_bytes(model / 'unet') // 2}B"  # with accelerate's reserve for offloaded layers, not all fits
    max_memory = {"0": half, "cpu": half}
    images, stages = run_stages(model, tmp_path, settings("sdxl", True), PROMPTS[:1], seed=0, max_memory=max_memory)
    devices = set(stages["denoise"].device_map.values())
    assert {"0", "disk"} <= devices, devices
    assert images[0].shape == (64, 48, 3)
