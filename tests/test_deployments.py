"""End to end as users run it: `prefect server start`, `prefect deploy --all` from the repository root,
a process worker, and `prefect deployment run ... --watch`; results are read back through the API.

The server, the worker and the flow runs use a temporary PREFECT_HOME on a free loopback port; the
stage processes use the tiny model at tiny settings.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import numpy as np
import pytest

from stagediff.isolation import warm_up
from tests.conftest import makefile_env, read_items
from tests.reference import read_image

REPO = Path(__file__).resolve().parents[1]
POOL = "stagediff-process"
DEVICE_TAG = "device:local"
SMALL = {"steps": 2, "height": 64, "width": 64, "max_sequence_length": 16}
PROMPTS = ["a dog", "a cat", "a red forest", "blue sky", "city at night", "portrait"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@dataclass
class Stack:
    api_url: str
    env: dict[str, str]
    logs: Path

    def prefect(self, *args: str, cwd: Path = REPO) -> subprocess.Popen:
        """Start `prefect ARGS` in the background; `finish()` waits for it."""
        return subprocess.Popen([sys.executable, "-m", "prefect", *args], env=self.env, cwd=cwd, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip

    def start_deployment(self, name: str, params: dict[str, Any]) -> subprocess.Popen:
        """`prefect deployment run NAME --param k=v ... --watch`, in the background."""
        args = [arg for key, value in params.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
        return self.prefect("deployment", "run", name, *args, "--watch")

    def deployment_result(self, process: subprocess.Popen) -> tuple[int, UUID, str]:
        """Exit code, flow run id and output of a `prefect deployment run`."""
        code, output = finish(process)
        match = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert match, f"no flow run created:\n{output}\nworker log:\n{tail(self.logs / 'worker.log')}"
        return code, UUID(match.group(1)), output

    def run_deployment(self, name: str, params: dict[str, Any]) -> tuple[int, UUID, str]:
        return self.deployment_result(self.start_deployment(name, params))

    @contextmanager
    def client(self) -> Iterator[Any]:
        """A sync Prefect client of this server."""
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return process.returncode, output


def scheduled_runs(client: Any, deployment_id: UUID, timeout: float) -> list[Any]:
    """The deployment's Scheduled flow runs, once the server's scheduler has made some."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
    runs_filter = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]), state=state)
    deadline = time.monotonic() + timeout
    while not (runs := client.read_flow_runs(flow_run_filter=runs_filter)) and time.monotonic() < deadline:
        time.sleep(1)
    return runs


def succeeded(process: subprocess.Popen) -> None:
    code, output = finish(process)
    assert code == 0, f"{' '.join(process.args)} failed:\n{output}"


def drain_prefect_workers(api_url: str) -> None:
    """Send this process' queued events and logs before the server stops, as prefect_test_harness does: a
    worker left with a stopped server would hang the next harness' teardown, which drains every worker."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        with suppress(RuntimeError):  # not started
            APILogWorker.instance().drain()
        EventsWorker.drain_all()


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group we started (the server's API process, the worker's flow runs), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            break
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            process.wait(wait)
    with suppress(ProcessLookupError):  # children may outlive the leader; the group is still ours
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stagediff_cache: Path) -> Iterator[Stack]:
    """Server, work pool, device concurrency limit, deployments (`deploy --all`) and a process worker."""
    home = tmp_path_factory.mktemp("prefect-home")
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # nothing from the user's config
    env.update(makefile_env())  # as `make server` and `make worker` run
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        STAGEDIFF_CACHE=str(stagediff_cache),
        PWD=str(REPO),  # `prefect deploy` runs "from a shell in the repository root"
    )
    stack = Stack(api_url, env, logs)
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str, cwd: Path) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen([sys.executable, "-m", "prefect", *args], env=env, cwd=cwd, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        started.append(process)
        return process

    try:
        warm_up()  # the stage forkserver of the direct call imports torch while the server starts
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port), cwd=home)
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"prefect server exited:\n{tail(logs / 'server.log')}"
            assert time.monotonic() < deadline, f"prefect server not healthy:\n{tail(logs / 'server.log')}"
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        limit = stack.prefect("concurrency-limit", "create", DEVICE_TAG, "1")
        succeeded(stack.prefect("work-pool", "create", POOL, "--type", "process"))
        deploy = stack.prefect("--no-prompt", "deploy", "--all")
        # The worker runs elsewhere: the deployments, not its working directory, say where the code is.
        start("worker", "worker", "start", "--pool", POOL, "--type", "process", cwd=logs)
        succeeded(deploy)
        succeeded(limit)
        yield stack
    finally:
        drain_prefect_workers(api_url)
        for process in reversed(started):
            stop(process)


@pytest.fixture(scope="module")
def direct(stack: Stack, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of PROMPTS[:2] from a direct call of the `generate` flow (run while another run holds the device).

    The direct call's encode task must wait in Pending until the device slot is released: the tag
    concurrency limit applies to the stage tasks.
    """
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.reference import run_generate as generate

    out = tmp_path_factory.mktemp("direct")
    name = f"direct-{os.getpid()}"
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with temporary_settings({PREFECT_API_URL: stack.api_url}):
                generate(
                    flow_run_name=name, prompts=PROMPTS[:2], model=str(tiny_model), seed=0, out=str(out), run_id="r",
                    **SMALL,
                )  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        thread = threading.Thread(target=call, daemon=True)
        with concurrency(f"tag:{DEVICE_TAG}", occupy=1, strict=True):  # another run holds the device
            thread.start()
            states = []
            deadline = time.monotonic() + 120
            while len(states) < 6 and time.monotonic() < deadline:  # ~3 s of the encode task's states
                with stack.client() as client:
                    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
                    if runs:
                        states.append(runs[0].state_type.value)
                time.sleep(0.5)
            assert states and set(states) <= {"PENDING", "SCHEDULED"}, f"encode did not wait for the device: {states}"
        thread.join(300)
    assert not errors, errors
    return out / "r" / "images"


