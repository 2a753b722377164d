"""`stagediff generate` as a user runs it: a real subprocess against the session's Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.reference import read_image

ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--guidance", "3.5", "--seed", "7"]
ARGS += ["--max-sequence-length", "32", "--batch-size", "2"]


def stagediff(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stagediff.cli", "generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_runs_from_the_same_default_model_cache(prefect_server, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    cache = tmp_path / "cache"
    env = {**os.environ, "STAGEDIFF_CACHE": str(cache), "PREFECT_API_URL": PREFECT_API_URL.value()}
    out = tmp_path / "out"

    first = stagediff("--prompt", "a dog", "--prompt", "a cat", *ARGS, "--out", str(out), "--run-id", "one", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    model_index = cache / "models" / "tiny-flux-v1" / "model_index.json"
    built_at = model_index.stat().st_mtime_ns

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a dog\n\na cat\n")
    second = stagediff("--prompts-file", str(prompts_file), *ARGS, "--out", str(out), "--run-id", "two", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert model_index.stat().st_mtime_ns == built_at  # reused, not rebuilt

    manifests = [json.loads((out / run / "manifest.json").read_text()) for run in ("one", "two")]
    for manifest in manifests:
        assert manifest["status"] == "completed"
        assert manifest["model"] == str(cache / "models" / "tiny-flux-v1")
        assert [(i["index"], i["prompt"], i["seed"]) for i in manifest["items"]] == [(0, "a dog", 7), (1, "a cat", 8)]
        for item in manifest["items"]:
            for field in ("image", "embeddings", "latents"):
                assert not Path(item[field]).is_absolute()
                assert (out / manifest["run_id"] / item[field]).is_file()
    for stage in ("encode", "denoise", "decode"):
        info = manifests[0]["stages"][stage]  # the first run computed everything, each stage in its own process
        assert info["pid"] > 0 and info["seconds"] > 0 and info["peak_rss_mb"] > 50 and info["computed"] == [0, 1]
        assert not Path(f"/proc/{info['pid']}").exists()  # the stage process is gone
        again = manifests[1]["stages"][stage]  # the second found it all in the shared store (OUT/.store)
        assert again["skipped"] and again["pid"] is None and again["reused"] == [0, 1]
    for a, b in zip(manifests[0]["items"], manifests[1]["items"], strict=True):
        np.testing.assert_array_equal(read_image(out / "one" / a["image"]), read_image(out / "two" / b["image"]))
