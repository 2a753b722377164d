"""Prefect task for stage 3 (decode)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from stagediff.spec import ItemRef, StageContext
from tasks._isolated import run_stage


@task(name="decode", task_run_name="decode", cache_policy=NONE)  # the batch flow adds "[chunk n/N]"
def decode_task(ctx: StageContext, items: list[ItemRef], height: int, width: int) -> dict[str, Any]:
    """Decode latents with the VAE in a fresh process; persist PNG images."""
    return run_stage("decode", ctx, items, height, width)