def test_generate_deployment_matches_the_direct_call(stack: Stack, tiny_model: Path, direct: Path, tmp_path: Path):
    params = {
        "prompts": {"prompts": PROMPTS[:2], "seed": 0},
        "model": str(tiny_model),
        "settings": SMALL,
        "output": {"out": str(tmp_path), "run_id": "r"},
    }
    code, flow_run_id, output = stack.run_deployment("generate/ad-hoc", params)
    assert code == 0, f"{output}\nworker log:\n{tail(stack.logs / 'worker.log')}"
    for i in range(2):
        np.testing.assert_array_equal(
            read_image(tmp_path / "r" / f"images/{i:05d}.png"), read_image(direct / f"{i:05d}.png")
        )
    with stack.client() as client:
        assert "model:tiny-flux" in client.read_flow_run(flow_run_id).tags


def test_batch_deployment_schedule_incremental_runs_artifacts_and_bad_lines(
    stack: Stack, tiny_model: Path, direct: Path, tmp_path: Path
) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # 1. The nightly deployment carries its cron schedule, and the server's scheduler makes its runs
    with stack.client() as client:
        deployment = client.read_deployment_by_name("batch/nightly")
        scheduled = scheduled_runs(client, deployment.id, timeout=90)
        # Pause it (which also drops those runs) so that no nightly run starts during the tests.
        client.update_deployment_schedule(deployment.id, deployment.schedules[0].id, active=False)
    assert [(s.schedule.cron, s.active) for s in deployment.schedules] == [("0 2 * * *", True)]
    starts = {run.expected_start_time.astimezone(UTC) for run in scheduled}
    assert starts and {(t.hour, t.minute) for t in starts} == {(2, 0)}, starts
    assert all(run.parameters == deployment.parameters for run in scheduled)

    # 2. A file of 6 prompts -> 6 images; items 0 and 1 are the direct call's prompts and seeds
    prompts_file, store = tmp_path / "prompts.txt", tmp_path / "store"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    params = {
        "prompts_file": str(prompts_file),
        "store": str(store),
        "model": str(tiny_model),
        "settings": SMALL,
        "options": {"chunk_size": 8},
    }
    # A file with bad lines, run meanwhile (it fails before any stage, so it does not wait for the device)
    bad_file, bad_store = tmp_path / "bad.jsonl", tmp_path / "bad-store"
    bad_file.write_text('{"prompt": "fine"}\n{"prompt": "x", "steps": 0}\nnot json\n{"prompt": "y", "width": 65}\n')
    bad_run = stack.start_deployment(
        "batch/nightly", {**params, "prompts_file": str(bad_file), "store": str(bad_store)}
    )
    code, flow_run_id, output = stack.run_deployment("batch/nightly", params)
    assert code == 0, f"{output}\nworker log:\n{tail(stack.logs / 'worker.log')}"
    manifest = json.loads((store / "batch.json").read_text())
    items = read_items(store)
    assert [e["status"] for e in items] == ["done"] * 6 and len(list(store.glob("images/*.png"))) == 6
    assert manifest["runs"][0]["flow_run_id"] == str(flow_run_id)
    for i in range(2):
        np.testing.assert_array_equal(read_image(store / items[i]["image"]), read_image(direct / f"{i:05d}.png"))

    # 3. The run's artifacts, task run names and tags, read back through the API
    with stack.client() as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        flow_run = client.read_flow_run(flow_run_id)
    by_type = {a.type: a for a in artifacts}
    assert by_type["progress"].data == 100
    table = json.loads(by_type["table"].data) if isinstance(by_type["table"].data, str) else by_type["table"].data
    assert [(row["prompt"], row["seed"], row["image"]) for row in table] == [
        (e["prompt"], e["seed"], str((store / e["image"]).resolve())) for e in items
    ]
    assert by_type["markdown"].data.count("data:image/png;base64,") == 6
    # the items are streamed: a chunk's label does not know how many chunks follow
    assert sorted(t.name for t in task_runs) == ["decode [chunk 1]", "denoise [chunk 1]", "encode [chunk 1]"]
    # the device tag has a concurrency limit on this server, the model tag has none: only the flow run carries it
    assert all(DEVICE_TAG in t.tags and "model:tiny-flux" not in t.tags for t in task_runs)
    assert "model:tiny-flux" in flow_run.tags
    assert (flow_run.empirical_policy.retries, flow_run.empirical_policy.retry_delay) == (2, 30)  # prefect.yaml

    # 4. Two more lines: only they are computed; the 6 images stay as they were
    before = {e["id"]: e["sha256"] for e in items}
    prompts_file.write_text("\n".join([*PROMPTS, "a green dog", "a city photo"]) + "\n")
    code, flow_run_id, output = stack.run_deployment("batch/nightly", params)
    assert code == 0, f"{output}\nworker log:\n{tail(stack.logs / 'worker.log')}"
    manifest = json.loads((store / "batch.json").read_text())
    counts = manifest["counts"]
    assert (manifest["runs"][1]["computed"], counts["done"] - counts["computed_by_this_run"]) == (2, 6)
    items = read_items(store)
    assert [e["run"] for e in items] == [1] * 6 + [2] * 2  # the run that made each image
    assert [e["made"]["images"] for e in items[6:]] == ["computed"] * 2
    assert {e["id"]: e["sha256"] for e in items[:6]} == before
    assert len(list(store.glob("images/*.png"))) == 8
    with stack.client() as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert [a.data.count("data:image/png;base64,") for a in artifacts if a.type == "markdown"] == [2]  # the new ones

    # 5. Bad lines: the run failed, naming every one of them, and computed nothing
    code, flow_run_id, output = stack.deployment_result(bad_run)
    assert code == 1, output
    with stack.client() as client:
        bad = client.read_flow_run(flow_run_id)
    message = bad.state.message
    assert bad.run_count == 1 and bad.empirical_policy.retries == 0  # bad input: the deployment's retries dropped
    assert "BatchFileError: 3 problem(s)" in message
    for expected in ("line 2, column steps: invalid value 0", "line 3, column (line)", "line 4, column width: invalid"):
        assert expected in message
    assert not bad_store.exists()


