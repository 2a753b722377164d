"""Nothing lost, nothing wrong, nothing stuck: the faults and habits of real users, each a test of its own
(the bad inputs are in tests/test_refusals.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagediff.artifacts import Store
from stagediff.cli import main
from tests.conftest import read_items
from tests.reference import read_image, run_generate

SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "16"]


@pytest.fixture
def api(prefect_server, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())


def test_tiny_model_writes_only_a_new_or_empty_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["tiny-model", str(tmp_path / "empty"), "--family", "sd15"]) == 0
    assert (tmp_path / "empty" / "model_index.json").exists()
    before = sorted(p.name for p in (tmp_path / "empty").iterdir())
    assert main(["tiny-model", str(tmp_path / "empty"), "--family", "sd15"]) == 2  # not empty any more
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == before


def test_resume_from_another_folder_uses_the_run_s_model_and_refuses_a_changed_one(
    api, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for folder, seed in ((here, 0), (elsewhere, 7)):  # two different models under the same relative name
        (folder / "models").mkdir(parents=True)
        assert main(["tiny-model", str(folder / "models" / "flux"), "--seed", str(seed)]) == 0
    monkeypatch.chdir(here)
    assert main(["generate", "--model", "models/flux", "--prompt", "a dog", *SMALL, "--run-id", "r"]) == 0
    manifest = json.loads((here / "outputs" / "r" / "manifest.json").read_text())
    assert manifest["model"] == str(here / "models" / "flux")  # recorded absolute
    image = (here / "outputs" / "r" / "images" / "00000.png").read_bytes()
    (here / "outputs" / "r" / "images" / "00000.png").unlink()

    monkeypatch.chdir(elsewhere)
    assert main(["resume", str(here / "outputs" / "r")]) == 0
    assert (here / "outputs" / "r" / "images" / "00000.png").read_bytes() == image  # the run's own model

    # The run's model changes on disk: resume refuses in one line and changes nothing
    weights = here / "models" / "flux" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    before = (here / "outputs" / "r" / "manifest.json").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "stagediff.cli", "resume", str(here / "outputs" / "r")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is no longer the one the run used" in proc.stderr
    assert (here / "outputs" / "r" / "manifest.json").read_bytes() == before


def test_a_component_of_another_class_gets_other_keys(tiny_model: Path, tmp_path: Path) -> None:
    from stagediff.keys import model_identity

    other = tmp_path / "other-class"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderTiny"]  # the same files, said to be another class
    (other / "model_index.json").write_text(json.dumps(index))
    a, b = model_identity(tiny_model), model_identity(other)
    assert a.decoder != b.decoder and (a.text, a.denoiser) == (b.text, b.denoiser)


def test_a_damaged_or_old_batch_json_is_kept_aside_with_a_warning(tmp_path: Path, caplog) -> None:
    import logging

    from stagediff.flows.batch import adopt_old_summary

    old = json.dumps({"items": [{"id": "a", "status": "done"}], "runs": []})  # format 1: every item inline
    for text in ('{"items": [truncated', old):
        for path in tmp_path.iterdir():
            path.unlink()
        (tmp_path / "batch.json").write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test"):
            adopt_old_summary(tmp_path, logging.getLogger("test"))  # the run records every item again
        kept = list(tmp_path.glob("batch.v1.json.*"))
        assert [p.read_text() for p in kept] == [text] and not (tmp_path / "batch.json").exists()
        assert any(f"kept as {kept[0].name}" in r.getMessage() for r in caplog.records), caplog.records
    current = json.dumps({"format": 2, "runs": []})  # today's summary stays where it is
    (tmp_path / "batch.json").write_text(current)
    adopt_old_summary(tmp_path, logging.getLogger("test"))
    assert (tmp_path / "batch.json").read_text() == current


def test_a_killed_batch_run_is_marked_interrupted(api, tiny_model: Path, tmp_path: Path) -> None:
    from stagediff.record import Record

    prompts_file, folder = tmp_path / "p.txt", tmp_path / "batch"
    prompts_file.write_text("a red dog\na cat\n")
    args = ["batch", str(prompts_file), "--store", str(folder), "--model", str(tiny_model), *SMALL]
    assert main(args) == 0
    record = Record(folder / "batch.db", "batch")
    record.start_run({"status": "running"})  # as a killed run leaves it: started, never finished
    record.close()
    assert main(args) == 0
    runs = json.loads((folder / "batch.json").read_text())["runs"]
    assert [run["status"] for run in runs] == ["completed", "interrupted", "completed"]


def test_a_damaged_batch_json_is_rebuilt_from_the_store(api, tiny_model: Path, tmp_path: Path) -> None:
    prompts_file, folder = tmp_path / "p.txt", tmp_path / "batch"
    prompts_file.write_text("a red dog\na cat\n")
    args = ["batch", str(prompts_file), "--store", str(folder), "--model", str(tiny_model), *SMALL]
    assert main(args) == 0
    images = {p.name: p.read_bytes() for p in (folder / "images").iterdir()}

    # The summary damaged and the record gone (as a folder written before run records has none)
    (folder / "batch.json").write_text('{"items": [truncated')
    for path in folder.glob("batch.db*"):
        path.unlink()
    assert main(args) == 0
    kept = list(folder.glob("batch.v1.json.*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"items": [truncated', "the damaged file was not kept"
    rebuilt = json.loads((folder / "batch.json").read_text())
    assert [e["status"] for e in read_items(folder)] == ["done", "done"]
    assert [e["made"]["images"] for e in read_items(folder)] == ["reused", "reused"]
    assert all(info["computed"] == 0 for info in rebuilt["stages"].values())  # nothing computed again
    assert rebuilt["counts"]["computed_by_this_run"] == 0 and rebuilt["counts"]["done"] == 2
    assert {p.name: p.read_bytes() for p in (folder / "images").iterdir()} == images


def test_a_prompts_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    import hashlib

    from stagediff.request import checked_prompts_file
    from stagediff.sources import prompt_lines

    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa dog\na cat\u2028on two lines\n".encode())
    with path.open("rb") as stream:
        assert list(prompt_lines(stream, "txt")) == [(1, "a dog"), (2, "a cat\u2028on two lines")]  # "\n" alone
    checked = checked_prompts_file(str(path))
    assert (checked.count, checked.sha256) == (2, hashlib.sha256(path.read_bytes()).hexdigest())


def test_identical_tensors_give_identical_bytes(tmp_path: Path) -> None:
    import torch

    blobs = []
    for n, order in enumerate((["b", "a", "z"], ["z", "a", "b"])):
        store = Store(tmp_path / f"s{n}")
        meta = {k: f"value {k} é" for k in order}
        store.save_tensors("latents", "k" * 64, {"latents": torch.arange(6.0)}, meta)
        blobs.append(store.load("latents", "k" * 64))
    assert blobs[0] == blobs[1]


def test_pngs_say_what_made_them_and_the_command_makes_it_again(
    api, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    manifest = run_generate(prompts=["a red fox"], negative_prompts=None, seed=11, model=str(tiny_model), steps=2,
                            height=64, width=48, max_sequence_length=16, out="first", run_id="r")  # fmt: skip
    path = tmp_path / "first" / "r" / manifest["first_items"][0]["image"]
    text = Image.open(path).text
    assert text["parameters"].splitlines() == [
        "a red fox",
        "Steps: 2, Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 3.5, Seed: 11, Size: 48x64, "
        f"Model: {tiny_model.name}, Model hash: {manifest['model_hash']}",
    ]
    request = json.loads(text["stagediff"])
    assert (request["prompt"], request["seed"], request["settings"]["steps"]) == ("a red fox", 11, 2)
    # The recorded command, run as it is, makes the same file
    import shlex

    argv = shlex.split(request["command"])
    assert argv[:2] == ["stagediff", "generate"]
    assert main([*argv[1:], "--out", "again", "--run-id", "r"]) == 0
    assert (tmp_path / "again" / "r" / "images" / "00000.png").read_bytes() == path.read_bytes()
    # --no-metadata: neither chunk, the same pixels, another store key
    assert main([*argv[1:], "--out", "bare", "--run-id", "r", "--no-metadata"]) == 0
    bare = tmp_path / "bare" / "r" / "images" / "00000.png"
    assert not {"parameters", "stagediff"} & set(Image.open(bare).text)
    np.testing.assert_array_equal(read_image(bare), read_image(path))
    keys = [read_items(tmp_path / d / "r")[0]["keys"] for d in ("again", "bare")]
    assert keys[0]["latents"] == keys[1]["latents"] and keys[0]["images"] != keys[1]["images"]
    # The same weights from another folder, same store: the latents are reused, the PNG names this run's folder
    copy = tmp_path / "copy-of-the-model"
    shutil.copytree(tiny_model, copy)
    assert main([*argv[1:], "--model", str(copy), "--out", "again", "--run-id", "c"]) == 0
    item = read_items(tmp_path / "again" / "c")[0]
    assert item["keys"]["latents"] == keys[0]["latents"] and item["keys"]["images"] != keys[0]["images"]
    copied = Image.open(tmp_path / "again" / "c" / "images" / "00000.png")
    assert (
        json.loads(copied.text["stagediff"])["model"] == str(copy)
        and f"Model: {copy.name}," in copied.text["parameters"]
    )
    np.testing.assert_array_equal(np.asarray(copied), read_image(path))


HOLD = (
    "import sys, time, logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
    "from stagediff.stages.work import hold_devices; hold_devices(sys.argv[1]); print('holding', flush=True); "
    "time.sleep(float(sys.argv[2]))"
)


def test_a_gpu_is_held_by_one_stage_process_and_freed_when_it_dies(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "7", "STAGEDIFF_CACHE": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-c", HOLD, "denoise", "60"], env=env, stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "holding"
    second = subprocess.Popen([sys.executable, "-c", HOLD, "decode", "0"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    waiting = ""
    while "waiting for GPU 7" not in waiting and time.monotonic() < deadline:
        waiting += second.stderr.readline()
    assert f"waiting for GPU 7: held by pid {first.pid} (denoise stage)" in waiting
    time.sleep(0.5)
    assert second.poll() is None  # still waiting
    os.kill(first.pid, signal.SIGKILL)  # the holder dies: the kernel frees the device
    assert second.wait(30) == 0 and "holding" in second.stdout.read()
    first.wait()


def test_a_large_request_travels_by_reference(api, tiny_model: Path, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from stagediff.request import Prompts

    with pytest.raises(ValidationError, match="too large to travel as flow parameters"):
        Prompts(prompts=["a long prompt, " * 20] * 1000)  # ~300 KB inline: refused up front
    path = tmp_path / "prompts.txt"
    path.write_text("a dog\na cat\n")
    manifest = run_generate(file=str(path), model=str(tiny_model), steps=2, height=64, width=64,
                            max_sequence_length=16, out=str(tmp_path), run_id="file")  # fmt: skip
    assert [item["prompt"] for item in read_items(tmp_path / "file")] == ["a dog", "a cat"]
    assert "prompts" not in manifest["request"] and manifest["request"]["prompts_file"]["count"] == 2


def test_a_model_saved_as_a_variant_only_loads_with_that_variant(api, tiny_model: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from tests.reference import reference_images

    variant = tmp_path / "fp16-only"
    DiffusionPipeline.from_pretrained(str(tiny_model)).save_pretrained(variant, variant="fp16")
    assert list(variant.glob("vae/*.fp16.safetensors")) and not list(variant.glob("vae/*model.safetensors"))
    args = ["generate", "--model", str(variant), "--prompt", "a dog", *SMALL, "--seed", "4", "--out", str(tmp_path)]
    refused = subprocess.run([sys.executable, "-m", "stagediff.cli", *args, "--run-id", "plain"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "has only variant weights (fp16): pass --variant" in refused.stderr
    assert main([*args, "--run-id", "v", "--variant", "fp16"]) == 0
    expected = reference_images(variant, ["a dog"], 4, num_inference_steps=2, height=64, width=64,
                                max_sequence_length=16, variant="fp16")  # fmt: skip
    np.testing.assert_array_equal(read_image(tmp_path / "v" / "images" / "00000.png"), expected[0])


def test_a_hub_revision_is_the_snapshot_the_run_loads(
    api, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--revision` picks its snapshot of the Hugging Face cache (offline here); another revision with other files
    is another model; a local folder takes no revision, a run's recorded snapshot does (resume)."""
    from huggingface_hub import constants

    from stagediff.jobs import StageContext
    from stagediff.keys import model_hash, model_identity
    from stagediff.request import RequestError, validate_request
    from stagediff.stages.loading import load_pipeline

    repo = tmp_path / "hub" / "models--org--tiny"
    commits = {"v1": "1" * 40, "main": "2" * 40}
    for (ref, commit), seed in zip(commits.items(), (0, 7), strict=True):
        assert main(["tiny-model", str(repo / "snapshots" / commit), "--seed", str(seed)]) == 0
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    common = dict(prompts=["a dog"], run_id="r", model="org/tiny")
    v1, latest = validate_request(**common, revision="v1"), validate_request(**common)
    assert (v1.model, latest.model) == (
        str(repo / "snapshots" / commits["v1"]),
        str(repo / "snapshots" / commits["main"]),
    )
    assert model_hash(model_identity(v1.model)) != model_hash(model_identity(latest.model))
    assert validate_request(**{**common, "model": v1.model}, revision="v1").model == v1.model
    with pytest.raises(RequestError, match="invalid revision='v1': applies to a Hub id; a local folder is one"):
        validate_request(**{**common, "model": str(tiny_model)}, revision="v1")
    with pytest.raises(RequestError, match="is not in the Hugging Face cache at revision 'v2' and HF_HUB_OFFLINE=1"):
        validate_request(**common, revision="v2")

    # A run at v1 records its snapshot and revision; resume takes both; a stage given the revision loads the folder
    out = tmp_path / "out"
    args = ["generate", "--model", "org/tiny", "--revision", "v1", "--prompt", "a dog", *SMALL, "--out", str(out)]
    assert main([*args, "--run-id", "r"]) == 0
    manifest = json.loads((out / "r" / "manifest.json").read_text())
    assert (manifest["model"], manifest["request"]["placement"]["revision"]) == (v1.model, "v1")
    assert main(["resume", str(out / "r")]) == 0
    ctx = StageContext(model=v1.model, work_dir=str(tmp_path), store=str(out), dtype="float32", revision="v1")
    assert load_pipeline(ctx, ("vae",)).vae is not None


