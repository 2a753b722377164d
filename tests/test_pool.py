"""Fan-out across machines, simulated on loopback: a real Prefect server, two process workers on one pool
with different CUDA_VISIBLE_DEVICES, and the store on an S3 API (moto's server mode on 127.0.0.1, the s3fs
client). Runs in a pytest process of its own (it points this process' Prefect client at its own server)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import makefile_env, read_items
from tests.reference import read_image, reference_images
from tests.test_deployments import (
    POOL,
    REPO,
    Stack,
    drain_prefect_workers,
    finish,
    free_port,
    stop,
    succeeded,
    tail,
)

PROMPTS = ["a red dog", "a cat in the city", "a forest at night", "blue sky photo", "a lighthouse"]
SMALL = {"steps": 2, "height": 64, "width": 64, "max_sequence_length": 16}
BUCKET = "stagediff-test"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server(logs: Path) -> Iterator[str]:
    """An S3 API on 127.0.0.1 (moto's server mode) with an empty bucket; its endpoint URL."""
    port = free_port()
    with open(logs / "moto.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, tail(logs / "moto.log")
            try:
                httpx.get(endpoint, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        httpx.put(f"{endpoint}/{BUCKET}", timeout=10).raise_for_status()
        yield endpoint
    finally:
        stop(server)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def pool(s3: str, tmp_path_factory: pytest.TempPathFactory, stagediff_cache: Path) -> Iterator[Stack]:
    """Server, the pool, the `replica/<pool>` deployment and two workers (`--limit 1`), one per device group."""
    home, logs = tmp_path_factory.mktemp("prefect-home"), tmp_path_factory.mktemp("logs")
    api_url = f"http://127.0.0.1:{free_port()}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(makefile_env())  # as `make server` and `make worker` run
    env.update(AWS, PREFECT_HOME=str(home), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1", STAGEDIFF_CACHE=str(stagediff_cache), PWD=str(REPO),
               STAGEDIFF_TEST_BATCH_DELAY="0.5", PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")  # fmt: skip
    stack, started = Stack(api_url, env, logs), []

    def start(name: str, *args: str, **extra: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as log:
            started.append(subprocess.Popen([sys.executable, "-m", "prefect", *args], env={**env, **extra}, cwd=home,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        return started[-1]

    try:
        start("server", "server", "start", "--host", "127.0.0.1", "--port", api_url.split(":")[2].split("/")[0])
        deadline = time.monotonic() + 180
        while True:
            assert time.monotonic() < deadline, tail(logs / "server.log")
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        succeeded(stack.prefect("work-pool", "create", POOL, "--type", "process"))
        succeeded(stack.prefect("--no-prompt", "deploy", "--name", f"replica/{POOL}", "--name", "fanout/fan-out"))
        succeeded(stack.prefect("automation", "create", "--from-file", "deploy/crash-zombie-flow-runs.json"))
        # As `make worker` starts them: the stage workers on the `default` queue, one flow run at a time each,
        # and a worker without a limit for the `control` queue (fan-out parents)
        stack.workers = {
            device: start(f"worker-{device}", "worker", "start", "--pool", POOL, "--type", "process", "--work-queue",
                          "default", "--limit", "1", CUDA_VISIBLE_DEVICES=device)
            for device in ("0", "1")
        }  # fmt: skip
        start("worker-control", "worker", "start", "--pool", POOL, "--type", "process", "--work-queue", "control")
        yield stack
    finally:
        drain_prefect_workers(api_url)
        for process in reversed(started):
            stop(process)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing bucket", "its bucket 'no-such-bucket' does not exist at {endpoint} (create it first)"),
        ("unreachable", "cannot reach its endpoint at {endpoint} ("),
        ("no credentials", "no credentials for its bucket at {endpoint}: set AWS_ACCESS_KEY_ID"),
    ],
)
def test_an_object_store_that_cannot_be_used_is_one_line_before_any_work(
    s3: str, tiny_model: Path, tmp_path: Path, case: str, expected: str
) -> None:
    """`generate` and `gc` on a store whose bucket is missing, whose endpoint does not answer, or without
    credentials: one line naming the store and why, exit 2, nothing written, no stage started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))  # fmt: skip
    endpoint, bucket = s3, BUCKET
    if case == "missing bucket":
        env.update(AWS)
        bucket = "no-such-bucket"
    elif case == "unreachable":
        env.update(AWS)
        endpoint = f"http://127.0.0.1:{free_port()}"
    store = f"s3://{bucket}/refused"
    options = json.dumps({"endpoint_url": endpoint})
    commands = {
        "generate": ["generate", "--model", str(tiny_model), "--prompt", "a dog", "--out", str(tmp_path / "out"),
                     "--store", store, "--storage-options", options],
        "gc": ["gc", store, "--storage-options", options],
    }  # fmt: skip
    for name, args in commands.items():
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "stagediff.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (name, done.stdout, done.stderr)
        assert lines[0].startswith(f"stagediff: error: invalid store='{store}': "), (name, lines)
        assert expected.format(endpoint=endpoint) in lines[0], (name, lines)
        assert time.monotonic() - started < 60, name
    assert not (tmp_path / "out").exists()


def fan_out(stack: Stack, s3: str, tiny_model: Path, out: Path, store: str, run_id: str) -> dict:
    """The fan-out flow in this process, as `stagediff generate --pool` runs it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from stagediff.flows.fanout import fanout
    from stagediff.request import ImageSettings, Output, Prompts

    os.environ.update(AWS)
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        return fanout(Prompts(prompts=PROMPTS, seed=3), ImageSettings(**SMALL), str(tiny_model),
                      output=Output(out=str(out), run_id=run_id, store=store), replicas=2, pool=POOL,
                      storage_options={"endpoint_url": s3})  # fmt: skip


def bucket(s3: str, prefix: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3, key="testing", secret="testing")
    return [path.removeprefix(f"{BUCKET}/{prefix}/") for path in fs.find(f"{BUCKET}/{prefix}")]


def test_an_object_store_lost_mid_run_ends_the_run_in_one_line_recorded_failed(
    pool: Stack, tiny_model: Path, tmp_path: Path
) -> None:
    """The S3 API goes away after the first chunk's first stage: the command ends with one line of its own (no
    traceback on the terminal: the run's log in the UI keeps it), exit 1, and the run's record says `failed`."""
    (tmp_path / "moto").mkdir()
    with moto_server(tmp_path / "moto") as endpoint:
        cmd = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(tiny_model), "--out",
               str(tmp_path / "out"), "--run-id", "lost", "--store", f"s3://{BUCKET}/lost", "--storage-options",
               json.dumps({"endpoint_url": endpoint}), "--chunk-size", "2", *(f"--{k.replace('_', '-')}={v}"
               for k, v in SMALL.items()), *(arg for p in PROMPTS for arg in ("--prompt", p))]  # fmt: skip
        env = {**pool.env, "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "encode finished in process" in line:
                break
    lines += proc.stdout.readlines()  # the server is gone
    proc.wait(timeout=300)
    output = "".join(lines)
    assert proc.returncode == 1, output[-3000:]
    assert lines[-1].startswith("stagediff: error: ") and "Traceback" not in output, output[-3000:]
    manifest = json.loads((tmp_path / "out" / "lost" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"], manifest


def test_two_workers_compute_the_shares_into_the_bucket_then_a_killed_share_is_rerun(
    pool: Stack, s3: str, tiny_model: Path, tmp_path: Path
) -> None:
    expected = reference_images(tiny_model, PROMPTS, seed=3, num_inference_steps=2, height=64, width=64,
                                max_sequence_length=16)  # fmt: skip
    manifest = fan_out(pool, s3, tiny_model, tmp_path, f"s3://{BUCKET}/one", "one")
    items = read_items(tmp_path / "one")
    assert [item["prompt"] for item in items] == PROMPTS
    for item, reference in zip(items, expected, strict=True):
        np.testing.assert_array_equal(read_image(tmp_path / "one" / item["image"]), reference)
    replicas = manifest["replicas"]
    assert [r["items"] for r in replicas] == [[0, 3], [3, 5]]  # [start, stop) of each share
    assert len({r["flow_run_id"] for r in replicas}) == 2
    assert sorted(r["seen"]["CUDA_VISIBLE_DEVICES"] for r in replicas) == ["0", "1"]  # one per worker
    objects = bucket(s3, "one")
    for kind in ("embeddings", "latents", "images"):
        assert len([name for name in objects if name.startswith(f"objects/{kind}/")]) == 2 * 5, objects
    assert not [name for name in objects if ".tmp" in name]  # one PUT of the final key: no temporary objects

    # Kill the run of the replica on device 1 while it denoises: the fan-out fails naming that share
    killed: list[int] = []
    thread = threading.Thread(target=kill_replica_on_device, args=("1", killed), daemon=True)
    thread.start()
    from stagediff.flows.fanout import ReplicaFailed

    with pytest.raises(ReplicaFailed) as error:
        fan_out(pool, s3, tiny_model, tmp_path, f"s3://{BUCKET}/two", "two")
    thread.join(60)
    assert killed, "no replica process found on device 1"
    failed = json.loads((tmp_path / "two" / "manifest.json").read_text())
    share = next(r for r in failed["replicas"] if r["status"] == "failed")
    start, stop = share["items"]
    named = f"replica {share['replica']} (items {start}-{stop - 1})"
    assert "1 of 2 replicas failed" in str(error.value) and named in str(error.value)
    other = next(r for r in failed["replicas"] if r["status"] == "completed")

    # The rerun computes only what the store lacks: nothing of the other share, the rest of the killed one
    again = fan_out(pool, s3, tiny_model, tmp_path, f"s3://{BUCKET}/two", "two")
    stages = {int(replica): info for replica, info in again["replica_stages"].items()}
    assert all(info["computed"] == 0 for info in stages[other["replica"]].values())
    assert stages[share["replica"]]["encode"]["computed"] == 0  # encoded before the kill
    assert 0 < stages[share["replica"]]["decode"]["computed"] <= stop - start
    items = read_items(tmp_path / "two")
    run = again["runs"][-1]["run"]
    computed = [item["index"] for item in items if item["run"] == run and item["made"]["images"] == "computed"]
    assert len(computed) == stages[share["replica"]]["decode"]["computed"] and set(computed) <= set(range(start, stop))
    for item, reference in zip(items, expected, strict=True):
        np.testing.assert_array_equal(read_image(tmp_path / "two" / item["image"]), reference)


def kill_replica_on_device(device: str, killed: list[int], timeout: float = 120) -> None:
    """SIGKILL the flow-run process of the replica whose stage processes see CUDA_VISIBLE_DEVICES=device,
    as soon as its denoise stage has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for comm in Path("/proc").glob("[0-9]*/comm"):
            try:
                if comm.read_text().strip() != "stagediff-denoi":
                    continue
                environ = (comm.parent / "environ").read_bytes().split(b"\0")
                if f"CUDA_VISIBLE_DEVICES={device}".encode() in environ:
                    time.sleep(0.3)
                    parent = int((comm.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    forkserver_child_parent = parent  # the stage's parent is the forkserver: kill the flow run
                    flow_run = flow_run_process(forkserver_child_parent)
                    os.kill(flow_run, signal.SIGKILL)
                    killed.append(flow_run)
                    return
            except (OSError, ValueError):
                continue
        time.sleep(0.05)


def flow_run_process(forkserver: int) -> int:
    """The process that started the stage forkserver: the replica's flow-run process."""
    return int(Path(f"/proc/{forkserver}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_run_whose_worker_was_killed_is_marked_crashed_and_fails_the_fan_out(
    pool: Stack, s3: str, tiny_model: Path, tmp_path: Path
) -> None:
    """kill -9 of a worker and everything under it mid-denoise: nothing reports the run's end, so the
    automation `make deploy` creates (deploy/crash-zombie-flow-runs.json) marks it Crashed once its
    heartbeats stop, and the fan-out that waits on it fails naming its share instead of waiting forever."""
    from stagediff.flows.fanout import ReplicaFailed

    killed: list[int] = []

    def kill_worker_1() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for comm in Path("/proc").glob("[0-9]*/comm"):
                try:
                    if comm.read_text().strip() == "stagediff-denoi" and b"CUDA_VISIBLE_DEVICES=1" in (
                        comm.parent / "environ"
                    ).read_bytes().split(b"\0"):
                        os.killpg(pool.workers["1"].pid, signal.SIGKILL)  # the worker, its flow run, its stages
                        killed.append(pool.workers["1"].pid)
                        return
                except (OSError, ValueError):
                    continue
            time.sleep(0.05)

    thread = threading.Thread(target=kill_worker_1, daemon=True)
    thread.start()
    started = time.monotonic()
    with pytest.raises(ReplicaFailed, match=r"1 of 2 replicas failed: replica \d \(items") as error:
        fan_out(pool, s3, tiny_model, tmp_path, f"s3://{BUCKET}/three", "three")
    assert killed, "no stage process found under worker 1"
    assert time.monotonic() - started < 300
    failed = json.loads((tmp_path / "three" / "manifest.json").read_text())
    share = next(r for r in failed["replicas"] if r["status"] == "failed")
    assert "CRASHED" in share["error"].upper() or "crashed" in str(error.value).lower(), share


def test_the_fan_out_deployment_runs_on_workers_that_take_one_run_at_a_time(
    pool: Stack, s3: str, tiny_model: Path, tmp_path: Path
) -> None:
    """`prefect deployment run fanout/fan-out` with pool replicas: its parent runs from the `control` queue, so
    it holds no slot of the stage workers (`--limit 1`; one of them was killed above): every share runs."""
    params = {
        "prompts": {"prompts": PROMPTS, "seed": 3},
        "settings": SMALL,
        "model": str(tiny_model),
        "output": {"out": str(tmp_path), "run_id": "deployed", "store": f"s3://{BUCKET}/deployed"},
        "replicas": 2,
        "pool": POOL,
        "storage_options": {"endpoint_url": s3},
    }
    code, flow_run_id, output = pool.run_deployment("fanout/fan-out", params)
    assert code == 0, f"{output}\ncontrol worker log:\n{tail(pool.logs / 'worker-control.log')}"
    manifest = json.loads((tmp_path / "deployed" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and [r["status"] for r in manifest["replicas"]] == ["completed"] * 2
    expected = reference_images(tiny_model, PROMPTS, seed=3, num_inference_steps=2, height=64, width=64,
                                max_sequence_length=16)  # fmt: skip
    for item, image in zip(read_items(tmp_path / "deployed"), expected, strict=True):
        np.testing.assert_array_equal(read_image(tmp_path / "deployed" / item["image"]), image)
    shares = ["replica 1/2 of fan-out deployed (items 0-2)", "replica 2/2 of fan-out deployed (items 3-4)"]
    with pool.client() as client:
        parent = client.read_flow_run(flow_run_id)
        runs = sorted(run.name for run in client.read_flow_runs() if "fan-out deployed" in run.name)
        tasks = sorted(run.name for run in client.read_task_runs() if "fan-out deployed" in run.name)
    assert parent.work_queue_name == "control"
    assert runs == shares and tasks == shares  # the replicas' flow runs and the parent's tasks that wait on them


def test_a_pool_without_its_replica_deployment_is_one_line_before_any_share(
    pool: Stack, s3: str, tiny_model: Path, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from stagediff.flows.fanout import fanout
    from stagediff.request import ImageSettings, Output, Prompts, RequestError

    os.environ.update(AWS)
    with temporary_settings({PREFECT_API_URL: pool.api_url}), pytest.raises(RequestError) as error:
        fanout(Prompts(prompts=PROMPTS, seed=3), ImageSettings(**SMALL), str(tiny_model),
               output=Output(out=str(tmp_path), run_id="nowhere", store=f"s3://{BUCKET}/nowhere"), replicas=2,
               pool="gpu", storage_options={"endpoint_url": s3})  # fmt: skip
    assert str(error.value).startswith("invalid pool='gpu': this Prefect server has no deployment replica/gpu")
    assert not (tmp_path / "nowhere").exists()


def test_cancelling_a_fan_out_deployment_run_stops_its_replicas_on_the_pool(
    pool: Stack, s3: str, tiny_model: Path, tmp_path: Path
) -> None:
    """`prefect flow-run cancel` of a `fanout/fan-out` run whose replicas run on the pool's workers: the parent's
    worker stops it, it cancels its replicas' flow runs (a running one's worker stops it, a waiting one never
    starts); all within a minute, the parent's record `cancelled`."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    params = {
        "prompts": {"prompts": [f"prompt {i}" for i in range(400)], "seed": 3},  # ~100 s a stage a replica
        "settings": SMALL,
        "model": str(tiny_model),
        "output": {"out": str(tmp_path), "run_id": "stopped", "store": f"s3://{BUCKET}/stopped"},
        "replicas": 2,
        "pool": POOL,
        "storage_options": {"endpoint_url": s3},
    }
    watcher = pool.start_deployment("fanout/fan-out", params)
    try:
        with pool.client() as client:

            def replicas() -> list:
                return [run for run in client.read_flow_runs() if " of fan-out stopped (items " in run.name]

            deadline = time.monotonic() + 240
            # one share running (the other may wait: a test above killed one of the two stage workers)
            while not (
                (runs := replicas()) and len(runs) == 2 and any(r.state_type == StateType.RUNNING for r in runs)
            ):
                assert time.monotonic() < deadline, tail(pool.logs / "worker-control.log")
                time.sleep(0.5)
            parent = client.read_task_run(runs[0].parent_task_run_id).flow_run_id
            client.set_flow_run_state(parent, Cancelling(), force=True)  # what `prefect flow-run cancel` does
            cancelled = time.monotonic()
            while not all(r.state_type == StateType.CANCELLED for r in [*replicas(), client.read_flow_run(parent)]):
                assert time.monotonic() - cancelled < 60, [(r.name, r.state_name) for r in replicas()]
                time.sleep(0.5)
    finally:
        finish(watcher)
    manifest = json.loads((tmp_path / "stopped" / "manifest.json").read_text())
    assert manifest["status"] == "cancelled", manifest["status"]