def test_the_form_rejects_bad_parameters_before_a_run_is_created(stack: Stack) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled

    bad = {
        "height": {"prompts": {"prompts": ["a dog"]}, "settings": {"height": 65}},
        "steps": {"prompts": {"prompts": ["a dog"]}, "settings": {"steps": 0}},
        "prompts": {"prompts": {"prompts": []}},
    }
    with stack.client() as client:
        deployment = client.read_deployment_by_name("generate/ad-hoc")
        runs = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        before = len(client.read_flow_runs(deployment_filter=runs))
        for field, parameters in bad.items():
            with pytest.raises(PrefectHTTPStatusError) as error:
                client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
            assert error.value.response.status_code == 409, field
            assert "Error creating flow run" in error.value.response.text, field
        assert len(client.read_flow_runs(deployment_filter=runs)) == before  # no run was created
        # an explicit null is a field left empty: the model's default (the run, scheduled next year, is deleted)
        nulls = {"prompts": {"prompts": ["a dog"]}, "settings": {"steps": None, "height": None, "guidance": None}}
        later = Scheduled(scheduled_time=datetime.now(UTC) + timedelta(days=365))
        run = client.create_flow_run_from_deployment(deployment.id, parameters=nulls, state=later)
        client.delete_flow_run(run.id)
        assert run.parameters["settings"]["steps"] is None
    # the form shows each field's limits
    steps = deployment.parameter_openapi_schema["definitions"]["ImageSettings"]["properties"]["steps"]
    assert "(at least 1, at most 1000)" in steps["description"] and "default" not in steps


