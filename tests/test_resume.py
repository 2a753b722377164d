"""Resume from the store: kill -9 anywhere, rerun, get the same bytes; damaged artifacts never used;
concurrent runs compute each artifact once; a stage with nothing to compute starts no process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stagediff.artifacts import ArtifactError, Store
from stagediff.isolation import StageError
from stagediff.record import Record
from stagediff.tiny_model import TinyFluxConfig, build_tiny_flux
from tests.conftest import read_items
from tests.reference import read_image, reference_images

PROMPTS = ["a red dog", "a cat in the city", "a forest at night", "blue sky photo"]
SETTINGS = dict(steps=2, guidance=3.5, height=64, width=64, max_sequence_length=16, seed=5)
FIELDS = {"encode": "embeddings", "denoise": "latents", "decode": "image"}
KINDS = {"encode": "embeddings", "denoise": "latents", "decode": "images"}
DELAY = "0.5"  # STAGEDIFF_TEST_BATCH_DELAY: seconds a stage waits after each batch, so kills land inside it


def generate(model: Path, out: Path, run_id: str, store: Path | str, **overrides) -> dict:
    from tests.reference import run_generate as flow

    kwargs = {**SETTINGS, **overrides}
    prompts = kwargs.pop("prompts", PROMPTS)
    return flow(prompts=prompts, model=str(model), out=str(out), run_id=run_id, store=str(store), **kwargs)


def cli_args(model: Path, out: Path, run_id: str, store: Path) -> list[str]:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    args += [arg for p in PROMPTS for arg in ("--prompt", p)]
    return ["generate", "--model", str(model), *args, "--out", str(out), "--run-id", run_id, "--store", str(store)]


def count(store: Path, stage: str) -> int:
    return len(list((store / "objects" / KINDS[stage]).rglob("*.json")))


def files_of(run_dir: Path, field: str) -> list[bytes]:
    return [(run_dir / item[field]).read_bytes() for item in read_items(run_dir)]


def did(manifest: dict, stage: str) -> tuple[bool, int, int]:
    """(no process started, items computed, items reused) of one stage of the run."""
    info = manifest["stages"][stage]
    return info["skipped"], info["computed"], info["reused"]


def recorded(run_dir: Path) -> list[dict]:
    """Every item of a run that did not complete, from its record."""
    record = Record(run_dir / "record.db", "run")
    try:
        return list(record.items())
    finally:
        record.close()


def which(items: list[dict], stage: str, made: str) -> list[int]:
    """The items whose artifact of `stage` the last run over the folder `made` (computed, reused, recomputed)."""
    return [item["index"] for item in items if item["made"][KINDS[stage]] == made]


def images_computed_by(manifest: dict, items: list[dict]) -> list[int]:
    """The items whose image the manifest's run computed (an item its record held done before keeps the run
    and `made` that recorded it)."""
    run = manifest["runs"][-1]["run"]
    return [item["index"] for item in items if item["run"] == run and item["made"]["images"] == "computed"]


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        chain.append(pid)
    return chain


def stage_process(stage: str, ancestor: int) -> int | None:
    """The running `stagediff-<stage>` process under `ancestor` (names are cut at 15 characters)."""
    name = f"stagediff-{stage}"[:15]
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name and ancestor in ancestors(int(comm.parent.name)):
                return int(comm.parent.name)
        except OSError:
            continue
    return None


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


class Killer(threading.Thread):
    """SIGKILL a stage process (or `victim`, e.g. the whole flow) as soon as the stage has started
    (`after=0`) or has written `after` new objects to the store."""

    def __init__(self, stage: str, ancestor: int, store: Path, after: int, victim: int | None = None) -> None:
        super().__init__(daemon=True)
        self.stage, self.ancestor, self.store, self.after, self.victim = stage, ancestor, store, after, victim
        self.before = count(store, stage)
        self.stage_pid: int | None = None

    def run(self) -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            self.stage_pid = self.stage_pid or stage_process(self.stage, self.ancestor)
            if self.stage_pid and count(self.store, self.stage) >= self.before + self.after:
                os.kill(self.victim or self.stage_pid, signal.SIGKILL)
                return
            time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(prefect_server, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run on its own store: the bytes every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    manifest = generate(tiny_model, root / "out", "ref", root / "store")
    run_dir = root / "out" / "ref"
    return {"store": root / "store", "manifest": manifest, "items": read_items(run_dir),
            **{f: files_of(run_dir, f) for f in ("latents", "image")}}  # fmt: skip


def assert_same_as(reference: dict, run_dir: Path) -> None:
    """Bit-identical: the same latent tensors (safetensors headers order their metadata freely), the same PNGs."""
    assert tensors(latents_of(run_dir)) == tensors(reference["latents"])
    assert files_of(run_dir, "image") == reference["image"]


def latents_of(run_dir: Path) -> list[bytes]:
    """Each item's latents: the run folder's link, or the store's object for an item whose image the store held
    when the folder's first run met it (a run links no earlier artifact of such an item)."""
    store = Store(json.loads((run_dir / "manifest.json").read_text())["store"])
    return [
        (run_dir / item["latents"]).read_bytes()
        if "latents" in item
        else store.load("latents", item["keys"]["latents"])
        for item in read_items(run_dir)
    ]


