"""The `fanout` flow: the items of a `generate` request split into contiguous shares, one data-parallel
replica each (`stagediff.replica`), run concurrently and gathered into one run folder.

On one machine each replica is a process of its own whose stage processes see only its device group
(or, without GPUs, its share of the cores). With a work pool, each share is a flow run of the pool's
`replica/<POOL>` deployment, on whichever worker takes it; the store is then a URL every worker
reaches. A share is a range of the request's items, stored once in the store: each replica reads its
range itself, and journals what it stores as small segment objects, which the flow gathers into the run's
record by item index while the replicas run. A failed replica
loses none of the others' results; the flow fails naming the failed shares, and a rerun computes
only what the store lacks.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import wait
from prefect.runtime import flow_run

from stagediff.artifacts import Store
from stagediff.engine import build_engine
from stagediff.flows.running import (
    checked_request,
    ended_status,
    heartbeats,
    refusals_are_final,
    register_root,
    run_name,
    store_request,
)
from stagediff.flows.ui import label_flow_run, model_tag, run_artifacts
from stagediff.isolation import StageError, kill_isolated, run_isolated, warm_up
from stagediff.progress import Progress
from stagediff.replica import ReplicaJob, cpu_replicas, plan_replicas, split
from stagediff.request import (
    ImageSettings,
    Output,
    Placement,
    Prompts,
    RequestError,
    RunOptions,
    new_run_id,
)
from stagediff.run_manifest import RunFolder, adopt_old_manifest, open_run, run_summary_base
from stagediff.sources import Source

GATHER_SECONDS = 1.0  # how often the replicas' journals are gathered while they run


class ReplicaFailed(RuntimeError):
    """One or more shares failed; the message names them (the others' results are in the store)."""


@task(name="replica", cache_policy=NONE)
def local_replica(job: ReplicaJob) -> dict[str, Any]:
    """One replica in a process of its own on this machine, forked from the preloaded stage forkserver (a
    fraction of a second, no second import of torch); its stage processes are its children, and its log
    lines become this task's. If this process dies, the replica and its stages exit too."""
    logger = get_run_logger()
    try:
        _, stats = run_isolated("stagediff.replica:run_local_replica", job, name=f"{job.journal}/replica-{job.replica}",
                                logger=logger)  # fmt: skip
    except StageError as exc:
        raise ReplicaFailed(str(exc)) from None
    return {"pid": stats.pid}


@task(name="replica", cache_policy=NONE)
def pool_replica(job: ReplicaJob, pool: str, job_variables: dict[str, Any] | None) -> dict[str, Any]:
    """One replica as a flow run of the `replica/<pool>` deployment, a subflow of this run. The job travels
    by reference (written to the shared store), so a share of any size fits in the flow run's parameters."""
    from prefect.deployments import run_deployment

    name = job.result.removesuffix(".json") + ".job.json"
    Store(job.store, job.store_options).write(name, job.model_dump_json().encode())
    run = run_deployment(
        f"replica/{pool}",
        parameters={"store": job.store, "job": name, "store_options": job.store_options},
        job_variables=job_variables,
        flow_run_name=job.title or None,
        timeout=None,
        as_subflow=True,
    )
    if not run.state.is_completed():
        raise ReplicaFailed(f"flow run {run.id} ended {run.state.type.value}: {run.state.message}")
    return {"flow_run_id": str(run.id)}


def run_replicas(
    jobs: list[ReplicaJob],
    store: Store,
    folder: RunFolder,
    progress: Progress | None,
    pool: str | None,
    job_variables: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Run the replicas that have items, concurrently (as tasks of the calling flow run), gathering their journals
    into `folder` as they go; return their results (from the store), one entry per replica, and the failed
    shares, named."""
    started = time.time()
    futures = {
        job.replica: (
            pool_replica.with_options(task_run_name=job.title).submit(job, pool, job_variables)
            if pool
            else local_replica.with_options(task_run_name=job.title).submit(job)
        )
        for job in jobs
        if job.count
    }
    cursors = dict.fromkeys(futures, 0)

    def gather() -> None:
        """Every journal segment written since the last call, in order, into the folder (then removed)."""
        for job in jobs:
            if not job.count:
                continue
            while (data := store.read(name := f"{job.journal}/{cursors[job.replica]:08d}.json")) is not None:
                stored = folder.replay(json.loads(data))
                if progress is not None and stored is not None:
                    progress.gathered(*stored)
                store.remove(name)
                cursors[job.replica] += 1

    pending = list(futures.values())
    try:
        while pending:
            pending = list(wait(pending, timeout=GATHER_SECONDS).not_done)
            gather()
    except BaseException:  # cancelled or interrupted: stop the replicas now, keep what they stored
        if pool:
            with contextlib.suppress(Exception):
                cancel_pool_replicas()
        else:
            killed = kill_isolated(jobs[0].journal.rpartition("/")[0] + "/") if jobs else 0
            get_run_logger().warning("stopped %d local replica process(es); what they stored is in the store", killed)
        with contextlib.suppress(Exception):
            gather()
        raise
    results, entries, failed = [], [], []
    for job in jobs:
        entry = {"replica": job.replica, "devices": job.devices, "cpus": job.cpus, "threads": job.threads,
                 "items": [job.start, job.stop], "status": "idle"}  # fmt: skip
        if job.count:
            futures[job.replica].wait()  # its final state (a state read right after `wait(...)` could lag)
            state = futures[job.replica].state
            entry["seconds"] = round(time.time() - started, 3)
            if state.is_completed():
                entry.update(futures[job.replica].result(), status="completed")
                result = json.loads(store.read(job.result) or b"{}")
                seen = next((info.get("environment") for info in result.get("stages", {}).values()), None)
                entry.update(pid=result.get("pid", entry.get("pid")), seen=seen,
                             seconds=result.get("seconds", entry["seconds"]))  # fmt: skip
                results.append(result)
            else:
                share = f"replica {job.replica} (items {job.start}-{job.stop - 1})"
                entry.update(status="failed", error=str(state.message))
                failed.append(share)
        entries.append(entry)
    return results, entries, failed


def check_replica_deployment(pool: str) -> None:
    """A pool's shares run as flow runs of its `replica/<pool>` deployment: it must exist on this server."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"replica/{pool}")
        except ObjectNotFound:
            allowed = (f"this Prefect server has no deployment replica/{pool} to run its shares: deploy it "
                       f"(`make deploy`, or `prefect deploy --name replica/{pool}`)")  # fmt: skip
            raise RequestError("pool", pool, allowed) from None
    if deployment.work_pool_name != pool:
        allowed = f"the deployment replica/{pool} runs on work pool {deployment.work_pool_name!r}, not on {pool!r}"
        raise RequestError("pool", pool, allowed)


def cancel_pool_replicas() -> None:
    """Cancel this flow run's replica flow runs that have not ended: a running one is set Cancelling (its worker
    stops its process), one no worker took yet is Cancelled."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Cancelling

    if flow_run.id is None:
        return
    waiting = (StateType.SCHEDULED, StateType.PENDING)
    ongoing = FlowRunFilterStateType(any_=[*waiting, StateType.RUNNING, StateType.PAUSED])
    children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]),
                             state=FlowRunFilterState(type=ongoing))  # fmt: skip
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=children)
        for run in runs:
            state = Cancelled() if run.state_type in waiting else Cancelling()
            client.set_flow_run_state(run.id, state, force=True)
    get_run_logger().warning("cancelled %d replica flow run(s); what they stored is in the store", len(runs))


def failure(failed: list[str], jobs: list[ReplicaJob]) -> str:
    busy = sum(bool(job.count) for job in jobs)
    kept = "the others' items are in the store" if len(failed) < busy else "what they stored is in the store"
    shares = ", ".join(failed)
    return f"{len(failed)} of {busy} replicas failed: {shares}; {kept}, a rerun computes only what is missing"


def share_jobs(
    count: int, groups: list[dict[str, Any]], model: str, source: Source, placement: Placement, options: RunOptions,
    store: str, store_options: dict[str, Any] | None, work_dir: Path | None, result_prefix: str, parent: str,
    **item_fields: Any,
) -> list[ReplicaJob]:  # fmt: skip
    """One job per replica: its contiguous range of the `count` items of `source` (the first ranges one longer),
    devices, CPUs, threads; `parent` names the run in its title ("fan-out RUN"); `item_fields`: how items are made
    (kind, seed, negative_prompts, settings)."""
    n = len(groups)
    return [
        ReplicaJob(
            replica=r, model=model, source=source, start=share.start, stop=share.stop, placement=placement,
            options=options, store=store, store_options=store_options, devices=group["devices"], cpus=group["cpus"],
            threads=group["threads"],
            work_dir=None if work_dir is None else str(work_dir / str(r)), result=f"{result_prefix}/{r}.json",
            title=f"replica {r + 1}/{n} of {parent} " + (f"(items {share.start}-{share.stop - 1})" if share.stop >
                                                         share.start else "(no items)"),
            **item_fields,
        )
        for r, (group, share) in enumerate(zip(groups, split(count, n), strict=True))
    ]  # fmt: skip


@flow(name="fanout", flow_run_name=run_name, log_prints=True)
def fanout(
    prompts: Prompts,
    settings: ImageSettings = ImageSettings(),  # noqa: B008 (pydantic models are immutable here)
    model: str | None = None,
    placement: Placement = Placement(),  # noqa: B008
    output: Output = Output(),  # noqa: B008
    options: RunOptions = RunOptions(),  # noqa: B008
    replicas: int | None = None,
    device_groups: list[str] | None = None,
    pool: str | None = None,
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate one image per prompt with data-parallel replicas, each over a contiguous share of the prompts.

    Args:
        prompts: The prompts or a prompts file, their negative prompts and the base seed (prompt i: seed + i).
        settings: As for generate; empty fields take the model's pipeline defaults.
        model: Diffusers pipeline folder or Hub id; empty means the embedded tiny random model.
        placement: As for generate (per replica: each holds a whole model copy).
        output: Output root, run id and artifact store (with a pool: a URL every worker reaches, e.g. s3://...).
        options: Strict, retries, chunk size (each replica's).
        replicas: How many replicas (default 1): on a machine with GPUs each gets its share of them, without
            GPUs its share of the cores (by CPU affinity).
        device_groups: Instead of replicas: one replica per group of GPU indexes, e.g. ["0,1", "2,3"].
        pool: A work pool: each share becomes a flow run of the `replica/<pool>` deployment.
        threads: On a machine without GPUs, torch threads per replica (default: torch's own count, as a plain
            one-process run uses, which keeps its images bit-identical to that run's).
        storage_options: fsspec options of a URL store, e.g. {"endpoint_url": "http://127.0.0.1:9000"}.
        job_variables: With a pool: job variables of every replica's flow run (e.g. {"env": {...}}).
    """
    logger = get_run_logger()
    # 1. Check inputs (before any model is built or loaded, and before anything is written; never retried)
    with refusals_are_final():
        groups = plan_replicas(replicas, device_groups, pool, output.store, threads)
        request, store_location = checked_request(prompts, settings, model, placement, output, storage_options)
        run_dir = request.run_dir
        if pool:
            check_replica_deployment(pool)
        previous = open_run(request)
    if not pool:
        warm_up(
            request.model, request.placement.compile, cpu_replicas(groups), request.placement.spinning
        )  # replicas fork from it: imports once
    label_flow_run(None if output.run_id else f"fanout {request.run_id}", model_tag(model))

    with heartbeats():
        # 2. The request stored once; the run a root of the store's gc; the shares: ranges of its items
        store = Store(store_location, storage_options)
        with refusals_are_final():  # a model whose weights do not fit its config, before anything is stored
            engine = build_engine(
                request.model, request.placement, store_location, str(run_dir), options, storage_options
            )  # fmt: skip (computes no key: the keys of the gc root)
        source = store_request(request, store)
        register_root(store, run_dir / "manifest.json", engine, source, request=request)
        adopt_old_manifest(run_dir, previous)
        jobs = share_jobs(
            request.count, groups, request.model, source, request.placement, options, store_location,
            storage_options, None if pool else run_dir / "replicas",
            f"fanout/{request.run_id}-{flow_run.id or new_run_id()}", f"fan-out {request.run_id}", kind="generate",
            seed=request.seed,
            negative_prompts=request.negative_prompts, settings=request.settings,
        )  # fmt: skip
        folder = RunFolder(run_dir, "run", "manifest.json", run_summary_base(request, source, store_location, engine))
        folder.summary_base["flow_run_id"] = str(flow_run.id) if flow_run.id else None
        folder.extra["replicas"] = []
        folder.start(None, store, request.count, flow_run_id=folder.summary_base["flow_run_id"])
        logger.info("run %s: %d prompts over %d replicas %s", request.run_id, request.count, len(jobs),
                    [job.count for job in jobs])  # fmt: skip

        # 3. The replicas, concurrently, gathered by item index as they go; a failed one loses none of the others'
        progress = Progress(request.count)
        progress.start()
        try:
            results, folder.extra["replicas"], failed = run_replicas(jobs, store, folder, progress, pool, job_variables)
        except BaseException as exc:
            folder.finish(ended_status(exc), f"{type(exc).__name__}: {exc}")
            raise
        progress.finish()
        folder.extra["replica_stages"] = {r["replica"]: r["stages"] for r in results}
        if failed:
            folder.finish("failed", f"failed shares: {', '.join(failed)}")
            raise ReplicaFailed(failure(failed, jobs))
        summary = folder.finish("completed")
        run_artifacts(folder, "fanout", f"Run {request.run_id}")
        folder.close()
        logger.info("run %s completed: %d images in %s", request.run_id, request.count, run_dir / "images")
        return summary