def test_every_deployment_retries_a_failed_flow_run_and_beats_every_30_s() -> None:
    """prefect.yaml takes no flow retries: the work pool's env sets Prefect's flow default, read by every flow
    when its run process imports it (direct calls and `stagediff generate` keep none). The same env makes
    Prefect send a heartbeat every 30 s, inside the 90 s of the automation in deploy/."""
    import yaml

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    envs = [d["work_pool"]["job_variables"].get("env") for d in config["deployments"]]
    assert envs == [{"PREFECT_FLOW_DEFAULT_RETRIES": "2", "PREFECT_FLOW_DEFAULT_RETRY_DELAY_SECONDS": "30",
                     "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}] * 4  # fmt: skip
    entrypoints = [d["entrypoint"] for d in config["deployments"]]
    assert entrypoints == ["flows/generate.py:generate", "flows/batch.py:batch", "flows/fanout.py:fanout",
                           "flows/replica.py:replica"]  # fmt: skip
    code = (
        "from stagediff.flows import batch, fanout, generate, replica\n"
        "print([(f.retries, f.retry_delay_seconds) for f in (generate.generate, batch.batch, fanout.fanout, "
        "replica.replica)]);"
        "from prefect.settings import get_current_settings; print(get_current_settings().flows.heartbeat_frequency)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **envs[0]}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.stdout.splitlines() == [str([(2, 30)] * 4), "30"], proc.stderr[-2000:]


def test_a_cancelled_run_records_cancelled_and_what_was_stored(stack: Stack, tiny_model: Path, tmp_path: Path):
    """Cancelled from Prefect mid-denoise (the worker stops the run's process): the flow run ends Cancelled and
    is not retried; the manifest says `cancelled`, lists what denoise had stored (interrupted); a rerun of the
    same request reuses it all."""
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    from stagediff.artifacts import Store
    from stagediff.record import Record

    store = tmp_path / "store"
    params = {
        "prompts": {"prompts": PROMPTS, "seed": 3},
        "model": str(tiny_model),
        "settings": SMALL,
        "output": {"out": str(tmp_path), "run_id": "c", "store": str(store)},
    }
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        run = run_deployment("generate/ad-hoc", parameters=params, timeout=0,
                             job_variables={"env": {"STAGEDIFF_TEST_BATCH_DELAY": "1"}})  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((store / "objects" / "latents").rglob("*.json")):  # some latents are stored: mid-denoise
        assert time.monotonic() < deadline, f"no latents stored:\n{tail(stack.logs / 'worker.log')}"
        time.sleep(0.2)
    with stack.client() as client:
        client.set_flow_run_state(run.id, Cancelling())
        while not (state := client.read_flow_run(run.id).state).is_final():
            assert time.monotonic() < deadline, f"not cancelled:\n{tail(stack.logs / 'worker.log')}"
            time.sleep(0.5)
        assert state.type == StateType.CANCELLED
        assert client.read_flow_run(run.id).run_count == 1

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["status"] == "cancelled", manifest.get("error")
    denoise = manifest["stages"]["denoise"]
    assert denoise["interrupted"] and 0 < denoise["computed"] < len(PROMPTS)
    record = Record(tmp_path / "c" / "record.db", "run")  # the run did not complete: no items.jsonl
    items = list(record.items())
    record.close()
    computed = [item["index"] for item in items if item["made"]["latents"] == "computed"]
    assert len(computed) == denoise["computed"]
    latents = {item["index"]: item["keys"]["latents"] for item in items}
    assert all(Store(store).check("latents", latents[i]) for i in computed)

    code, _, output = stack.run_deployment("generate/ad-hoc", params)
    assert code == 0, f"{output}\nworker log:\n{tail(stack.logs / 'worker.log')}"
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    made = {item["index"]: item["made"]["latents"] for item in read_items(tmp_path / "c")}
    assert all(made[i] == "reused" for i in computed)
