"""Runs of any size: a record whose cost per chunk does not grow, streamed and checked inputs, gc that keeps
what running runs need, cancel that ends a large run promptly, old run folders read or refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stagediff.record import Record, item_row, write_summary
from tests.conftest import read_items

ARGS = ["--steps", "1", "--height", "64", "--width", "64", "--max-sequence-length", "8", "--batch-size", "4"]


def stagediff(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagediff.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


def server_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def written_bytes() -> int:
    """Bytes this process has handed to write() so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


@dataclass(frozen=True)
class FakeSettings:
    steps: int = 1
    height: int = 64
    width: int = 64


@dataclass(frozen=True)
class FakeItem:
    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    settings: FakeSettings


def write_chunk(record: Record, summary: Path, start: int, size: int = 64) -> None:
    """One chunk's bookkeeping as a run does it: its rows, then each stage's artifacts, then the summary."""
    rows, made = [], {}
    for i in range(start, start + size):
        keys = {kind: f"{kind[0]}{i:063d}" for kind in ("embeddings", "latents", "images")}
        rows.append(item_row(FakeItem(i, f"a photo of item {i}", None, i, FakeSettings()), keys, f"{i:05d}"))
        made[f"{i:05d}"] = (f"{i:064x}", "computed")
    record.listed(rows)
    for kind in ("embeddings", "latents", "images"):
        record.stored(kind, made)
    write_summary(summary, {"progress": record.progress(), "first_items": record.first(100)})


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes through /proc/self/io (Linux)")
def test_the_record_of_a_chunk_costs_the_same_at_item_1000_and_at_item_200000(tmp_path: Path) -> None:
    record = Record(tmp_path / "record.db", "run")
    record.start_run({"status": "running"})
    summary = tmp_path / "manifest.json"
    costs = {}
    for at in (1_000, 200_000):
        start = len(costs) and 1_000 + 64 * 10
        while start < at:  # fill the record up to `at` items, as a run would
            write_chunk(record, summary, start)
            start += 64
        before = written_bytes()
        for n in range(10):
            write_chunk(record, summary, at + 64 * n)
        costs[at] = (written_bytes() - before) / 10
    # SQLite's WAL checkpoints come every ~1000 pages: averaged over 10 chunks, a small constant apart
    assert costs[200_000] < 1.3 * costs[1_000] + 16_384, costs
    assert summary.stat().st_size < 200_000  # the summary does not grow with the run either
    assert record.progress()["images_so_far"] > 200_000


def test_an_image_found_after_this_run_made_its_parts_leaves_them_computed_one_found_first_makes_all_reused(
    tmp_path: Path,
) -> None:
    # Two runs over one store: this run encoded and denoised item 0, then the other run stored its image first.
    record = Record(tmp_path / "record.db", "run")
    record.start_run({"status": "running"})
    keys = {kind: f"{kind[0]}{0:063d}" for kind in ("embeddings", "latents", "images")}
    record.listed([item_row(FakeItem(i, f"item {i}", None, i, FakeSettings()), keys, f"{i:05d}") for i in (0, 1)])
    for kind in ("embeddings", "latents"):
        record.stored(kind, {"00000": ("e" * 64, "computed")})
    record.stored("images", {"00000": ("a" * 64, "reused")})
    record.stored("images", {"00001": ("a" * 64, "reused")}, whole=True)  # found before any stage ran
    made = {item["id"]: item["made"] for item in record.items()}
    assert made["00000"] == {"embeddings": "computed", "latents": "computed", "images": "reused"}, made
    assert made["00001"] == {"embeddings": "reused", "latents": "reused", "images": "reused"}, made


@pytest.mark.parametrize("layout", ["run", "batch"])
def test_items_jsonl_is_every_items_entry_in_request_order(tmp_path: Path, layout: str) -> None:
    record = Record(tmp_path / "record.db", layout)
    record.start_run({"status": "running"})
    odd = 'quote " backslash \\ newline \n tab \t \u2028 \u2029 \x85 \x1c \x01 é 猫 🐱'
    rows = [item_row(FakeItem(i, f"{odd} {i}", None if i % 2 else "blurry", i * 7, FakeSettings()),
                     {kind: f"{kind[0]}{i:063d}" for kind in ("embeddings", "latents", "images")}, f"id-{i}",
                     None if layout == "run" else i + 1) for i in (3, 1, 2, 0)]  # fmt: skip
    record.listed(rows)
    record.stored("embeddings", {"id-0": ("e" * 64, "computed"), "id-1": ("f" * 64, "reused")})
    record.stored("images", {"id-0": ("a" * 64, "computed")}, {"id-0": "1:2:3:4"})
    record.finish("completed" if layout == "batch" else "failed", None)
    path = record.export(tmp_path / "items.jsonl")
    exported = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert exported == list(record.items())  # what the summary's first items show, member for member
    assert [list(entry) for entry in exported] == [list(entry) for entry in record.items()]  # in the same order
    assert [entry["index"] for entry in exported] == [0, 1, 2, 3] and exported[0]["prompt"] == f"{odd} 0"
    assert ("line" in exported[0]) == (layout == "batch") and ("embeddings" in exported[0]) == (layout == "run")
    assert "embeddings" not in exported[2]


