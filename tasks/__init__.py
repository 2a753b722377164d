"""The stage tasks: one thin Prefect task runs any stage in a fresh OS process (see stagediff.isolation).

A stage is found by its literal name in STAGE_FUNCTIONS; its job and result are the typed dataclasses
of `stagediff.jobs`.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from stagediff.isolation import run_isolated
from stagediff.jobs import StageJob, StageResult

STAGE_FUNCTIONS = {
    "encode": "stagediff.stages.encode:encode",
    "denoise": "stagediff.stages.denoise:denoise",
    "decode": "stagediff.stages.decode:decode",
}


@task(name="stage", cache_policy=NONE)
def run_stage(stage: str, job: StageJob, on_item: Callable[[int], None] | None = None) -> StageResult:
    """Run one stage's job in a fresh process; `on_item(index)` is called as each item is stored."""
    logger = get_run_logger()

    def on_event(event: str, value: object) -> None:
        if event == "item" and on_item is not None:
            on_item(value)

    result, stats = run_isolated(STAGE_FUNCTIONS[stage], job, name=stage, logger=logger, on_event=on_event)
    result.process = stats.to_dict()
    logger.info(
        "%s finished in process %d: %.2f s (start-up %.2f s, loading %.2f s), peak RSS %.0f MB",
        stage,
        stats.pid,
        stats.seconds,
        stats.startup_seconds,
        result.load_seconds,
        stats.peak_rss_mb,
    )
    return result


__all__ = ["STAGE_FUNCTIONS", "run_stage"]
