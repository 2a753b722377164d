"""Speed levers beyond plain diffusers, each opt-in: its own content keys (a store never mixes exact and
approximate artifacts), its images against plain diffusers with the same lever applied by hand, and for
`--compile` the compiled code kept in the store and loaded by the next process instead of compiled again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import read_items
from tests.reference import read_image, reference_images

PROMPTS = ["a red fox", "a tower at dusk"]
ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "8", "--seed", "4"]


def stagediff(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagediff.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip


def images(run: Path) -> list[np.ndarray]:
    return [read_image(run / item["image"]) for item in read_items(run)]


def test_compile_is_diffusers_compiled_by_hand_its_own_keys_and_its_code_compiled_once(
    prefect_server, tiny_model: Path, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "STAGEDIFF_CACHE": str(tmp_path / "machine")}
    out, common = tmp_path / "out", ["--model", str(tiny_model), *ARGS, "--out", str(tmp_path / "out")]
    for prompt in PROMPTS:
        common += ["--prompt", prompt]
    exact = stagediff("generate", *common, "--run-id", "exact", env=env)
    assert exact.returncode == 0, exact.stderr[-3000:]
    compiled = stagediff("generate", *common, "--run-id", "compiled", "--compile", env=env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "code compiled" in compiled.stderr, compiled.stderr[-3000:]

    # its own latents and images, the same embeddings (the text encoders are not compiled)
    exact_items, compiled_items = read_items(out / "exact"), read_items(out / "compiled")
    for e, c in zip(exact_items, compiled_items, strict=True):
        assert e["keys"]["embeddings"] == c["keys"]["embeddings"]
        assert e["keys"]["latents"] != c["keys"]["latents"] and e["keys"]["images"] != c["keys"]["images"]
    summary = json.loads((out / "compiled" / "manifest.json").read_text())
    assert summary["request"]["placement"]["compile"] is True

    # the images: those of diffusers compiled by hand, bit for bit; near the exact ones
    by_hand = reference_images(tiny_model, PROMPTS, seed=4, num_inference_steps=2, height=64, width=64,
                               max_sequence_length=8, compile=True)  # fmt: skip
    for image, reference, plain in zip(images(out / "compiled"), by_hand, images(out / "exact"), strict=True):
        np.testing.assert_array_equal(image, reference)
        assert np.abs(image.astype(int) - plain.astype(int)).max() <= 2

    # the compiled code: in the store once; a machine without it takes it from the store, compiles nothing
    store = out / ".store" / "objects" / "compiled"
    (stored,) = list(store.rglob("*.safetensors"))
    written = stored.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "machine" / "compiled")
    again = stagediff("generate", *common, "--run-id", "again", "--compile", "--seed", "9", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "code store" in again.stderr, again.stderr[-3000:]
    assert list(store.rglob("*.safetensors")) == [stored] and stored.stat().st_mtime_ns == written
    # a rerun computes nothing
    rerun = stagediff("generate", *common, "--run-id", "compiled", "--compile", env=env)
    assert rerun.returncode == 0 and "(0 computed)" in rerun.stdout, rerun.stdout[-2000:]


def test_compile_with_pipeline_stages_is_refused_in_one_line(tmp_path: Path) -> None:
    refused = stagediff("generate", "--prompt", "a", "--compile", "--pipeline-stages", "2", "--out", str(tmp_path),
                        env=dict(os.environ))  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "stagediff: error: invalid compile=True: does not go with pipeline_stages > 1 yet: use one of them"
    ]