def test_a_200000_line_file_with_a_bad_line_near_its_end_is_refused_naming_it_before_any_stage(
    tmp_path: Path,
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w", encoding="utf-8") as f:
        for i in range(200_000):
            f.write(json.dumps({"prompt": f"item {i}", "steps": 1 if i != 199_990 else 0}) + "\n")
    store = tmp_path / "store"
    started = time.monotonic()
    proc = stagediff("batch", str(prompts), "--store", str(store), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "line 199991, column steps: invalid value 0: must be an integer from 1 to 1000" in proc.stderr
    assert "1 problem(s)" in proc.stderr and not store.exists()
    assert time.monotonic() - started < 60

    text = tmp_path / "prompts.txt"
    with text.open("w", encoding="utf-8") as f:
        f.writelines(f"item {i}\n" if i != 199_995 else "a\x00b\n" for i in range(200_000))
    proc = stagediff("generate", "--prompts-file", str(text), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and "line 199996 holds a NUL character" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_lines_end_with_newline_alone_unicode_separators_stay_in_their_prompt(tmp_path: Path) -> None:
    from stagediff.batch import read_batch_file
    from stagediff.sources import check_prompts_file

    separators = "\u2028\u2029\u0085\x0b\x0c"
    text = tmp_path / "p.txt"
    text.write_text("".join(f"before{s}after\n" for s in separators) + "last\r\n", encoding="utf-8")
    assert check_prompts_file(text)[0] == len(separators) + 1
    items = read_batch_file(text, seed=3)
    assert [i.prompt for i in items] == [f"before{s}after" for s in separators] + ["last"]
    assert [i.seed for i in items] == list(range(3, 3 + len(separators) + 1))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "raw\u2028separator"}\n', encoding="utf-8")
    assert [i.prompt for i in read_batch_file(jsonl, seed=0)] == ["raw\u2028separator"]


def test_a_sigterm_ends_a_large_batch_within_10_s_recorded_cancelled(
    prefect_server, tiny_model: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"item {i}\n" for i in range(200_000)), encoding="utf-8")
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "stagediff.cli", "batch", str(prompts), "--store", str(store),
           "--model", str(tiny_model), *ARGS]  # fmt: skip
    proc = subprocess.Popen(cmd, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((store / "images").glob("*.png"))[:1] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list((store / "images").glob("*.png")), "no image within 5 minutes"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        exited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    summary, output = json.loads((store / "batch.json").read_text()), proc.stdout.read()
    assert summary["status"] == "cancelled" and summary["runs"][-1]["status"] == "cancelled", (
        summary["runs"][-1],
        output[-3000:],
    )
    done = summary["counts"]["done"]
    assert 0 < done < 200_000 and done == len(list((store / "images").glob("*.png")))
    assert exited < 10, (exited, output[-3000:])


@pytest.mark.parametrize("kind", ["batch", "replicas", "torchrun"])
def test_gc_during_a_running_run_that_reuses_old_artifacts_deletes_nothing_it_needs(
    prefect_server, tiny_model: Path, tmp_path: Path, kind: str
) -> None:
    """`gc --older-than 0s` and the default `7d` in a loop while a batch, a batch of 2 replicas or 2 torchrun
    ranks runs over 12 lines, 8 of them made by an earlier run whose folder is gone and whose artifacts are
    aged 30 days: only the running run protects them, from before it reads its first artifact."""
    from stagediff.artifacts import Store
    from stagediff.collect import collect_garbage

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"item {i}\n" for i in range(8)), encoding="utf-8")
    model = ["--model", str(tiny_model), *ARGS, "--chunk-size", "4"]
    if kind == "torchrun":
        store, out = tmp_path / "store", tmp_path / "out"
        common = ["--prompts-file", str(prompts), *model, "--seed", "3", "--store", str(store), "--out", str(out)]
        first = stagediff("generate", *common, "--run-id", "first", env=server_env())
        folder, old_folder = out / "second", out / "first"
        port = str(free_port())
        command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", port, "-m", "stagediff.launch", *common,
                   "--run-id", "second"]  # fmt: skip
        objects = store / "objects"
    else:
        folder = old_folder = tmp_path / "batch"
        common = ["batch", str(prompts), "--store", str(folder), *model]
        first = stagediff(*common, env=server_env())
        command = [sys.executable, "-m", "stagediff.cli", *common, *(["--replicas", "2"] if kind == "replicas" else [])]
        objects = folder / ".store" / "objects"
    assert first.returncode == 0, first.stderr[-3000:]
    before = {item["index"]: read_image(old_folder / item["image"]) for item in read_items(old_folder)}
    # the first run's folder record is gone, the store's artifacts are old: only the running run protects them
    for name in ("batch.json", "batch.db", "items.jsonl", "manifest.json", "record.db"):
        (old_folder / name).unlink(missing_ok=True)
    old = time.time() - 30 * 86400
    for path in objects.rglob("*"):
        os.utime(path, (old, old))
    with prompts.open("a", encoding="utf-8") as f:
        f.write("".join(f"more {i}\n" for i in range(4)))
    env = {**server_env(), "STAGEDIFF_TEST_BATCH_DELAY": "0.5", "HF_HOME": str(tmp_path / "hf")}
    started = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    store_object = Store(str(objects.parent))
    removed = []
    try:
        while proc.poll() is None and not any(e["registered"] > started for e in store_object.runs().values()):
            time.sleep(0.05)  # until the run is a root: gc may remove what no run references before that
        while proc.poll() is None:
            removed += collect_garbage(store_object, older_than=0).removed
            removed += collect_garbage(store_object, older_than=7 * 86400).removed
            time.sleep(0.2)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((folder / ("manifest.json" if kind == "torchrun" else "batch.json")).read_text())
    assert (summary["counts"]["items"], summary["counts"]["computed_by_this_run"]) == (12, 4), output[-1500:]
    assert not [name for name in removed if "/images/" in name or "/latents/" in name], removed
    items = read_items(folder)
    assert len(items) == 12 and all((folder / item["image"]).exists() for item in items)
    for item in items[:8]:
        np.testing.assert_array_equal(read_image(folder / item["image"]), before[item["index"]])


