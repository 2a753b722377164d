"""`stagediff batch` as a user runs it: a real subprocess against the session's Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import read_items

ARGS = ["--steps", "1", "--height", "64", "--width", "64", "--max-sequence-length", "16", "--chunk-size", "2"]


def stagediff_batch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stagediff.cli", "batch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_every_bad_line_is_reported_before_prefect_or_torch_is_imported(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,steps,height\na dog,4,64\na cat,zero,64\n,4,65\n", encoding="utf-8")
    store = tmp_path / "store"
    code = (
        "import atexit, sys; from stagediff.cli import run; "
        "atexit.register(lambda: print('torch' in sys.modules, 'prefect' in sys.modules)); run()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "batch", str(prompts), "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    assert "3 problem(s)" in proc.stderr and "nothing was computed" in proc.stderr
    assert "line 3" in proc.stderr and "line 4" in proc.stderr and "line 2" not in proc.stderr
    assert not store.exists()

    bad_chunk = stagediff_batch(str(prompts), "--chunk-size", "0", "--store", str(store))
    assert bad_chunk.returncode == 2
    assert bad_chunk.stderr.strip() == "stagediff: error: invalid chunk_size=0: must be an integer >= 1"


def test_a_file_then_the_lines_appended_to_it(prefect_server, tiny_model: Path, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    prompts, store = tmp_path / "prompts.txt", tmp_path / "store"
    prompts.write_text("a dog\na cat\n", encoding="utf-8")
    common = [str(prompts), "--store", str(store), "--model", str(tiny_model), *ARGS]

    first = stagediff_batch(*common, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 items in" in first.stdout and "2 computed, 0 done before" in first.stdout

    with prompts.open("a", encoding="utf-8") as f:
        f.write("a red fox\n")
    second = stagediff_batch(*common, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 items in" in second.stdout and "1 computed, 2 done before" in second.stdout

    summary = json.loads((store / "batch.json").read_text())
    items = read_items(store)
    assert [entry["prompt"] for entry in items] == ["a dog", "a cat", "a red fox"]
    assert all(entry["status"] == "done" for entry in items)
    assert all((store / entry["image"]).is_file() for entry in items)
    assert [(entry["run"], entry["made"]["images"]) for entry in items] == [(1, "computed")] * 2 + [(2, "computed")]
    assert summary["first_items"] == items and summary["counts"]["done"] == 3
    assert [(run["computed"], run["done"]) for run in summary["runs"]] == [(2, 2), (1, 3)]
