"""Prefect task for stage 3 (decode)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from stagediff.spec import ItemRef, StageContext
from tasks._isolated import run_stage


@task(name="decode", cache_policy=NONE)
def decode_task(
    ctx: StageContext,
    items: list[ItemRef],
    height: int,
    width: int,
    keys: dict[int, str],
    tiled: bool = False,
    sliced: bool = False,
) -> dict[str, Any]:
    """Decode latents to the images the store lacks with the VAE in a fresh process; store the PNGs."""
    return run_stage("decode", ctx, items, height, width, keys, tiled, sliced)
