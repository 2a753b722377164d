"""The `fanout` flow: the items of a `generate` request split into contiguous shares, one data-parallel
replica each (`stagediff.replica`), run concurrently and gathered into one run folder.

On one machine each replica is a process of its own whose stage processes see only its device group
(or, without GPUs, its share of the cores). With a work pool, each share is a flow run of the pool's
`replica/<POOL>` deployment, on whichever worker takes it; the store is then a URL every worker
reaches. Replicas return only store keys: the flow gathers the items by index. A failed replica
loses none of the others' results; the flow fails naming the failed shares, and a rerun computes
only what the store lacks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from stagediff.artifacts import Store, write_manifest
from stagediff.engine import Item, request_items
from stagediff.flows.running import checked_request, heartbeats, refusals_are_final, run_name
from stagediff.flows.ui import label_flow_run, model_tag
from stagediff.isolation import StageError, run_isolated, warm_up
from stagediff.replica import ReplicaJob, plan_replicas, replica_items, split
from stagediff.request import (
    ImageSettings,
    Output,
    Placement,
    Prompts,
    RunOptions,
    new_run_id,
)
from stagediff.run_manifest import gather, open_manifest


class ReplicaFailed(RuntimeError):
    """One or more shares failed; the message names them (the others' results are in the store)."""


@task(name="replica", cache_policy=NONE)
def local_replica(job: ReplicaJob) -> dict[str, Any]:
    """One replica in a process of its own on this machine, forked from the preloaded stage forkserver (a
    fraction of a second, no second import of torch); its stage processes are its children, and its log
    lines become this task's. If this process dies, the replica and its stages exit too."""
    logger = get_run_logger()
    try:
        _, stats = run_isolated("stagediff.replica:run_local_replica", job, name=f"replica-{job.replica}",
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
        timeout=None,
        as_subflow=True,
    )
    if not run.state.is_completed():
        raise ReplicaFailed(f"flow run {run.id} ended {run.state.type.value}: {run.state.message}")
    return {"flow_run_id": str(run.id)}


def run_replicas(
    jobs: list[ReplicaJob], store: Store, run_dir: Path, pool: str | None, job_variables: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Run the replicas that have items, concurrently (as tasks of the calling flow run); return their results
    (from the store), one manifest entry per replica, and the failed shares, named."""
    started = time.time()
    futures = {
        job.replica: (pool_replica.submit(job, pool, job_variables) if pool else local_replica.submit(job))
        for job in jobs
        if job.items
    }
    results, entries, failed = [], [], []
    for job in jobs:
        entry = {"replica": job.replica, "devices": job.devices, "cpus": job.cpus, "threads": job.threads,
                 "items": [i.index for i in job.items], "status": "idle"}  # fmt: skip
        if job.items:
            futures[job.replica].wait()
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
                share = f"replica {job.replica} (items {job.items[0].index}-{job.items[-1].index})"
                entry.update(status="failed", error=str(state.message))
                failed.append(share)
        entries.append(entry)
    return results, entries, failed


def failure(failed: list[str], jobs: list[ReplicaJob]) -> str:
    busy = sum(bool(job.items) for job in jobs)
    return (f"{len(failed)} of {busy} replicas failed: {', '.join(failed)}; the others' items are in the store, "
            "a rerun computes only what is missing")  # fmt: skip


def share_jobs(
    items: list[Item], groups: list[dict[str, Any]], model: str, placement: Placement, options: RunOptions,
    store: str, store_options: dict[str, Any] | None, work_dir: Path | None, result_prefix: str,
) -> list[ReplicaJob]:  # fmt: skip
    """One job per replica: its contiguous share of `items` (the first shares one longer), devices, CPUs, threads."""
    shares = split(len(items), len(groups))
    return [
        ReplicaJob(
            replica=r, model=model, items=replica_items(items, shares[r]), placement=placement, options=options,
            store=store, store_options=store_options, devices=group["devices"], cpus=group["cpus"],
            threads=group["threads"],
            work_dir=None if work_dir is None else str(work_dir / str(r)), result=f"{result_prefix}/{r}.json",
        )
        for r, group in enumerate(groups)
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
        prompts: The prompts, their negative prompts and the base seed (prompt i: seed + i), as for generate.
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
        request, store_location = checked_request(prompts, settings, model, placement, output)
        run_dir = request.run_dir
        manifest = open_manifest(request)
    if not pool:
        warm_up(request.model)  # local replicas fork from it: torch and the model's classes imported once
    label_flow_run(None if output.run_id else f"fanout {request.run_id}", model_tag(model))

    with heartbeats():
        # 2. The shares: contiguous, the first ones one item longer when uneven
        items = request_items(request)
        resolved = items[0].settings
        store = Store(store_location, storage_options)
        jobs = share_jobs(
            items, groups, request.model, request.placement, options, store_location, storage_options,
            None if pool else run_dir / "replicas", f"fanout/{request.run_id}-{flow_run.id or new_run_id()}",
        )  # fmt: skip
        manifest.update(settings=resolved.__dict__, store=store_location, status="running", stages={},
                        flow_run_id=str(flow_run.id) if flow_run.id else None, replicas=[])  # fmt: skip
        write_manifest(run_dir, manifest)
        store.register_run(run_dir / "manifest.json")
        logger.info("run %s: %d prompts over %d replicas %s", request.run_id, len(items), len(jobs),
                    [len(job.items) for job in jobs])  # fmt: skip

        # 3. The replicas, concurrently; a failed one loses none of the others' results
        results, manifest["replicas"], failed = run_replicas(jobs, store, run_dir, pool, job_variables)

        # 4. Gather by item index, in request order
        gather(manifest, run_dir, store, results)
        manifest["stages"] = {r["replica"]: r["stages"] for r in results}
        if failed:
            manifest.update(status="failed", error=f"failed shares: {', '.join(failed)}")
            write_manifest(run_dir, manifest)
            raise ReplicaFailed(failure(failed, jobs))
        manifest["status"] = "completed"
        write_manifest(run_dir, manifest)
        logger.info("run %s completed: %d images in %s", request.run_id, len(items), run_dir / "images")
        return manifest
