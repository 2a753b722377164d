"""Prefect task for stage 1 (encode)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from stagediff.spec import StageContext
from tasks._isolated import run_stage


@task(name="encode", cache_policy=NONE)
def encode_task(
    ctx: StageContext,
    prompts: list[tuple[int, str]],
    max_sequence_length: int,
    keys: dict[int, str],
    negative_prompts: list[str] | None = None,
) -> dict[str, Any]:
    """Encode the prompts (and negatives) the store lacks with the text encoders in a fresh process; store them."""
    return run_stage("encode", ctx, prompts, max_sequence_length, keys, negative_prompts)
