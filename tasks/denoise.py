"""Prefect task for stage 2 (denoise)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from stagediff.spec import ItemRef, StageContext
from tasks._isolated import run_stage


@task(name="denoise", task_run_name="denoise", cache_policy=NONE)  # the batch flow adds "[chunk n/N]"
def denoise_task(
    ctx: StageContext,
    items: list[tuple[ItemRef, int]],
    steps: int,
    guidance: float,
    height: int,
    width: int,
    max_sequence_length: int,
) -> dict[str, Any]:
    """Denoise embeddings to latents with the sharded denoiser in a fresh process; persist latents."""
    return run_stage("denoise", ctx, items, steps, guidance, height, width, max_sequence_length)