@pytest.mark.parametrize("prefect_frequency", [None, 30], ids=["prefect-off", "prefect-every-30s"])
def test_a_flow_run_beats_while_it_works_and_stops_at_once(
    prefect_server, monkeypatch: pytest.MonkeyPatch, prefect_frequency: int | None
) -> None:
    """The heartbeats the automation of `make deploy` waits for (a run without one for 90 s is marked Crashed):
    a flow of this package beats every HEARTBEAT_SECONDS, unless Prefect's own heartbeats are as frequent,
    and its thread ends with the block instead of finishing a 1 s sleep."""
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from stagediff.flows import running

    beats: list[dict] = []
    monkeypatch.setattr("prefect.events.emit_event", lambda **event: beats.append(event))
    if prefect_frequency is None:
        monkeypatch.setattr(running, "HEARTBEAT_SECONDS", 0.2)  # else 30, as often as Prefect's

    @flow
    def working() -> tuple[str, float]:
        with running.heartbeats():
            time.sleep(0.7)
            ended = time.perf_counter()
        return str(flow_run.id), time.perf_counter() - ended

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: prefect_frequency}):
        run_id, stopping = working()
    if prefect_frequency is None:
        assert len(beats) == 4  # at 0, 0.2, 0.4 and 0.6 s
        assert {b["event"] for b in beats} == {"prefect.flow-run.heartbeat"}
        assert {b["resource"]["prefect.resource.id"] for b in beats} == {f"prefect.flow-run.{run_id}"}
        assert stopping < 0.1, stopping
    else:
        assert beats == []  # Prefect beats often enough by itself


