"""Prefect task for stage 2 (denoise)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from stagediff.spec import DenoiseSettings, ItemRef, StageContext
from tasks._isolated import run_stage


@task(name="denoise", task_run_name="denoise", cache_policy=NONE)  # the batch flow adds "[chunk n/N]"
def denoise_task(
    ctx: StageContext, items: list[tuple[ItemRef, int]], settings: DenoiseSettings, keys: dict[int, str]
) -> dict[str, Any]:
    """Denoise embeddings to the latents the store lacks, sharded, in a fresh process; store them."""
    return run_stage("denoise", ctx, items, settings, keys)
