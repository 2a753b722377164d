"""The store without models: objects verified before use, damage detected every time, one claim per
key across processes, keys that change exactly when their inputs do, and gc."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from stagediff import keys
from stagediff.artifacts import ArtifactError, Store
from stagediff.cli import main
from stagediff.collect import collect_garbage, parse_age
from stagediff.collect import root_keys as collect_root_keys
from stagediff.jobs import DenoiseSettings
from stagediff.record import Record, write_summary
from stagediff.request import RequestError, check_store

KEY_A, KEY_B = "a" * 64, "b" * 64


def put_embeddings(store: Store, key: str, value: float = 1.0) -> None:
    store.save_tensors("embeddings", key, {"prompt_embeds": torch.full((4, 8), value)}, {"model": "m"})


def put_image(store: Store, key: str) -> None:
    store.save_png("images", key, Image.new("RGB", (8, 8), (10, 20, 30)), {"model": "m"})


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(tmp_path / "store")
    return Store(f"memory://{tmp_path.name}/store")  # the fsspec code path, in one process


def test_round_trip_and_links_into_a_run(store: Store, tmp_path: Path) -> None:
    assert store.check("embeddings", KEY_A) is None
    put_embeddings(store, KEY_A)
    put_image(store, KEY_B)
    record = store.check("embeddings", KEY_A)
    assert record is not None and record.metadata["key"] == KEY_A
    assert torch.equal(store.load_tensors("embeddings", KEY_A)["prompt_embeds"], torch.ones(4, 8))
    dest = tmp_path / "run" / "images" / "00000.png"
    store.materialize("images", KEY_B, dest)
    assert dest.read_bytes() == store.load("images", KEY_B)
    if store.local:  # a hard link to the object, no copy; no temporary file left behind
        assert os.path.samefile(dest, store.path(store.object_name("images", KEY_B)))
        assert not [p for p in Path(store.root).rglob("*.tmp")]


def damage(store: Store, kind: str, key: str, how: str, at: int = 0) -> None:
    name = store.object_name(kind, key)
    data = store.load(kind, key)
    if how == "truncate":
        store.write(name, data[:at])
    elif how == "flip":
        store.write(name, data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    elif how == "missing":
        store.remove(name)
    elif how == "record":
        store.write(store.record_name(kind, key), b"{not json")


@pytest.mark.parametrize("kind", ["embeddings", "images"])
def test_truncated_flipped_missing_and_garbled_artifacts_are_detected_every_time(store: Store, kind: str) -> None:
    put = put_embeddings if kind == "embeddings" else put_image
    put(store, KEY_A)
    size = len(store.load(kind, KEY_A))
    cases = [("truncate", at) for at in (0, 1, 8, size // 2, size - 1)]
    cases += [("flip", at) for at in range(0, size, max(1, size // 40))] + [("flip", size - 1)]
    cases += [("missing", 0), ("record", 0)]
    for how, at in cases:
        damage(store, kind, KEY_A, how, at)
        with pytest.raises(ArtifactError, match=r"artifact (record )?\S+" + KEY_A):
            store.check(kind, KEY_A)
        assert not store.usable(kind, KEY_A)
        with pytest.raises(ArtifactError):
            store.load(kind, KEY_A)
        put(store, KEY_A)  # repaired for the next case
        assert store.check(kind, KEY_A) is not None


def test_a_foreign_artifact_with_a_matching_record_is_refused(store: Store) -> None:
    """Embeddings made for another key (e.g. by another text encoder) copied over, record and all."""
    put_embeddings(store, KEY_A, 1.0)
    put_embeddings(store, KEY_B, 2.0)
    foreign = store.load("embeddings", KEY_B)
    record = json.loads(store.read(store.record_name("embeddings", KEY_B)))
    store.write(store.object_name("embeddings", KEY_A), foreign)
    store.write(store.record_name("embeddings", KEY_A), json.dumps({**record, "key": KEY_A}).encode())
    with pytest.raises(ArtifactError, match=f"was made for key '{KEY_B}'"):
        store.check("embeddings", KEY_A)


def _compute(location: str, keys_: list[str], out: str) -> None:
    """A stand-in stage: claims the keys it finds missing, 'computes' them slowly, logs what it computed."""
    store = Store(location)
    computed = []
    for batch in store.claimed_batches("embeddings", keys_, lambda k: k, size=2):
        time.sleep(0.2)
        for key in batch:
            put_embeddings(store, key)
            computed.append(key)
    Path(out).write_text(json.dumps(computed))


def test_two_processes_over_one_store_compute_every_key_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    every = [f"{i:02d}" + "0" * 62 for i in range(10)]
    first, second = every[:7], every[3:] + every[3:5]  # overlapping, in different orders, with duplicates
    ctx = multiprocessing.get_context("spawn")  # forking this multi-threaded test process is unsafe
    procs = [
        ctx.Process(target=_compute, args=(store.location, first, str(tmp_path / "p0.json"))),
        ctx.Process(target=_compute, args=(store.location, second[::-1], str(tmp_path / "p1.json"))),
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    computed = [k for i in range(2) for k in json.loads((tmp_path / f"p{i}.json").read_text())]
    assert sorted(computed) == sorted(every)  # each key once, none missing
    assert all(store.check("embeddings", k) is not None for k in every)


def test_a_claim_is_exclusive_and_dies_with_its_process(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()

    def hold() -> None:
        claim = store.claim("latents", KEY_A, wait=False)
        assert claim is not None
        held.set()
        release.wait(30)
        os._exit(0)  # without releasing: the claim goes with the process

    proc = ctx.Process(target=hold)
    proc.start()
    assert held.wait(30)
    assert store.claim("latents", KEY_A, wait=False) is None
    assert list(store.claimed_batches("latents", [KEY_B], lambda k: k, size=1)) == [[KEY_B]]
    release.set()
    proc.join(30)
    claim = store.claim("latents", KEY_A, wait=False)
    assert claim is not None
    claim.release()


def test_keys_change_exactly_when_their_inputs_do(tiny_model: Path, tmp_path: Path) -> None:
    model = keys.model_identity(tiny_model)
    s = DenoiseSettings(steps=2, guidance=3.5, height=64, width=64, max_sequence_length=16)
    e = keys.embeddings_key(model, "a dog", None, 16, "float32")
    lat = keys.latents_key(e, model, s, 7, "float32")
    img = keys.image_key(lat, model, False, False, "float32")
    assert keys.embeddings_key(model, "a cat", None, 16, "float32") != e
    assert keys.embeddings_key(model, "a dog", "blurry", 16, "float32") != e
    assert keys.embeddings_key(model, "a dog", None, 16, "bfloat16") != e
    assert keys.latents_key(e, model, replace(s, steps=3), 7, "float32") != lat  # steps: new latents only
    assert keys.latents_key(e, model, replace(s, true_cfg_scale=4.0), 7, "float32") != lat
    assert keys.latents_key(e, model, replace(s, original_size=(32, 32)), 7, "float32") != lat
    assert keys.latents_key(e, model, s, 8, "float32") != lat
    assert keys.image_key(lat, model, True, False, "float32") != img  # tiled decoding
    # Another VAE: only the image key changes
    other = tmp_path / "other-vae"
    shutil.copytree(tiny_model, other)
    weights = next((other / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    changed = keys.model_identity(other)
    assert (changed.text, changed.denoiser) == (model.text, model.denoiser) and changed.decoder != model.decoder
    assert keys.image_key(lat, changed, False, False, "float32") != img


def test_file_hashes_are_cached_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(keys, "sha256_file", lambda p: calls.append(p) or f"sha-of-{Path(p).read_text()}")
    weights = tmp_path / "w.safetensors"
    weights.write_text("one")
    cache = tmp_path / "fingerprints.json"
    hashes = keys.FileHashes(cache)
    assert hashes.sha256(weights) == "sha-of-one"
    hashes.save()
    assert keys.FileHashes(cache).sha256(weights) == "sha-of-one"
    assert len(calls) == 1  # the second instance read it from the cache file
    weights.write_text("two")
    os.utime(weights, ns=(time.time_ns() + 10**9,) * 2)
    assert keys.FileHashes(cache).sha256(weights) == "sha-of-two" and len(calls) == 2


def write_run(tmp_path: Path, store: Store, name: str, referenced: list[str], legacy: bool = False) -> Path:
    """A completed run folder that references `referenced` (embeddings keys), registered in the store: its record
    (record.db) and summary, or (`legacy`) a manifest from before run records, which listed every item inline."""
    run = tmp_path / "out" / name
    run.mkdir(parents=True)
    if legacy:
        items = [{"index": i, "keys": {"embeddings": k}} for i, k in enumerate(referenced)]
        (run / "manifest.json").write_text(json.dumps({"run_id": name, "items": items}))
        store.register_run(run / "manifest.json")
        return run
    record = Record(run / "record.db", "run")
    record.start_run({"status": "running"})
    record.listed([{"id": f"{i:05d}", "idx": i, "line": None, "prompt": "p", "negative_prompt": None, "seed": i,
                    "settings": "{}", "key_embeddings": k, "key_latents": None, "key_images": None}
                   for i, k in enumerate(referenced)])  # fmt: skip
    record.finish("completed")
    write_summary(run / "manifest.json", {"format": 2, "run_id": name, "record": "record.db"})
    record.close()
    store.register_run(run / "manifest.json", {"record": str(run / "record.db")})
    return run


def test_gc_removes_only_unreferenced_old_artifacts(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    every = [f"{i:02d}" + "c" * 62 for i in range(4)]
    for key in every:
        put_embeddings(store, key)
    kept_run = write_run(tmp_path, store, "kept", every[:1])
    old_run = write_run(tmp_path, store, "old", every[1:2], legacy=True)
    gone_run = write_run(tmp_path, store, "gone", every[2:3])
    shutil.rmtree(gone_run)
    size = sum(store.stat(n)[0] for n in store.list("objects") if every[2] in n or every[3] in n)

    # Dry run: reports, removes nothing
    assert main(["gc", store.location, "--older-than", "0s", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 4 files" in out and every[3] in out and "forgot 1 runs" in out
    assert all(store.check("embeddings", k) for k in every) and len(store.runs()) == 3
    # Too young: no artifact goes, but the registration of the deleted run does
    assert main(["gc", store.location, "--older-than", "7d"]) == 0
    out = capsys.readouterr().out
    assert "removed 0 files" in out and "forgot 1 runs" in out
    # For real: the unreferenced two go, with their records, and their bytes are reported
    report = collect_garbage(store, older_than=0)
    assert (report.runs, report.forgotten_runs, report.referenced) == (2, 0, 2)
    assert len(report.removed) == 4 and report.freed_bytes == size
    assert [k for k in every if store.check("embeddings", k)] == every[:2]
    manifests = sorted(entry["manifest"] for entry in store.runs().values())
    assert manifests == [str(kept_run / "manifest.json"), str(old_run / "manifest.json")]
    # Deleting the last runs frees the rest
    shutil.rmtree(kept_run)
    (old_run / "manifest.json").unlink()
    assert len(collect_garbage(store, older_than=0).removed) == 4
    assert store.list("objects") == []


def test_bad_gc_and_store_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert parse_age("7d") == 7 * 86400 and parse_age("30m") == 1800
    assert main(["gc", str(tmp_path), "--older-than", "a week"]) == 2
    assert capsys.readouterr().err.startswith("stagediff: error: invalid older_than='a week'")
    assert main(["gc", str(tmp_path / "nope")]) == 2
    assert "invalid store=" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "no-run")]) == 2
    assert capsys.readouterr().err.startswith("stagediff: error: invalid run=")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in (str(a_file), "nosuchproto://bucket/x"):
        with pytest.raises(RequestError, match="invalid store="):
            check_store(bad, "out")
        out = tmp_path / "out"
        args = ["generate", "--prompt", "a dog", "--out", str(out), "--store", bad]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("stagediff: error: invalid store=") and len(err.splitlines()) == 1
        assert not out.exists()


def test_the_flow_side_never_imports_torch() -> None:
    code = (
        "import sys, stagediff.flows.generate, stagediff.flows.batch, stagediff.collect, stagediff.keys, "
        "stagediff.engine, stagediff.run_manifest, stagediff.artifacts.store; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_run_that_registers_is_never_forgotten_before_its_folder_exists(tiny_model: Path, tmp_path: Path) -> None:
    """gc forgets a registration whose folder holds neither summary nor record: a run that has just registered
    (its folder not yet written) or one on another machine that shares the store keeps what it will use."""
    from types import SimpleNamespace

    from stagediff.flows.running import register_root
    from stagediff.request import validate_request
    from stagediff.sources import store_inline

    store = Store(str(tmp_path / "store"))
    request = validate_request(prompts=["a dog", "a cat"], run_id="r", seed=3, out=str(tmp_path / "out"),
                               model=str(tiny_model), steps=1, height=64, width=64)  # fmt: skip
    ctx = SimpleNamespace(model=request.model, variant=None, dtype="float32", levers="", encode_levers="")
    engine = SimpleNamespace(ctx=ctx, tiled_decode=False, sliced_decode=False, metadata=True)
    source = store_inline(store, request.prompts)
    register_root(store, request.run_dir / "manifest.json", engine, source, request=request)
    assert (request.run_dir / "record.db").exists()  # before the registration: gc sees the run at once
    (entry,) = store.runs().values()
    needed = sorted(collect_root_keys(store, entry["root"]))
    assert len(needed) == 2 * 3  # embeddings, latents and image of each item
    for kind, key in (("embeddings", needed[0]), ("latents", needed[1])):
        put_embeddings(store, key) if kind == "embeddings" else store.save_tensors(kind, key, {"x": torch.ones(1)}, {})
    old = time.time() - 30 * 86400
    for path in (tmp_path / "store" / "objects").rglob("*"):
        os.utime(path, (old, old))
    report = collect_garbage(store, older_than=0)
    assert report.forgotten_runs == 0 and [n for n in report.removed if needed[0] in n or needed[1] in n] == []

    # the same registration from another machine, its folder not visible here: kept; from this one: forgotten
    shutil.rmtree(request.run_dir)
    name = next(iter(store.runs()))
    store.write(name, json.dumps({**entry, "host": "another-machine"}).encode())
    report = collect_garbage(store, older_than=0)
    assert (report.forgotten_runs, report.elsewhere, report.removed) == (0, 1, [])
    assert "kept 1 runs of other machines" in report.summary()
    store.write(name, json.dumps(entry).encode())
    report = collect_garbage(store, older_than=0)
    assert report.forgotten_runs == 1 and len(report.removed) > 0 and store.runs() == {}
