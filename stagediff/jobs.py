"""What crosses the process boundary between the flow and a stage: each stage's job and its result.

Plain, picklable dataclasses, kept free of torch so that the flow's process never imports it. As
diffusers' modular pipelines declare their blocks' inputs and outputs, each stage declares here what
it takes (`EncodeJob`, `DenoiseJob`, `DecodeJob`: one entry per item, each with the store key its
artifact is written under) and what it gives (`StageResult`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from stagediff.artifacts import Store

Kind = Literal["embeddings", "latents", "images"]
# The one set of artifact kinds: what each stage writes, in stage order.
KIND_OF_STAGE: dict[str, Kind] = {"encode": "embeddings", "denoise": "latents", "decode": "images"}
STAGE_OF_KIND: dict[str, str] = {kind: stage for stage, kind in KIND_OF_STAGE.items()}
STAGES = tuple(KIND_OF_STAGE)


@dataclass(frozen=True)
class StageContext:
    """What every stage needs besides its items: the model, how to place it, and the store."""

    model: str
    work_dir: str  # the run's folder (default offload folder)
    store: str  # the artifact store, a folder or fsspec URL
    dtype: str  # "float32" | "bfloat16" | "float16" (never "auto": resolved before the stages)
    batch_size: int = 1
    max_memory: dict[str, str] | None = None
    offload_dir: str | None = None
    store_options: dict[str, Any] | None = None  # fsspec storage options of a URL store
    variant: str | None = None  # the weights variant every from_pretrained loads ("fp16"), or the plain ones
    revision: str | None = None  # the Hub revision `model` was resolved at (its snapshot folder); None: main
    pipeline_stages: int = 1  # > 1: denoise with the denoiser split into this many parts, one process each
    pipeline_split: tuple[str, ...] | None = None  # the blocks where parts 2..N start; None: balanced compute
    micro_batch_size: int | None = None  # items per micro-batch through the parts; None: batch_size
    compile: bool = False  # regional compilation of the denoiser's repeated blocks (its code cached in the store)
    cache: str | None = None  # diffusers' block cache on the denoiser: "first-block:0.05", "taylorseer", "magcache"
    quantize: str | None = None  # "int8", "int8-weight", "float8", "nf4": of the `quantized` components
    quantized: tuple[str, ...] = ()  # the components quantized as they load ("transformer", "text_encoder_2")
    denoiser: str = "transformer"  # the family's denoiser component ("unet" for SD 1.5 and SDXL)
    group_offload: str | None = None  # "block" or "leaf": the denoiser in CPU memory, its groups onloaded to the GPU
    offload_stream: bool = False  # group offload: overlap the next group's transfer with compute (CUDA streams)

    @property
    def levers(self) -> str:
        """The speed levers that change the denoiser's bits, as the content keys name them ("": none)."""
        found = [*(["compile"] if self.compile else []), *([f"cache={self.cache}"] if self.cache else [])]
        return ",".join([*found, *([f"quantize={self.quantize}"] if self.denoiser in self.quantized else [])])

    @property
    def encode_levers(self) -> str:
        """The levers that change the text embeddings' bits: the quantized text encoders ("": none)."""
        encoders = [name for name in self.quantized if name != self.denoiser]
        return f"quantize={self.quantize}:{'+'.join(sorted(encoders))}" if encoders else ""

    def open_store(self) -> Store:
        from stagediff.artifacts import Store

        return Store(self.store, self.store_options)


@dataclass(frozen=True)
class DenoiseSettings:
    """What `denoise` passes to the pipeline besides the embeddings and the noise (see `Family.denoise_kwargs`).

    Every field is resolved (a user's empty setting is the family's default here)."""

    steps: int
    guidance: float  # classifier-free guidance scale; FLUX.1-dev: the distilled guidance
    height: int
    width: int
    max_sequence_length: int  # T5 tokens (Flux, SD3)
    true_cfg_scale: float = 1.0  # Flux: > 1 runs a negative pass (true classifier-free guidance)
    original_size: tuple[int, int] | None = None  # SDXL micro-conditioning, (height, width); None: the image size
    crops_coords_top_left: tuple[int, int] = (0, 0)  # SDXL micro-conditioning, (top, left)
    target_size: tuple[int, int] | None = None  # SDXL micro-conditioning, (height, width); None: the image size


@dataclass(frozen=True)
class ItemRef:
    """One item's artifact in the store: its kind, content key and sha256."""

    index: int
    kind: Kind
    key: str
    sha256: str


@dataclass(frozen=True)
class EncodeItem:
    index: int
    prompt: str
    negative_prompt: str | None  # None: the family's own (SD3/SD 1.5 ""; SDXL zeros; FLUX.1 no negative pass)
    max_sequence_length: int
    key: str  # the embeddings' store key


@dataclass(frozen=True)
class DenoiseItem:
    index: int
    embeddings: ItemRef
    seed: int  # noise from torch.Generator("cpu").manual_seed(seed)
    settings: DenoiseSettings
    key: str  # the latents' store key


@dataclass(frozen=True)
class DecodeItem:
    index: int
    latents: ItemRef
    height: int
    width: int
    key: str  # the image's store key
    parameters: dict[str, Any] | None = None  # what made it, for the PNG's text chunks; None: no metadata


@dataclass(frozen=True)
class EncodeJob:
    """Stage 1 takes prompts; items with different sequence lengths are batched apart."""

    ctx: StageContext
    items: list[EncodeItem]


@dataclass(frozen=True)
class DenoiseJob:
    """Stage 2 takes embeddings and seeds; items with different settings are batched apart."""

    ctx: StageContext
    items: list[DenoiseItem]


@dataclass(frozen=True)
class DecodeJob:
    """Stage 3 takes latents; items with different sizes are batched apart."""

    ctx: StageContext
    items: list[DecodeItem]
    tiled: bool = False  # VAE tiling (bounded memory for large images)
    sliced: bool = False  # one image of a batch at a time


StageJob = EncodeJob | DenoiseJob | DecodeJob


@dataclass
class StageResult:
    """What a stage gives back: the artifacts it wrote, where its weights were, and what loading cost."""

    items: list[ItemRef] = field(default_factory=list)
    device_map: dict[str, str] | None = None  # component or module -> device
    warnings: list[str] = field(default_factory=list)  # e.g. a text encoder that fell back to the CPU
    loads: int = 0  # how many times this process loaded its models (0 when the store had everything)
    load_seconds: float = 0.0
    compute_seconds: float = 0.0  # everything after loading: the items' work, reads and writes
    environment: dict | None = None  # what the process saw: CUDA_VISIBLE_DEVICES, torch threads, its CPUs
    pipeline: dict | None = None  # denoise in parts: the split (blocks per part and device) and each part's time
    process: dict | None = None  # set by the parent: pid, seconds, start-up, peak RSS (isolation.ProcessStats)
    compiled: dict | None = None  # --compile: where the compiled code came from and what the first batches cost
