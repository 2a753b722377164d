"""Plain, picklable descriptions that cross the process boundary between the flow and a stage.
Kept free of torch so that the flow's process never imports it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageContext:
    """What a stage needs besides its items."""

    model: str
    run_dir: str
    dtype: str  # "auto" | "float32" | "bfloat16" | "float16"
    batch_size: int
    max_memory: dict[str, str] | None = None
    offload_dir: str | None = None
    store: str | None = None  # the artifact store, a folder or fsspec URL; None: OUT/.store next to run_dir
    pause_after_batch: float = 0.0  # test hook ($STAGEDIFF_TEST_BATCH_DELAY): crash tests kill between batches

    @property
    def store_location(self) -> str:
        return self.store or str(Path(self.run_dir).parent / ".store")


@dataclass(frozen=True)
class ItemRef:
    """One item's artifact in the store: its kind, content key and sha256."""

    index: int
    kind: str  # "embeddings" | "latents" | "images"
    key: str
    sha256: str
