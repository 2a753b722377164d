"""Shared fixtures: one Prefect test server for the session, tiny models built once, a throwaway cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Prefect sets up its console logging when first imported, bound to the sys.stderr of that moment: import it
# now, under pytest's session-long capture, not inside a test whose capsys stream is closed after it.
import prefect  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def stagediff_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the default-model cache of the tests out of the user's home."""
    path = tmp_path_factory.mktemp("stagediff-cache")
    os.environ["STAGEDIFF_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (temporary database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Flux model, written to disk once."""
    from stagediff.tiny_model import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


def read_items(folder: str | Path) -> list[dict]:
    """Every item of a completed run (OUT/RUN) or batch folder (STORE): its items.jsonl, in index order
    (a batch's removed items last)."""
    import json

    return [json.loads(line) for line in (Path(folder) / "items.jsonl").read_text(encoding="utf-8").splitlines()]


def makefile_env() -> dict[str, str]:
    """The `export NAME ?= VALUE` settings of the Makefile: the servers and workers the tests start run as
    `make server` and `make worker` run them."""
    import re

    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    return dict(re.findall(r"^export (\w+) \?= (.+)$", text, flags=re.MULTILINE))
