"""Prefect task for stage 1 (encode)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from stagediff.spec import StageContext
from tasks._isolated import run_stage


@task(name="encode", task_run_name="encode", cache_policy=NONE)  # the batch flow adds "[chunk n/N]"
def encode_task(ctx: StageContext, prompts: list[tuple[int, str]], max_sequence_length: int) -> dict[str, Any]:
    """Encode prompts with the text encoders in a fresh process; persist embeddings."""
    return run_stage("encode", ctx, prompts, max_sequence_length)
