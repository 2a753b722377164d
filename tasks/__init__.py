"""The stage task: one thin Prefect task runs any stage in a fresh OS process (`stagediff.isolation.run_stage_process`:
a stage is found by its literal name in STAGE_FUNCTIONS there; its job and result are `stagediff.jobs`'s)."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.exceptions import ObjectNotFound
from prefect.utilities.annotations import quote

from stagediff.isolation import run_stage_process
from stagediff.jobs import StageJob, StageResult

FIRST_WAIT_REPORT = 5.0  # seconds a stage waits for a slot before its run's log says so
WAIT_REPORTS = 30.0  # then again every this many seconds


@task(name="stage", cache_policy=NONE)
def run_stage(
    stage: str, job: StageJob, on_item: Callable[[int], None] | None = None, started: threading.Event | None = None
) -> StageResult:
    """Run one stage's job in a fresh process; `on_item(index)` is called as each item is stored."""
    if started is not None:
        started.set()
    return run_stage_process(stage, job, on_item, get_run_logger())


def run_stage_task(
    stage: str,
    job: StageJob,
    on_item: Callable[[int], None],
    name: str,
    retries: int,
    tags: set[str],
    logger: logging.Logger | logging.LoggerAdapter,
) -> StageResult:
    """`run_stage` as the task run `name`. Prefect starts it once it holds a slot of each of its `tags`' concurrency
    limits; until then the run's log says, every WAIT_REPORTS seconds, what it waits for and who holds it."""
    runner = run_stage.with_options(name=stage, task_run_name=name, retries=retries, tags=tags)
    # quoted: Prefect would walk and rebuild every item of the job looking for futures (1 s for 3,000 items)
    if not tags:
        return runner(stage, quote(job), on_item=on_item)
    started, ended = threading.Event(), threading.Event()
    watch = contextvars.copy_context()  # the thread talks to this run's server
    watcher = threading.Thread(target=watch.run, args=(report_waits, name, tags, started, ended, logger), daemon=True)
    watcher.start()
    try:
        return runner(stage, quote(job), on_item=on_item, started=started)
    finally:
        ended.set()


def report_waits(
    name: str,
    tags: set[str],
    started: threading.Event,
    ended: threading.Event,
    logger: logging.Logger | logging.LoggerAdapter,
) -> None:
    """Log what the task run `name` waits for until it starts (or ends without starting)."""
    wait = FIRST_WAIT_REPORT
    while not started.wait(wait) and not ended.is_set():
        try:
            full = full_limits(tags)
        except Exception as exc:  # the server may be restarting: say so, ask again later
            full = [f"the Prefect server, which does not answer ({type(exc).__name__})"]
        if full:
            logger.info("%s waits for %s", name, "; ".join(full))
        wait = WAIT_REPORTS


def full_limits(tags: set[str]) -> list[str]:
    """The tag concurrency limits among `tags` whose slots are all taken, each with who holds them."""
    full = []
    with get_client(sync_client=True) as client:
        for tag in sorted(tags):
            try:
                limit = client.read_concurrency_limit_by_tag(tag)
                used = client.read_global_concurrency_limit_by_name(f"tag:{tag}").active_slots
            except ObjectNotFound:
                continue
            if used < limit.concurrency_limit:
                continue
            holders = [holder(client, run_id) for run_id in limit.active_slots[:3]]
            if len(limit.active_slots) > 3:
                holders.append(f"{len(limit.active_slots) - 3} more")
            held = ", ".join(holders) if holders else "no live task run: a leaked slot (docs/deployments.md)"
            full.append(f"a slot of {tag} (limit {limit.concurrency_limit}, {used} in use: {held})")
    return full


def holder(client: Any, task_run_id: Any) -> str:
    """A task run holding a slot, named as the UI shows it."""
    try:
        run = client.read_task_run(task_run_id)
        flow = client.read_flow_run(run.flow_run_id) if run.flow_run_id else None
    except ObjectNotFound:
        return f"task run {task_run_id}"
    where = f" of flow run '{flow.name}'" if flow is not None else ""
    return f"task run '{run.name}' ({run.state_name}){where}"


__all__ = ["run_stage", "run_stage_task"]
