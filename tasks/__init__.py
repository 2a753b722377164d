"""The stage task: one thin Prefect task runs any stage in a fresh OS process (`stagediff.isolation.run_stage_process`:
a stage is found by its literal name in STAGE_FUNCTIONS there; its job and result are `stagediff.jobs`'s)."""

from __future__ import annotations

from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from stagediff.isolation import run_stage_process
from stagediff.jobs import StageJob, StageResult


@task(name="stage", cache_policy=NONE)
def run_stage(stage: str, job: StageJob, on_item: Callable[[int], None] | None = None) -> StageResult:
    """Run one stage's job in a fresh process; `on_item(index)` is called as each item is stored."""
    return run_stage_process(stage, job, on_item, get_run_logger())


__all__ = ["run_stage"]
