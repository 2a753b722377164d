"""Plain, picklable descriptions that cross the process boundary between the flow and a stage.
Kept free of torch so that the flow's process never imports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageContext:
    """What a stage needs besides its items."""

    model: str
    run_dir: str
    dtype: str  # "auto" | "float32" | "bfloat16" | "float16"
    batch_size: int
    max_memory: dict[str, str] | None = None
    offload_dir: str | None = None
    # File stems of items by index (e.g. a batch item's id); an item not listed is named f"{index:05d}".
    item_names: dict[int, str] | None = None


@dataclass(frozen=True)
class ItemRef:
    """A persisted artifact of one item: run-relative path and sha256."""

    index: int
    path: str
    sha256: str
