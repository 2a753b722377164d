"""Shared by the stage tasks: run a stage in its own process and report what it cost."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from stagediff.isolation import run_isolated


def run_stage(stage: str, *args: Any) -> dict[str, Any]:
    """Run `stagediff.stages.<stage>.<stage>(*args)` in a fresh process; return its result and process stats."""
    logger = get_run_logger()
    result, stats = run_isolated(f"stagediff.stages.{stage}:{stage}", *args, name=stage, logger=logger)
    logger.info(
        "%s finished in process %d: %.2f s (start-up %.2f s), peak RSS %.0f MB",
        stage,
        stats.pid,
        stats.seconds,
        stats.startup_seconds,
        stats.peak_rss_mb,
    )
    return {**result, "process": stats.to_dict()}
