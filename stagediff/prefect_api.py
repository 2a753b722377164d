"""Which Prefect API the CLI talks to, decided before Prefect is imported.

A configured API (`PREFECT_API_URL` in the environment or the active profile) is used as it is.
Otherwise a server answering on the default local port is reused; failing that, Prefect runs in
ephemeral mode, which starts a temporary server first (~10 s here, ~20 s on first use).
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

LOCAL_API = "http://127.0.0.1:4200/api"


def configured_api_url() -> str | None:
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml"))
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def server_is_up(api_url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def server_answers(api_url: str, timeout: float = 3.0) -> bool:
    """Whether anything answers HTTP at `api_url` (an error status counts: a server is there)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def choose_api() -> str | None:
    """Set PREFECT_API_URL to a running local server when none is configured; return the API in use.

    A configured API that nothing answers is a one-line RequestError (before anything is written)."""
    url = configured_api_url()
    if url:
        if not server_answers(url):
            from stagediff.request import RequestError

            allowed = "no Prefect server answers there: start it (`prefect server start`) or unset the setting"
            raise RequestError("PREFECT_API_URL", url, allowed)
        return url
    if server_is_up(LOCAL_API):
        os.environ["PREFECT_API_URL"] = LOCAL_API
        return LOCAL_API
    print(
        "stagediff: no Prefect server configured or running on 127.0.0.1:4200; using Prefect's ephemeral mode, "
        "which starts a temporary server first (~10-20 s). `prefect server start` once and runs start at once.",
        file=sys.stderr,
    )
    return None
