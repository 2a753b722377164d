"""The `replica` flow: one share of a fan-out on whichever worker of a pool takes it (deployed once per
pool as `replica/<POOL>`). Its stages are Prefect tasks as in `generate`; its result goes to the shared
store, where the fan-out flow gathers it."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from stagediff.replica import ReplicaJob, run_replica


@flow(name="replica", flow_run_name="replica {job.replica}", log_prints=True)
def replica(job: ReplicaJob) -> dict[str, Any]:
    """Compute one share of a fan-out into the shared store.

    Args:
        job: The share's items, the model, placement and options, the store (a URL) and its devices.
    """
    result = run_replica(job, prefect_tasks=True, logger=get_run_logger())
    return {"replica": result["replica"], "items": len(result["items"]), "pid": result["pid"]}
