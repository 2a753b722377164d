"""The embedded default model: a tiny random FluxPipeline built once into a cache folder.

It makes noise images; it exists so that the whole product runs offline with no download.
"""

from __future__ import annotations

import os
from pathlib import Path

from stagediff.isolation import run_isolated

DEFAULT_MODEL_NAME = "tiny-flux-v1"


def cache_dir() -> Path:
    if os.environ.get("STAGEDIFF_CACHE"):
        return Path(os.environ["STAGEDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stagediff"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """Build the default model if it is not there yet; building runs in its own process too."""
    path = default_model_dir()
    if not (path / "model_index.json").exists():
        run_isolated("stagediff.tiny_model:build_tiny_flux", str(path), name="tiny-model")
    return path
