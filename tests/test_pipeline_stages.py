"""Pipeline stages (`--pipeline-stages N`): the denoiser split into parts, one process each, micro-batches streamed.

Every case runs the real processes (stages forked from the stage forkserver, parts forked from the denoise
stage, gloo between them) and takes the unsplit run at the same batch size as the oracle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stagediff.artifacts import Store
from stagediff.isolation import StageError, find_stage_process, run_stage_process
from stagediff.jobs import (
    DecodeItem,
    DecodeJob,
    DenoiseItem,
    DenoiseJob,
    DenoiseSettings,
    EncodeItem,
    EncodeJob,
    StageContext,
    StageResult,
)
from stagediff.replica import cpu_shares
from stagediff.tiny_model import TinyFluxConfig, TinySD3Config, build_tiny_model
from tests.conftest import read_items
from tests.reference import read_image

PROMPTS = [f"a red dog number {i}" for i in range(8)]
SHAPES = {
    "flux": TinyFluxConfig(seed=3, transformer_layers=2, transformer_single_layers=3),
    "sd3": TinySD3Config(seed=3, transformer_layers=3),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_model(root / family, config) for family, config in SHAPES.items()}


def key(kind: str, *parts: object) -> str:
    return hashlib.sha256(f"{kind}{parts}".encode()).hexdigest()


def settings(family: str, steps: int = 3) -> DenoiseSettings:
    """Guidance on: SD3 runs classifier-free guidance (two halves per call), Flux its distilled guidance."""
    return DenoiseSettings(steps=steps, guidance=3.5 if family == "flux" else 5.0, height=64, width=48,
                           max_sequence_length=24)  # fmt: skip


def run(
    model: Path, root: Path, batch_size: int, stages: int, micro: int | None = None
) -> tuple[list[np.ndarray], StageResult]:
    """encode -> denoise -> decode, each in its own stage process; the images and the denoise result."""
    store = Store(root / "store")
    ctx = StageContext(str(model), str(root), store.location, "float32", batch_size, pipeline_stages=stages,
                       micro_batch_size=micro)  # fmt: skip
    s = settings(model.name)
    n = range(len(PROMPTS))
    encoded = run_stage_process("encode", EncodeJob(ctx, [EncodeItem(i, PROMPTS[i], None, 24, key("e", i)) for i in n]))
    embeddings = {ref.index: ref for ref in encoded.items}
    denoised = run_stage_process("denoise", DenoiseJob(ctx, [DenoiseItem(i, embeddings[i], 40 + i, s, key("l", i))
                                                             for i in n]))  # fmt: skip
    latents = {ref.index: ref for ref in denoised.items}
    decoded = run_stage_process("decode", DecodeJob(ctx, [DecodeItem(i, latents[i], 64, 48, key("i", i)) for i in n]))
    refs = sorted(decoded.items, key=lambda ref: ref.index)
    return [read_image(store.path(store.object_name("images", ref.key))) for ref in refs], denoised


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_two_parts_equal_the_unsplit_run(models: dict[str, Path], tmp_path: Path, family: str, batch_size: int):
    expected, _ = run(models[family], tmp_path / "unsplit", batch_size, stages=1)
    images, result = run(models[family], tmp_path / "split", batch_size, stages=2)

    assert len(images) == len(expected) == len(PROMPTS)
    for image, reference in zip(images, expected, strict=True):  # bit-identical: every block computes with the
        np.testing.assert_array_equal(image, reference)  # unsplit stage's thread count, on its own cores
    pipeline = result.pipeline
    micro_batches = math.ceil(len(PROMPTS) / batch_size)
    assert pipeline["micro_batches"] == micro_batches and pipeline["transport"] == "gloo"
    parts = pipeline["parts"]
    blocks = [block for part in parts for block in part["blocks"]]
    from stagediff.family import family_for

    assert blocks == family_for(models[family]).block_names(models[family])  # every block once, in order
    assert [part["part"] for part in parts] == [0, 1] and all(part["blocks"] for part in parts)
    assert len({part["pid"] for part in parts}) == 2
    assert [part["cpus"] for part in parts] == [tuple(cpus) for cpus in cpu_shares(2)]
    for part in parts:
        assert part["device"] == "cpu" and part["threads"] == torch.get_num_threads()
        assert part["calls"] == micro_batches * 3  # one call per step per micro-batch (SD3: both CFG halves in it)
        assert part["compute_seconds"] > 0 and 0 < part["busy_fraction"] <= 1
    assert result.device_map == {block: "cpu" for block in blocks}


def test_a_batch_cut_into_micro_batches(models: dict[str, Path], tmp_path: Path) -> None:
    """--batch-size 8 --micro-batch-size 2: four micro-batches stream through the parts; the images equal the
    unsplit run at batch size 8 within 1 per pixel (a batch's size can move the last bit of a float)."""
    expected, _ = run(models["flux"], tmp_path / "unsplit", 8, stages=1)
    images, result = run(models["flux"], tmp_path / "split", 8, stages=2, micro=2)
    for image, reference in zip(images, expected, strict=True):
        assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1
    assert result.pipeline["micro_batches"] == 4
    assert [part["calls"] for part in result.pipeline["parts"]] == [4 * 3, 4 * 3]


def test_named_split_points(models: dict[str, Path], tmp_path: Path) -> None:
    model = models["flux"]
    store = Store(tmp_path / "store")
    ctx = StageContext(str(model), str(tmp_path), store.location, "float32", 2, pipeline_stages=3,
                       pipeline_split=("transformer_blocks.1", "single_transformer_blocks.2"))  # fmt: skip
    encoded = run_stage_process("encode", EncodeJob(ctx, [EncodeItem(0, "a dog", None, 24, key("e", 0))]))
    result = run_stage_process("denoise", DenoiseJob(ctx, [DenoiseItem(0, encoded.items[0], 1, settings("flux"),
                                                                       key("l", 0))]))  # fmt: skip
    assert [part["blocks"] for part in result.pipeline["parts"]] == [
        ["transformer_blocks.0"],
        ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"],
        ["single_transformer_blocks.2"],
    ]
    assert store.usable("latents", key("l", 0))


@pytest.mark.parametrize("when", ["at its start", "mid-run"])
def test_a_killed_part_fails_the_stage_naming_it_and_a_rerun_finishes(models: dict[str, Path], tmp_path: Path,
                                                                      when: str) -> None:  # fmt: skip
    """kill -9 of part 1 (as it starts: before the parts' group is joined; or once latents are stored): the stage
    fails naming the part, no part process outlives it, and what was stored stays; the same job again computes
    only what is missing."""
    model = models["flux"]
    store = Store(tmp_path / "store")
    ctx = StageContext(str(model), str(tmp_path), store.location, "float32", 1, pipeline_stages=2)
    encoded = run_stage_process("encode", EncodeJob(ctx, [EncodeItem(i, p, None, 24, key("e", i))
                                                          for i, p in enumerate(PROMPTS)]))  # fmt: skip
    embeddings = {ref.index: ref for ref in encoded.items}
    long = settings("flux", steps=60)
    job = DenoiseJob(ctx, [DenoiseItem(i, embeddings[i], i, long, key("l", i)) for i in range(len(PROMPTS))])

    killed: list[int] = []

    def kill_part() -> None:
        pid = find_stage_process("part1", timeout=120)
        while when == "mid-run" and not any(store.usable("latents", key("l", i)) for i in range(len(PROMPTS))):
            time.sleep(0.01)
        killed.append(pid)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_part)
    killer.start()
    with pytest.raises(StageError, match=r"pipeline part 1 \(pid \d+\) exited with code -9"):
        run_stage_process("denoise", job)
    killer.join()
    assert killed
    with pytest.raises(TimeoutError):
        find_stage_process("part0", timeout=2)  # its sibling went with the stage

    stored = [i for i in range(len(PROMPTS)) if store.usable("latents", key("l", i))]
    assert (0 < len(stored) < len(PROMPTS)) if when == "mid-run" else not stored
    again = run_stage_process("denoise", job)
    assert sorted(ref.index for ref in again.items) == [i for i in range(len(PROMPTS)) if i not in stored]
    assert all(store.usable("latents", key("l", i)) for i in range(len(PROMPTS)))