def tensors(files: list[bytes]) -> list[bytes]:
    from safetensors.torch import load

    return [load(data)["latents"].numpy().tobytes() for data in files]


def test_kill_9_of_stage_processes_at_several_points_then_rerun(
    reference: dict, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAGEDIFF_TEST_BATCH_DELAY", DELAY)
    store, out = tmp_path / "store", tmp_path / "out"
    run_dir = out / "r"
    store.mkdir()
    crash_points = [("encode", 0), ("encode", 1), ("denoise", 0), ("denoise", 1), ("decode", 1)]
    for stage, after in crash_points:
        killer = Killer(stage, os.getpid(), store, after)
        killer.start()
        with pytest.raises(StageError, match=rf"{stage} stage process \d+ died with exit code -9"):
            generate(tiny_model, out, "r", store)
        killer.join(10)
        assert gone(killer.stage_pid)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "failed"
        if (stage, after) == ("encode", 0):
            assert count(store, "encode") == 0  # killed before it wrote anything
        if (stage, after) == ("encode", 1):
            assert count(store, "encode") == 1  # the first batch, and only it
        if (stage, after) == ("denoise", 0):  # this run encoded only what the killed one had not
            assert did(manifest, "encode") == (False, 3, 1)
            items = recorded(run_dir)
            assert which(items, "encode", "computed") == [1, 2, 3] and which(items, "encode", "reused") == [0]
        if (stage, after) == ("denoise", 1):
            assert did(manifest, "encode") == (True, 0, 4)
            assert count(store, "denoise") == 1
        if (stage, after) == ("decode", 1):
            assert did(manifest, "denoise") == (False, 3, 1)
            items = recorded(run_dir)
            assert which(items, "denoise", "computed") == [1, 2, 3] and which(items, "denoise", "reused") == [0]
    manifest = generate(tiny_model, out, "r", store)
    assert manifest["status"] == "completed"
    # Finished stages did no work: no process, nothing computed
    assert did(manifest, "encode") == (True, 0, 4)
    assert did(manifest, "denoise") == (True, 0, 4)
    assert did(manifest, "decode") == (False, 3, 1)
    items = read_items(run_dir)
    assert images_computed_by(manifest, items) == [1, 2, 3]
    assert items[0]["run"] < manifest["runs"][-1]["run"] or items[0]["made"]["images"] == "reused"
    assert manifest["stages"]["encode"]["pid"] is None and manifest["stages"]["denoise"]["pid"] is None
    assert_same_as(reference, run_dir)


def written_keys(store: Path, stage: str) -> set[str]:
    return {json.loads(p.read_text())["key"] for p in (store / "objects" / KINDS[stage]).rglob("*.json")}


def test_kill_9_of_the_whole_flow_in_each_stage_then_stagediff_resume(
    reference: dict, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from prefect.settings import PREFECT_API_URL

    from stagediff.cli import main

    store, out = tmp_path / "store", tmp_path / "out"
    store.mkdir()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "STAGEDIFF_TEST_BATCH_DELAY": DELAY}
    for stage in ("encode", "denoise", "decode"):  # each command resumes the one killed before it
        before = written_keys(store, stage)
        cli = subprocess.Popen(
            [sys.executable, "-m", "stagediff.cli", *cli_args(tiny_model, out, "r", store)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            killer = Killer(stage, cli.pid, store, after=1, victim=cli.pid)
            killer.start()
            killer.join(300)
            assert cli.wait(30) == -signal.SIGKILL
            deadline = time.time() + 30  # the stage process notices its flow is gone and exits by itself
            while not gone(killer.stage_pid):
                assert time.time() < deadline, f"the {stage} process outlived its flow"
                time.sleep(0.05)
        finally:
            cli.kill()
        manifest = json.loads((out / "r" / "manifest.json").read_text())
        assert manifest["status"] == "running"  # it never got to say otherwise
        assert 1 <= len(written_keys(store, stage) - before) < 4  # killed inside the stage
        if stage != "encode":  # the stage before it finished in this command, computing only what was missing
            previous = {"denoise": "encode", "decode": "denoise"}[stage]
            computed = manifest["stages"][previous]["computed"]
            assert 0 < computed < 4 and manifest["stages"][previous]["reused"] == 4 - computed
            items = recorded(out / "r")
            computed_items = which(items, previous, "computed")
            assert len(computed_items) == computed
            assert which(items, previous, "reused") == [i for i in range(4) if i not in computed_items]
    images_before = written_keys(store, "decode")

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    assert main(["resume", str(out / "r")]) == 0
    manifest = json.loads((out / "r" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["store"] == str(store)
    items = read_items(out / "r")
    done_before = [item["index"] for item in items if item["keys"]["images"] in images_before]
    assert did(manifest, "encode") == (True, 0, 4)
    assert did(manifest, "denoise") == (True, 0, 4)
    assert did(manifest, "decode") == (False, 4 - len(done_before), len(done_before))
    assert images_computed_by(manifest, items) == [i for i in range(4) if i not in done_before]
    assert "encode   no process: all 4 items in the store" in capsys.readouterr().out
    assert_same_as(reference, out / "r")


def test_two_concurrent_runs_over_one_store_compute_every_artifact_once(
    reference: dict, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAGEDIFF_TEST_BATCH_DELAY", "0.3")
    store, out = tmp_path / "store", tmp_path / "out"
    # b shares a's prompt 1 entirely (same seed) and a's prompt 2's embeddings only (another seed)
    prompts = {"a": PROMPTS[:3], "b": [PROMPTS[2], PROMPTS[1], "a green forest"]}
    manifests: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            manifests[name] = generate(tiny_model, out, name, store, prompts=prompts[name])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    items = {name: read_items(out / name) for name in manifests}
    for stage in FIELDS:
        kind = KINDS[stage]
        every_item = [item for run in items.values() for item in run]
        computed = Counter(item["keys"][kind] for item in every_item if item["made"][kind] == "computed")
        every = {item["keys"][kind] for item in every_item}
        assert set(computed) == every and set(computed.values()) == {1}, (stage, computed)
        # the stages' counts say the same as the items
        assert sum(m["stages"][stage]["computed"] for m in manifests.values()) == sum(computed.values()), stage
    assert len({item["keys"]["embeddings"] for run in items.values() for item in run}) == 4
    kwargs = dict(num_inference_steps=2, guidance_scale=3.5, height=64, width=64, max_sequence_length=16)
    for name in manifests:
        expected = reference_images(tiny_model, prompts[name], seed=5, **kwargs)
        for item, image in zip(items[name], expected, strict=True):
            np.testing.assert_array_equal(read_image(out / name / item["image"]), image)


def damage(store: Store, items: list[dict], index: int, field: str, how: str) -> str:
    """Damage one item's object in the store; return its path."""
    kind = {"embeddings": "embeddings", "latents": "latents", "image": "images"}[field]
    key = items[index]["keys"][kind]
    name = store.object_name(kind, key)
    data = store.load(kind, key)
    if how == "truncate":
        store.write(name, data[: len(data) // 2])
    elif how == "flip":
        store.write(name, data[:-9] + bytes([data[-9] ^ 0x10]) + data[-8:])
    else:  # foreign: another item's object with a record that claims to be this one
        other = items[(index + 1) % len(items)]["keys"][kind]
        record = json.loads(store.read(store.record_name(kind, other)))
        store.write(name, store.load(kind, other))
        store.write(store.record_name(kind, key), json.dumps({**record, "key": key}).encode())
    return store.path(name)


def test_damaged_artifacts_are_recomputed_with_a_warning_or_stop_a_strict_run(
    reference: dict, tiny_model: Path, tmp_path: Path, capsys, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL

    from stagediff.cli import main

    shutil.copytree(reference["store"], tmp_path / "store")
    store, out = Store(tmp_path / "store"), tmp_path / "out"
    items = reference["items"]
    damaged = {
        ("embeddings", 2): damage(store, items, 2, "embeddings", "flip"),
        ("latents", 1): damage(store, items, 1, "latents", "truncate"),
        ("image", 3): damage(store, items, 3, "image", "foreign"),
    }
    # An item whose image the store holds (verified) needs nothing of its earlier stages: without their images,
    # items 1 and 2 go through every stage, which finds their damaged embeddings and latents
    for index in (1, 2):
        key = items[index]["keys"]["images"]
        store.remove(store.record_name("images", key))
        store.remove(store.object_name("images", key))
    result = generate(tiny_model, out, "r", store.location)
    # Each damaged artifact was recomputed, nothing else; what depends on it was not (same key)
    made = read_items(out / "r")
    assert did(result, "encode") == (False, 1, 3) and result["stages"]["encode"]["damaged"] == 1
    assert [item["made"]["embeddings"] for item in made[1:]] == ["reused", "recomputed", "reused"]
    assert did(result, "denoise") == (False, 1, 3) and result["stages"]["denoise"]["damaged"] == 1
    assert [item["made"]["latents"] for item in made[1:]] == ["recomputed", "reused", "reused"]
    assert did(result, "decode") == (False, 3, 1) and result["stages"]["decode"]["damaged"] == 1
    assert [item["made"]["images"] for item in made] == ["reused", "computed", "computed", "recomputed"]
    assert_same_as(reference, out / "r")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for path in damaged.values():
        assert any(path in w and "computing it again" in w for w in warnings), (path, warnings)

    # --strict: the run stops at the first damaged artifact, naming it, before any stage process, and a
    # refusal changes nothing: no record for a new run, the completed run's record as it was
    path = damage(store, items, 0, "latents", "flip")
    with pytest.raises(ArtifactError, match=f"artifact {path} is corrupted"):
        generate(tiny_model, out, "strict", store.location, strict=True)
    assert not (out / "strict").exists()
    record = (out / "r" / "manifest.json").read_bytes()
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    assert main(["resume", str(out / "r"), "--strict"]) == 1
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith(f"stagediff: error: artifact {path} is corrupted")
    )
    assert (out / "r" / "manifest.json").read_bytes() == record


def test_only_decode_changes_load_no_text_encoder_and_no_transformer(
    reference: dict, tiny_model: Path, tmp_path: Path
) -> None:
    shutil.copytree(reference["store"], tmp_path / "store")
    # Same text encoders and transformer, another VAE of the same shape
    other_vae = tmp_path / "other-vae"
    shutil.copytree(tiny_model, other_vae)
    shutil.rmtree(other_vae / "vae")
    shutil.copytree(build_tiny_flux(tmp_path / "seed7", TinyFluxConfig(seed=7)) / "vae", other_vae / "vae")
    manifest = generate(other_vae, tmp_path / "out", "vae", tmp_path / "store")
    assert did(manifest, "encode") == (True, 0, 4)
    assert did(manifest, "denoise") == (True, 0, 4)
    assert did(manifest, "decode") == (False, 4, 0)
    assert tensors(files_of(tmp_path / "out" / "vae", "latents")) == tensors(reference["latents"])
    assert files_of(tmp_path / "out" / "vae", "image") != reference["image"]
    # Only the steps change: the embeddings are reused
    manifest = generate(tiny_model, tmp_path / "out", "steps", tmp_path / "store", steps=3)
    assert did(manifest, "encode") == (True, 0, 4)
    assert did(manifest, "denoise")[1] == 4


def test_a_store_at_an_fsspec_url(reference: dict, tiny_model: Path, tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    first = generate(tiny_model, tmp_path / "out", "one", url, prompts=PROMPTS[:2])
    again = generate(tiny_model, tmp_path / "out", "two", url, prompts=PROMPTS[:2])
    assert [did(first, s)[1] for s in FIELDS] == [2] * 3
    assert [did(again, s)[0] for s in FIELDS] == [True] * 3
    run_dir = tmp_path / "out" / "two"
    assert files_of(run_dir, "image") == reference["image"][:2]
    store = Store(url)
    image = store.path(store.object_name("images", read_items(run_dir)[0]["keys"]["images"]))
    assert not os.path.samefile(image, run_dir / "images" / "00000.png")  # URL stores copy


def test_a_flow_run_with_retries_runs_again_after_a_transient_failure_reusing_the_store(
    prefect_server, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a deployment's run does (prefect.yaml: PREFECT_FLOW_DEFAULT_RETRIES): the failed attempt's artifacts are
    the next attempt's; bad input fails at once, never retried."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    import stagediff.flows.generate as module
    from stagediff.request import ImageSettings, Output, Placement, Prompts, RequestError
    from stagediff.run_manifest import RunFolder

    on_stored, failed = RunFolder.on_stored, []

    def flaky_on_stored(self, stored) -> None:
        on_stored(self, stored)
        if stored.stage == "denoise" and not failed:  # encode's and denoise's artifacts are in the store by now
            failed.append(stored.stage)
            raise ConnectionError("the Prefect server went away for a moment")

    monkeypatch.setattr(RunFolder, "on_stored", flaky_on_stored)
    flow = module.generate.with_options(retries=1, retry_delay_seconds=0)
    settings = ImageSettings(**{k: v for k, v in SETTINGS.items() if k != "seed"})
    prompts = Prompts(prompts=PROMPTS, seed=SETTINGS["seed"])
    output = Output(out=str(tmp_path / "out"), run_id="r", store=str(tmp_path / "store"))
    manifest = flow(prompts, settings, str(tiny_model), Placement(), output)
    assert failed == ["denoise"] and manifest["status"] == "completed"
    assert did(manifest, "encode") == (True, 0, 4) and did(manifest, "denoise") == (True, 0, 4)
    assert did(manifest, "decode") == (False, 4, 0)

    bad = Prompts(file=str(tmp_path / "missing.txt"))
    with pytest.raises(RequestError, match="invalid prompts_file="):
        flow(bad, settings, str(tiny_model), Placement(), Output(out=str(tmp_path / "out"), run_id="refused"))
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(UUID(manifest["flow_run_id"])).run_count == 2
        names = FlowRunFilter(name=FlowRunFilterName(any_=["generate refused"]))
        [refused] = client.read_flow_runs(flow_run_filter=names)
    assert refused.state.is_failed() and refused.run_count == 1 and refused.empirical_policy.retries == 0