def test_the_command_s_flow_runs_beat_from_stagediff_s_thread_alone(
    api, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stagediff generate` turns Prefect's own heartbeats off (the run's end would wait out their 1 s sleep)
    and its flow run beats from `heartbeats()`, which the automation of `make deploy` needs."""
    from prefect.flow_engine import FlowRunEngine

    ours, prefects = [], []
    monkeypatch.setattr("prefect.events.emit_event", lambda **event: ours.append(event))
    monkeypatch.setattr(FlowRunEngine, "_emit_flow_run_heartbeat", lambda self, *a, **k: prefects.append(self))
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_model), "--prompt", "a dog", *SMALL, "--out", str(out),
                 "--run-id", "beats"]) == 0  # fmt: skip
    run_id = json.loads((out / "beats" / "manifest.json").read_text())["flow_run_id"]
    assert [e["resource"]["prefect.resource.id"] for e in ours] == [f"prefect.flow-run.{run_id}"]  # the first
    assert prefects == []


def test_a_stop_that_raised_something_else_on_its_way_out_is_still_a_cancel() -> None:
    from prefect.exceptions import TerminationSignal

    from stagediff.flows.running import ended_status

    def stopped_then(error: Exception) -> BaseException:
        try:
            try:
                raise TerminationSignal(signal=signal.SIGTERM)
            except TerminationSignal:
                raise error  # noqa: B904 (implicitly chained, as Prefect's crash handler raises)
        except Exception as exc:
            return exc

    assert ended_status(TerminationSignal(signal=signal.SIGTERM)) == "cancelled"
    assert ended_status(KeyboardInterrupt()) == "cancelled"
    assert ended_status(stopped_then(OSError("stage process died"))) == "cancelled"
    assert ended_status(RuntimeError("denoise stage failed")) == "failed"