def test_the_command_line_records_the_split_in_the_manifest(prefect_server, models: dict[str, Path], tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(models["sd3"]), "--prompt", "a dog",
           "--prompt", "a cat", "--prompt", "a bird", "--steps", "2", "--height", "64", "--width", "48",
           "--max-sequence-length", "24", "--pipeline-stages", "2", "--out", str(out), "--run-id", "split"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "part 1 on cpu: transformer_blocks." in proc.stdout
    manifest = json.loads((out / "split" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["counts"]["items"] == 3
    assert [item["prompt"] for item in read_items(out / "split")] == ["a dog", "a cat", "a bird"]
    (process,) = manifest["stages"]["denoise"]["processes"]
    parts = process["pipeline"]["parts"]
    assert [len(p["blocks"]) for p in parts] == [1, 2] or [len(p["blocks"]) for p in parts] == [2, 1]
    assert all(p["busy_fraction"] > 0 and p["device"] == "cpu" for p in parts)
    assert manifest["request"]["placement"]["pipeline_stages"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_parts_on_two_gpus_over_nccl(models: dict[str, Path], tmp_path: Path) -> None:
    expected, _ = run(models["flux"], tmp_path / "unsplit", 2, stages=1)
    images, result = run(models["flux"], tmp_path / "split", 2, stages=2)
    for image, reference in zip(images, expected, strict=True):
        assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1
    assert result.pipeline["transport"] == "nccl"
    assert [part["device"] for part in result.pipeline["parts"]] == ["cuda:0", "cuda:1"]


def test_fan_out_replicas_each_split_in_parts(prefect_server, models: dict[str, Path], tmp_path: Path) -> None:
    """`--replicas 2 --pipeline-stages 2`: each replica's denoise runs in 2 parts; the images equal a plain run's."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    common = [
        sys.executable,
        "-m",
        "stagediff.cli",
        "generate",
        "--model",
        str(models["flux"]),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "48",
        "--max-sequence-length",
        "24",
        "--out",
        str(tmp_path / "out"),
    ]
    common += [arg for p in ("a dog", "a cat", "a bird") for arg in ("--prompt", p)]  # fmt: skip
    for extra in (["--run-id", "plain"], ["--run-id", "both", "--replicas", "2", "--pipeline-stages", "2"]):
        extra += ["--store", str(tmp_path / extra[1])]  # each its own store: nothing reused
        proc = subprocess.run(common + extra, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "both" / "manifest.json").read_text())
    assert [r["status"] for r in manifest["replicas"]] == ["completed", "completed"]
    assert len(manifest["replica_stages"]) == 2
    for stages in manifest["replica_stages"].values():
        (process,) = stages["denoise"]["processes"]
        assert len(process["pipeline"]["parts"]) == 2
    for i in range(3):
        plain = read_image(tmp_path / "out" / "plain" / "images" / f"{i:05d}.png")
        both = read_image(tmp_path / "out" / "both" / "images" / f"{i:05d}.png")
        np.testing.assert_array_equal(plain, both)
