"""The run engine that `generate` and `batch` share: one behaviour for damaged artifacts, each model loaded
once per stage per run whatever the settings groups, live progress, and the model family's own defaults."""

from __future__ import annotations

import inspect
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import prefect.main  # noqa: F401 (sets up Prefect's logging now: later, it would drop caplog's handler mid-test)
import pytest

from stagediff.artifacts import Store
from stagediff.family import FAMILIES
from tests.conftest import read_items
from tests.reference import read_image, reference_images, run_generate

SMALL = {"steps": 2, "height": 64, "width": 64, "max_sequence_length": 16}


@pytest.fixture
def api(prefect_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI in this process talks to the session's test server."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_every(folder: Path) -> list[Path]:
    """Flip one byte near the end of every object file under `folder` (records untouched)."""
    damaged = []
    for path in sorted(folder.rglob("*.safetensors")):
        data = path.read_bytes()
        path.write_bytes(data[:-9] + bytes([data[-9] ^ 0x10]) + data[-8:])
        damaged.append(path)
    return damaged


def test_batch_recomputes_damaged_latents_with_a_warning_or_stops_when_strict(
    api, tiny_model: Path, tmp_path: Path, caplog
) -> None:
    from stagediff.cli import main

    prompts_file, folder = tmp_path / "p.txt", tmp_path / "batch"
    prompts_file.write_text("a red dog\na cat in the city\na forest at night\n")
    args = ["batch", str(prompts_file), "--store", str(folder), "--model", str(tiny_model)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert main(args) == 0
    first = read_items(folder)
    images = snapshot(folder / "images")
    store = Store(folder / ".store")

    def lose_image() -> Path:
        """Item 1's image gone from the folder and from the store (a store that holds it would serve it)."""
        key = first[1]["keys"]["images"]
        store.remove(store.record_name("images", key))
        store.remove(store.object_name("images", key))
        (folder / first[1]["image"]).unlink()
        return folder / first[1]["image"]

    # Every latents object damaged, one image lost: the run recomputes the latents it needs and completes
    damaged = flip_every(folder / ".store" / "objects" / "latents")
    lost = lose_image()
    caplog.clear()
    assert main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(path) in w and "computing it again" in w for w in warnings for path in damaged), warnings
    assert snapshot(folder / "images") == images  # the lost image is back, bit for bit; the others untouched
    summary = json.loads((folder / "batch.json").read_text())
    run = summary["runs"][-1]
    assert run["status"] == "completed" and run["computed"] == 1
    assert summary["stages"]["denoise"]["damaged"] == 1 and summary["stages"]["denoise"]["computed"] == 1
    # the items done before keep the run that made them (this run did not look at their latents); item 1 is this run's
    made = [(item["run"], item["made"]["latents"], item["made"]["images"]) for item in read_items(folder)]
    assert made == [(1, "computed", "computed"), (2, "recomputed", "computed"), (1, "computed", "computed")], made

    # --strict: the same damage stops the run with exit 1 naming the file, before any stage process
    damaged = flip_every(folder / ".store" / "objects" / "latents")
    lost = lose_image()
    objects = snapshot(folder / ".store" / "objects")
    strict = subprocess.run([sys.executable, "-m", "stagediff.cli", *args, "--strict"], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert strict.returncode == 1, strict.stderr[-2000:]
    err = strict.stderr.strip().splitlines()[-1]
    assert err.startswith("stagediff: error: artifact ") and "is corrupted" in err
    assert any(str(path) in err for path in damaged), err
    assert snapshot(folder / ".store" / "objects") == objects  # nothing recomputed, nothing removed
    assert snapshot(folder / "images") == {k: v for k, v in images.items() if k != lost.name}


def test_twenty_items_in_three_settings_groups_load_each_model_once_and_equal_generate(
    api, tiny_model: Path, tmp_path: Path
) -> None:
    """Batched 4 at a time in both: a group's batches are the same in the batch run and its generate run."""
    from stagediff.cli import main

    groups = {  # settings group -> first seed; rows interleaved in the file, seeds consecutive in each group
        (2, 64, 64): 100,
        (3, 64, 48): 200,
        (2, 48, 64): 300,
    }
    rows, prompts = [], {group: [] for group in groups}
    for n in range(20):
        group = list(groups)[n % 3]
        steps, height, width = group
        prompt = f"prompt number {n}"
        rows.append({"prompt": prompt, "seed": groups[group] + len(prompts[group]), "steps": steps,
                     "height": height, "width": width})  # fmt: skip
        prompts[group].append(prompt)
    prompts_file, folder = tmp_path / "p.jsonl", tmp_path / "batch"
    prompts_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["batch", str(prompts_file), "--store", str(folder), "--model", str(tiny_model)]
    assert main([*args, "--max-sequence-length", "16", "--batch-size", "4"]) == 0

    stages = json.loads((folder / "batch.json").read_text())["stages"]
    items = read_items(folder)
    for stage, kind in (("encode", "embeddings"), ("denoise", "latents"), ("decode", "images")):
        assert stages[stage]["process_count"] == len(stages[stage]["processes"]) == 1, (stage, stages[stage])
        assert stages[stage]["loads"] == 1, (stage, stages[stage])
        assert stages[stage]["computed"] == 20 and [item["made"][kind] for item in items] == ["computed"] * 20
    by_prompt = {entry["prompt"]: read_image(folder / entry["image"]) for entry in items}
    for (steps, height, width), seed in groups.items():
        out = run_generate(
            prompts=prompts[(steps, height, width)], seed=seed, model=str(tiny_model), steps=steps, height=height,
            width=width, max_sequence_length=16, batch_size=4, out=str(tmp_path / "gen"), run_id=f"g{seed}",
        )  # fmt: skip
        assert out["counts"]["done"] == len(prompts[(steps, height, width)])
        for item in read_items(tmp_path / "gen" / f"g{seed}"):
            np.testing.assert_array_equal(read_image(tmp_path / "gen" / f"g{seed}" / item["image"]),
                                          by_prompt[item["prompt"]])  # fmt: skip


def test_progress_reports_every_item_once_and_the_artifact_reaches_n_of_n(
    prefect_server, tiny_model: Path, tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from stagediff.progress import listening

    reports = []
    with listening(lambda snapshot: reports.append((snapshot.stage, snapshot.stages[snapshot.stage].done))):
        manifest = run_generate(
            prompts=["a", "b", "c"], model=str(tiny_model), out=str(tmp_path), run_id="p", batch_size=2, **SMALL
        )
    for stage in ("encode", "denoise", "decode"):
        assert [done for s, done in reports if s == stage] == [1, 2, 3]  # each item once, in the order stored
    with get_client(sync_client=True) as client:
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[manifest["flow_run_id"]]))
        artifacts = client.read_artifacts(flow_run_filter=run_filter)
        flow_run = client.read_flow_run(manifest["flow_run_id"])
        task_runs = client.read_task_runs(flow_run_filter=run_filter)
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == 1 and progress[0].data == 100 and progress[0].description == "3/3 images"
    assert flow_run.name == "generate p"
    assert sorted(t.name for t in task_runs) == [f"{stage} [chunk 1]" for stage in ("decode", "denoise", "encode")]
    table = next(a for a in artifacts if a.type == "table")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [(r["prompt"], r["steps"], r["size"], r["made"]) for r in rows] == [
        (p, 2, "64x64", "computed") for p in "abc"
    ]
    gallery = next(a for a in artifacts if a.type == "markdown")
    assert gallery.data.count("data:image/png;base64,") == 3 and "a<br>seed 0" in gallery.data


def test_family_defaults_are_the_pipelines_own() -> None:
    from diffusers import (
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    for pipeline in (FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline, StableDiffusionPipeline):
        family, signature = FAMILIES[pipeline.__name__], inspect.signature(pipeline.__call__).parameters
        assert family.default_steps == signature["num_inference_steps"].default
        assert family.default_guidance == signature["guidance_scale"].default
        if "max_sequence_length" in signature:
            assert family.default_max_sequence_length == signature["max_sequence_length"].default


@pytest.mark.parametrize("family", ["flux", "sd3", "sdxl", "sd15"])
def test_a_run_with_only_prompt_and_seed_equals_the_pipeline_at_its_defaults(
    prefect_server, family: str, tmp_path: Path
) -> None:
    from stagediff.tiny_model import build_tiny_family

    model = build_tiny_family(tmp_path / family, family)
    manifest = run_generate(prompts=["a small red house"], seed=3, model=str(model), out=str(tmp_path), run_id="d")
    expected = reference_images(model, ["a small red house"], seed=3)
    np.testing.assert_array_equal(read_image(tmp_path / "d" / manifest["first_items"][0]["image"]), expected[0])
    # the resolved defaults are recorded (and went into the keys)
    defaults = FAMILIES[json.loads((model / "model_index.json").read_text())["_class_name"]]
    settings = manifest["settings"]
    assert (settings["steps"], settings["guidance"]) == (defaults.default_steps, defaults.default_guidance)
    assert manifest["request"]["settings"]["steps"] is None  # asked: the model's default


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [io.StringIO, Terminal], ids=["plain", "terminal"])
def test_the_cli_shows_each_stage_s_items_rate_and_eta(stream: type) -> None:
    from stagediff.progress import Progress
    from stagediff.progress_view import progress_view

    out = stream()
    with progress_view(out):
        progress = Progress(2)
        progress.todo("encode", 2)
        for index in (0, 0, 1):  # a repeated report counts once
            progress.stored("encode", index)
    text = out.getvalue()
    if stream is Terminal:  # a bar per stage, redrawn in place
        assert "encode" in text and "2/2" in text and "items/s" in text
    else:  # a line at the first item (then every few seconds) and at the stage's last
        lines = text.splitlines()
        assert lines[0].startswith("encode: 1/2 items, ") and "ETA" in lines[0]
        assert lines[-1].startswith("encode: 2/2 items, ") and len(lines) == 2


def test_progress_says_every_10_s_in_one_line_what_is_done_and_which_item_came_last(caplog) -> None:
    import logging

    from stagediff.progress import LOG_SECONDS, Progress

    progress = Progress(100)
    progress.logger, progress.last_log = logging.getLogger("run"), time.monotonic()
    progress.todo("encode", 4)
    with caplog.at_level(logging.INFO, logger="run"):
        progress.stored("encode", 0)  # within LOG_SECONDS of the start: no line
        progress.last_log -= LOG_SECONDS
        progress.stored("encode", 1)
        progress.stored("encode", 2)  # within LOG_SECONDS of the last line
    assert [r.getMessage() for r in caplog.records] == [
        "progress: 0/100 images (items computed: encode 2/4); latest: item 1 (encode)"
    ]