def test_an_old_format_run_folder_is_resumed_and_a_garbled_one_refused_in_one_line(
    prefect_server, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    common = ["--model", str(tiny_model), *ARGS, "--out", str(out), "--seed", "5"]
    plain = stagediff("generate", "--prompt", "a dog", "--prompt", "a cat", *common, "--run-id", "new",
                      env=server_env())  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    summary = json.loads((out / "new" / "manifest.json").read_text())
    # a run folder as stagediff wrote it before run records: every item inline, no record
    old_dir = out / "old"
    old_dir.mkdir()
    items = [json.loads(line) for line in (out / "new" / "items.jsonl").read_text().splitlines()]
    old = {"run_id": "old", "model": summary["model"], "status": "running", "request": summary["request"],
           "items": [{"index": i["index"], "prompt": i["prompt"], "seed": i["seed"], "image": i["image"],
                      "keys": i["keys"], "sha256": dict.fromkeys(i["keys"])} for i in items],
           "stages": {}, "store": summary["store"], "model_hash": summary["model_hash"]}  # fmt: skip
    (old_dir / "manifest.json").write_text(json.dumps(old))
    resumed = stagediff("resume", str(old_dir), env=server_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (old_dir / "manifest.v1.json").exists()
    again = json.loads((old_dir / "manifest.json").read_text())
    assert again["format"] == 2 and again["status"] == "completed" and again["counts"]["done"] == 2
    assert again["counts"]["computed_by_this_run"] == 0  # every image was in the store
    listed = stagediff("items", str(old_dir), "--status", "done")
    assert [json.loads(line)["index"] for line in listed.stdout.splitlines()] == [0, 1], listed.stderr
    for name in ("00000.png", "00001.png"):
        np.testing.assert_array_equal(read_image(old_dir / "images" / name), read_image(out / "new" / "images" / name))

    garbled = out / "garbled"
    garbled.mkdir()
    (garbled / "manifest.json").write_text('{"items": [')
    refused = stagediff("resume", str(garbled))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "must be a run folder holding a manifest.json written by stagediff" in refused.stderr
