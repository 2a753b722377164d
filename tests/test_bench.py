"""The overhead benchmark runs in its quick mode and writes its JSON (no timing assertions in CI)."""

from __future__ import annotations

import json
from pathlib import Path


def test_overhead_benchmark_quick_mode(prefect_server, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    from bench import overhead

    out = tmp_path / "overhead.json"
    overhead.main(["--quick", "--json", str(out), "--api-url", PREFECT_API_URL.value()])
    result = json.loads(out.read_text())
    assert result["repeats"] == 1
    for method in ("forkserver", "spawn"):
        for stage in ("encode", "denoise", "decode"):
            entry = result["stages"][f"{method}/{stage}"]
            assert entry["startup_median"] >= 0 and entry["seconds_median"] > 0
    assert result["orchestration"]["flow_wall_median"] > 0
    assert set(result["end_to_end"]) >= {"stagediff", "diffusers", "ratio_median"}
    assert result["machine"]["cores"] >= 1


def test_resume_benchmark_remaining_work_script(prefect_server, tiny_model: Path, tmp_path: Path) -> None:
    """bench.resume's stand-in for the work left after a crash runs on a real run's folder and store."""
    import os
    import shutil
    import subprocess
    import sys

    from bench.resume import REMAINING_SCRIPT
    from stagediff.artifacts import Store
    from tests.conftest import read_items
    from tests.reference import run_generate

    run_generate(prompts=["a red dog", "a cat"], model=str(tiny_model), steps=1, height=128, width=128,
                 out=str(tmp_path), run_id="r", store=str(tmp_path / "store"))  # fmt: skip
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "store", alone)
    missing = read_items(tmp_path / "r")[1]["keys"]["latents"]  # as if the crash came before this item's latents
    store = Store(str(alone))
    for name in (store.object_name("latents", missing), store.record_name("latents", missing)):
        os.remove(store.path(name))
    assert store.check("latents", missing) is None
    subprocess.run([sys.executable, "-c", REMAINING_SCRIPT, str(tmp_path / "r"), str(alone)], check=True, timeout=300)
    assert store.check("latents", missing) is not None
