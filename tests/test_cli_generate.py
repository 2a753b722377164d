"""`stagediff generate` as a user runs it: a real subprocess against the session's Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import read_items
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

    assert "2 images in" in first.stdout and "(2 computed)" in first.stdout
    assert "2 images in" in second.stdout and "(0 computed)" in second.stdout
    manifests = [json.loads((out / run / "manifest.json").read_text()) for run in ("one", "two")]
    items = {run: read_items(out / run) for run in ("one", "two")}
    for manifest in manifests:
        assert manifest["status"] == "completed"
        assert manifest["model"] == str(cache / "models" / "tiny-flux-v1")
        listed = items[manifest["run_id"]]
        assert [(i["index"], i["prompt"], i["seed"]) for i in listed] == [(0, "a dog", 7), (1, "a cat", 8)]
        assert manifest["first_items"] == listed
        for item in listed:
            # the second run found every image in the store: only images are linked into its folder, and its
            # items name only those
            fields = ("image", "embeddings", "latents") if manifest["run_id"] == "one" else ("image",)
            assert [field for field in ("image", "embeddings", "latents") if field in item] == list(fields)
            for field in fields:
                assert not Path(item[field]).is_absolute()
                assert (out / manifest["run_id"] / item[field]).is_file(), (manifest["run_id"], field)
    for stage, kind in (("encode", "embeddings"), ("denoise", "latents"), ("decode", "images")):
        info = manifests[0]["stages"][stage]  # the first run computed everything, each stage in its own process
        assert info["pid"] > 0 and info["seconds"] > 0 and info["peak_rss_mb"] > 50 and info["computed"] == 2
        assert [item["made"][kind] for item in items["one"]] == ["computed", "computed"]
        assert not Path(f"/proc/{info['pid']}").exists()  # the stage process is gone
        again = manifests[1]["stages"][stage]  # the second found it all in the shared store (OUT/.store)
        assert again["skipped"] and again["pid"] is None and again["reused"] == 2 and again["computed"] == 0
    assert [item["made"]["images"] for item in items["two"]] == ["reused", "reused"]
    for a, b in zip(items["one"], items["two"], strict=True):
        np.testing.assert_array_equal(read_image(out / "one" / a["image"]), read_image(out / "two" / b["image"]))
