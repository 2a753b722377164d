"""A full disk mid-run: one line naming the file, the run recorded as failed (never left "running"), what was
stored kept and verified, and the same command completes once there is room again.

The disk fills where it does in real life for the store's writes: `fsync` of a new object fails with ENOSPC
(delayed allocation reports it there). A `sitecustomize` on PYTHONPATH makes every process of the run (the
command, the stage forkserver and its stages) see a full disk for one kind of object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from stagediff.artifacts import Store
from stagediff.record import Record
from tests.conftest import read_items

FULL_DISK = """
import errno, os
_fsync = os.fsync
def fsync(fd):
    where = os.environ.get("TEST_FULL_DISK_UNDER")
    if where and where in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _fsync(fd)
os.fsync = fsync
"""

ARGS = ["--prompt", "a dog", "--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64",
        "--max-sequence-length", "16", "--run-id", "full"]  # fmt: skip


def test_a_full_disk_is_one_line_the_run_failed_and_the_rerun_completes(prefect_server, tiny_model, tmp_path):
    from prefect.settings import PREFECT_API_URL

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FULL_DISK)
    out, store = tmp_path / "out", tmp_path / "store"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(hooks),
           "TEST_FULL_DISK_UNDER": f"{store}/objects/latents/"}  # fmt: skip
    cmd = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(tiny_model), *ARGS, "--out", str(out),
           "--store", str(store)]  # fmt: skip

    full = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert full.returncode == 1, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("stagediff: error: no space left on device writing ")
    assert f"{store}/objects/latents/" in last and "run the same command again" in last
    # (Prefect's run log above it carries the stage's traceback, as for any failed stage)
    manifest = json.loads((out / "full" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]
    assert manifest["stages"]["denoise"]["interrupted"]
    assert not list(store.rglob("*.tmp"))  # no partial file left behind
    assert not (out / "full" / "items.jsonl").exists()  # written when a run completes
    record = Record(out / "full" / "record.db", "run")
    items = list(record.items())
    record.close()
    assert [(item["index"], item["status"], item["made"]["embeddings"]) for item in items] == [
        (0, "failed", "computed"),
        (1, "failed", "computed"),
    ]
    embeddings = [Store(store).check("embeddings", item["keys"]["embeddings"]) for item in items]
    assert all(embeddings)  # what was stored before the disk filled is there and verifies

    env.pop("TEST_FULL_DISK_UNDER")
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((out / "full" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["stages"]["encode"]["reused"] == 2 and manifest["stages"]["denoise"]["computed"] == 2
    items = read_items(out / "full")
    assert [item["made"]["embeddings"] for item in items] == ["reused", "reused"]
    assert [item["made"]["latents"] for item in items] == ["computed", "computed"]
    assert [item["status"] for item in items] == ["done", "done"]
