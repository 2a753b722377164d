"""The device slot as `make server` and `make deploy` set it up, through a server restart: a real server on a
loopback port, the `device:local` limit of 1, a flow run holding its slot and a `stagediff generate` waiting
for it, then the server restarted while the slot is held."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import makefile_env
from tests.test_deployments import DEVICE_TAG, REPO, free_port, stop, tail

HOLDER = """
import sys, time
from pathlib import Path
from prefect import flow, task

@task(name="hold", tags=[sys.argv[3]])
def hold(held: str, release: str) -> None:
    Path(held).write_text("held")
    deadline = time.monotonic() + 300
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.2)

@flow(name="holder")
def holder(held: str, release: str) -> None:
    hold(held, release)

holder(sys.argv[1], sys.argv[2])
"""


def wait_for(what: str, check, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{tail(log) if log else ''}"
        time.sleep(0.3)


def test_a_server_restart_while_a_stage_holds_the_device_slot_leaves_the_next_run_running(
    tiny_model: Path, stagediff_cache: Path, tmp_path: Path
) -> None:
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(makefile_env())  # as `make server` and `make worker` run
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", STAGEDIFF_CACHE=str(stagediff_cache),
               PYTHONPATH=str(REPO))  # fmt: skip
    logs: dict[str, Path] = {}
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        process = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=logs[name].open("w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        started.append(process)
        return process

    def healthy() -> bool:
        try:
            return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def slots() -> list[str]:
        return httpx.get(f"{api_url}/concurrency_limits/tag/{DEVICE_TAG}", timeout=10).json()["active_slots"]

    prefect = [sys.executable, "-m", "prefect"]
    held, release = tmp_path / "held", tmp_path / "release"
    try:
        server = start("server", *prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_for("the server", healthy, 180, logs["server"])
        limit = start("limit", *prefect, "concurrency-limit", "create", DEVICE_TAG, "1")  # as `make deploy` does
        assert limit.wait(120) == 0, tail(logs["limit"])
        holder = start("holder", sys.executable, "-c", HOLDER, str(held), str(release), DEVICE_TAG)
        wait_for("the holder to take the slot", held.exists, 120, logs["holder"])
        assert len(slots()) == 1

        # The server restarts while the slot is held
        stop(server)
        server = start("server-again", *prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_for("the restarted server", healthy, 180, logs["server-again"])

        # A run started now waits for the slot and says so, naming who holds it
        run = start("generate", sys.executable, "-m", "stagediff.cli", "generate", "--model", str(tiny_model),
                    "--prompt", "a dog", "--steps", "1", "--height", "64", "--width", "64",
                    "--max-sequence-length", "8", "--out", str(tmp_path / "out"), "--run-id", "next")  # fmt: skip
        waiting = f"encode [chunk 1] waits for a slot of {DEVICE_TAG} (limit 1, 1 in use: task run 'hold"
        wait_for("the waiting line", lambda: waiting in logs["generate"].read_text(), 180, logs["generate"])
        assert run.poll() is None and not (tmp_path / "out" / "next" / "images").exists()

        # The holder ends: its slot goes back, and the waiting run goes on within a minute
        release.write_text("go")
        assert holder.wait(60) == 0, tail(logs["holder"])
        assert run.wait(60) == 0, tail(logs["generate"])
        assert (tmp_path / "out" / "next" / "images" / "00000.png").exists()
        assert slots() == []
    finally:
        for process in reversed(started):
            if process.poll() is None:
                stop(process)
