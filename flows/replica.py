"""The `replica` flow: one share of a fan-out on whichever worker of a pool takes it (deployed once per
pool as `replica/<POOL>`). Its stages are Prefect tasks as in `generate`; its result goes to the shared
store, where the fan-out flow gathers it."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from stagediff.artifacts import Store
from stagediff.flows.running import heartbeats, refusals_are_final
from stagediff.flows.ui import label_flow_run
from stagediff.replica import ReplicaJob, run_replica


@flow(name="replica", log_prints=True)
def replica(store: str, job: str, store_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute one share of a fan-out into the shared store.

    Args:
        store: The shared artifact store (a URL every worker reaches).
        job: Store-relative name of the share's job (`ReplicaJob` as JSON): its items, the model, placement,
            options and devices; written there by the fan-out flow.
        store_options: fsspec options of the store.
    """
    data = Store(store, store_options).read(job)
    if data is None:
        raise FileNotFoundError(f"replica job {job} is not in the store {store}")
    with refusals_are_final():  # a job that is not a ReplicaJob is never retried
        replica_job = ReplicaJob.model_validate_json(data)
    label_flow_run(replica_job.title or f"replica {replica_job.replica + 1} ({job})")
    with heartbeats():
        result = run_replica(replica_job, prefect_tasks=True, logger=get_run_logger())
    return {"replica": result["replica"], "items": len(result["items"]), "pid": result["pid"]}
