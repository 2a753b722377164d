"""The staged flow against the one-process diffusers pipeline, on tiny Flux models of several shapes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stagediff.tiny_model import TinyFluxConfig, build_tiny_flux
from tests.conftest import read_items
from tests.reference import read_image, reference_images

SHAPES = {
    "default": TinyFluxConfig(),
    "wide-text": TinyFluxConfig(seed=1, clip_hidden=48, t5_hidden=64, t5_layers=1, latent_channels=16),
    "deep": TinyFluxConfig(
        seed=2,
        transformer_layers=2,
        transformer_single_layers=2,
        attention_head_dim=32,
        attention_heads=3,
        axes_dims_rope=(8, 8, 16),
        vae_channels=(16, 16, 32, 32),
        guidance_embeds=False,
    ),
}
SETTINGS = dict(steps=2, guidance=3.5, height=64, width=48, max_sequence_length=24)


def call_kwargs(settings: dict) -> dict:
    return dict(
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance"],
        height=settings["height"],
        width=settings["width"],
        max_sequence_length=settings["max_sequence_length"],
    )


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shaped_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("models") / request.param, SHAPES[request.param])


def test_bit_identical_to_diffusers_at_batch_size_1(prefect_server, shaped_model: Path, tmp_path: Path) -> None:
    from tests.reference import run_generate as generate

    prompts = ["a red dog", "a city at night, photo"]
    manifest = generate(prompts=prompts, model=str(shaped_model), seed=11, out=str(tmp_path), run_id="r", **SETTINGS)
    expected = reference_images(shaped_model, prompts, seed=11, **call_kwargs(SETTINGS))
    assert manifest["status"] == "completed" and manifest["counts"]["done"] == len(prompts)
    for item, reference in zip(read_items(tmp_path / "r"), expected, strict=True):
        image = read_image(tmp_path / "r" / item["image"])
        assert image.shape == (SETTINGS["height"], SETTINGS["width"], 3)
        np.testing.assert_array_equal(image, reference)


def test_batched_within_one_of_diffusers_and_stages_in_fresh_processes(
    prefect_server, tiny_model: Path, tmp_path: Path
) -> None:
    from tests.reference import run_generate as generate

    prompts = ["a dog", "a cat", "a forest", "blue sky", "portrait"]
    manifest = generate(
        prompts=prompts, model=str(tiny_model), seed=3, batch_size=2, out=str(tmp_path), run_id="b", **SETTINGS
    )
    expected = reference_images(tiny_model, prompts, seed=3, **call_kwargs(SETTINGS))
    for item, reference in zip(read_items(tmp_path / "b"), expected, strict=True):
        diff = np.abs(read_image(tmp_path / "b" / item["image"]).astype(int) - reference.astype(int))
        assert diff.max() <= 1
    pids = [manifest["stages"][stage]["pid"] for stage in ("encode", "denoise", "decode")]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
