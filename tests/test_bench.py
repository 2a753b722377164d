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
