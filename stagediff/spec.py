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


@dataclass(frozen=True)
class DenoiseSettings:
    """What `denoise` passes to the pipeline besides the embeddings and the noise (see `Family.denoise_kwargs`)."""

    steps: int
    guidance: float  # classifier-free guidance scale; FLUX.1-dev: the distilled guidance
    height: int
    width: int
    max_sequence_length: int  # T5 tokens (Flux, SD3)
    true_cfg_scale: float = 1.0  # Flux: > 1 runs a negative pass (true classifier-free guidance)
    original_size: tuple[int, int] | None = None  # SDXL micro-conditioning, (height, width); None: the image size
    crops_coords_top_left: tuple[int, int] = (0, 0)  # SDXL micro-conditioning, (top, left)
    target_size: tuple[int, int] | None = None  # SDXL micro-conditioning, (height, width); None: the image size
