"""The run manifest: `OUT/RUN/manifest.json`, rewritten atomically after every stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stagediff.artifacts.files import atomic_write_bytes

MANIFEST_NAME = "manifest.json"


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(run_dir) / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return path


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / MANIFEST_NAME).read_text())
