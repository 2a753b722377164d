"""What a user asks for, as typed models validated in one place before any model loads or file is written.

The same models are the flows' parameters (so the Prefect form groups them and the server rejects bad
values before a run is created), the CLI's request and each prompts-file row's settings. A setting left
empty takes the model family's pipeline default (`Family.defaults`), resolved once per run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stagediff.family import FAMILIES, Family, family_for
from stagediff.jobs import DenoiseSettings

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
SUPPORTED_PIPELINES = tuple(FAMILIES)
# Components each supported pipeline needs on disk (model_index.json may list more, e.g. image_encoder=null).
REQUIRED_COMPONENTS = {name: family.required_components() for name, family in FAMILIES.items()}
# Components with weights: one .safetensors file each, or shards (`*-0000N-of-0000M.safetensors` + index).
WEIGHTED_COMPONENTS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "transformer",
    "unet",
    "safety_checker",
)

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_RUN_ID = re.compile(RUN_ID_PATTERN)
_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$", re.IGNORECASE)  # ASCII digits only
_DEVICE = re.compile(r"^([0-9]+|cpu|mps|cuda:[0-9]+|xpu:[0-9]+)$")
_ENDPOINT = re.compile(r"https?://[^\s/?#]+(/\S*)?", re.IGNORECASE)  # a storage endpoint: scheme and host
_COMPONENT = re.compile(
    r"(text_encoder|tokenizer)(_\d)?|vae|unet|transformer|scheduler|safety_checker|feature_extractor|image_encoder"
)
# Weight files diffusers and transformers load (a variant such as ".fp16", shards "-00001-of-00002", an index).
_WEIGHTS = re.compile(
    r"(diffusion_pytorch_model|model)(\.[\w-]+)?(-\d{5}-of-\d{5})?\.safetensors(\.index(\.[\w-]+)?\.json)?"
)
MAX_SEED = 2**63 - 1
MAX_PIXELS = 16384
# Prefect refuses flow-run parameters over 512 KB: what is larger travels by reference (a prompts file).
MAX_INLINE_BYTES = 256 * 1024
MODEL_DEFAULT = "empty: the model's pipeline default"

# The one-line message for each checked field: what is allowed (the Field limits below say the same to the form).
FIRST_BLOCK_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default
ALLOWED = {
    "steps": "must be an integer from 1 to 1000",
    "guidance": "must be a finite number >= 0",
    "true_cfg_scale": "must be a finite number >= 1 (1: off)",
    "height": f"must be a positive multiple of 16 (at most {MAX_PIXELS})",
    "width": f"must be a positive multiple of 16 (at most {MAX_PIXELS})",
    "max_sequence_length": "must be an integer from 1 to 512",
    "batch_size": "must be an integer >= 1",
    "seed": f"must be an integer from 0 to {MAX_SEED}",
    "original_size": f"must be (height, width) in pixels, each from 1 to {MAX_PIXELS}",
    "target_size": f"must be (height, width) in pixels, each from 1 to {MAX_PIXELS}",
    "crops_coords_top_left": f"must be (top, left) in pixels, each from 0 to {MAX_PIXELS}",
    "run_id": "must be a plain name: letters, digits, '.', '_' or '-', no '/'",
    "chunk_size": "must be an integer >= 1",
    "retries": "must be an integer from 0 to 10",
    "dtype": "must be one of auto, float32, bfloat16, float16",
    "prompts": "must hold at least one non-empty prompt",
    "variant": "must be a weights variant name such as fp16 (letters, digits, '_' or '-')",
    "revision": "must be a Hub branch, tag or commit such as main, v1.0 or refs/pr/1 (letters, digits, . _ - /)",
    "pipeline_stages": "must be an integer from 1 to 64",
    "cache": "must be first-block, first-block:THRESHOLD (0 < THRESHOLD <= 1), taylorseer or magcache",
    "pipeline_split": "must be block names such as single_transformer_blocks.4 (where parts 2..N start)",
    "micro_batch_size": "must be an integer >= 1",
}


class RequestError(ValueError):
    """Bad input: `str(error)` is one line naming the parameter, the value and what is allowed."""

    def __init__(self, parameter: str, value: Any, allowed: str) -> None:
        shown = repr(value) if not isinstance(value, str) or len(value) < 80 else repr(value[:77] + "...")
        super().__init__(f"invalid {parameter}={shown}: {allowed}")
        self.parameter, self.value, self.allowed = parameter, value, allowed


def _form_schema(schema: dict[str, Any]) -> None:
    """Show `X | None` fields in the Prefect form as plain X fields (empty means None, the default), and each
    field's limits in its description (the form shows descriptions, not limits).

    pydantic writes them as `anyOf: [X, null]`, which the form renders as "Property is type None". Without a
    `default`, the server's validation takes null for such a field again (Prefect adds the null branch to a
    field that is neither required nor defaulted), so an explicit null means "the model's default" as well.
    """
    for prop in schema.get("properties", {}).values():
        branches = prop.get("anyOf")
        if branches and len(branches) == 2 and {"type": "null"} in branches:
            prop.update(next(b for b in branches if b != {"type": "null"}))
            del prop["anyOf"]
            if prop.get("default", 0) is None:
                del prop["default"]
        limits = [f"{word} {prop[key]}" for key, word in (("minimum", "at least"), ("maximum", "at most"),
                                                           ("multipleOf", "a multiple of")) if key in prop]  # fmt: skip
        if limits and "description" in prop:
            text = prop["description"]
            end = "." if text.endswith(".") else ""
            prop["description"] = f"{text.removesuffix('.')} ({', '.join(limits)}){end}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_form_schema)


# The form's rule for a prompt (GenerateRequest's validator says the same in words).
PromptText = Annotated[StrictStr, StringConstraints(min_length=1, pattern=r"\S")]


class Prompts(_Model):
    """The prompts of a run: one image each, given inline or as a file the flow reads (large requests)."""

    prompts: list[PromptText] | None = Field(default=None, min_length=1, description="Prompts, one image each.")
    file: str | None = Field(
        default=None,
        description="Instead of prompts: a UTF-8 text file, one prompt a line, read where the flow runs.",
    )
    negative_prompts: list[StrictStr] | None = Field(
        default=None, description="One negative prompt per prompt (FLUX.1: only with true_cfg_scale > 1)."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Prompt i gets Generator('cpu').manual_seed(seed + i).")

    @model_validator(mode="after")
    def _one_source(self) -> Prompts:
        if (self.prompts is None) == (self.file is None):
            raise RequestError("prompts", self.prompts, "give prompts or a prompts file, one of them")
        if self.prompts is not None and len(json.dumps(self.prompts)) > MAX_INLINE_BYTES:
            allowed = (f"are too large to travel as flow parameters (over {MAX_INLINE_BYTES // 1024} KB): "
                       "give them as a prompts file (--prompts-file, or `file`)")  # fmt: skip
            raise RequestError("prompts", f"{len(self.prompts)} prompts", allowed)
        return self

    def source(self) -> dict[str, Any]:
        """The request's prompts: the inline list, or the file checked in one streaming pass (`PromptsFile`)."""
        if self.prompts is not None:
            return {"prompts": self.prompts}
        return {"prompts_file": checked_prompts_file(self.file)}


class PromptsFile(_Model):
    """A prompts file as checked: where it was, its sha256 and how many prompts it holds (never the prompts)."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    count: int = Field(ge=1)


def checked_prompts_file(path: str) -> PromptsFile:
    """One prompt a line (lines end with "\n" alone); blank lines are skipped, and a UTF-8 byte order mark.
    Every line is checked in one streaming pass; RequestError names a bad line."""
    from stagediff.sources import check_prompts_file

    count, sha256 = check_prompts_file(path)
    return PromptsFile(path=str(Path(path).absolute()), sha256=sha256, count=count)


class ImageSettings(_Model):
    """What each image is made with. Empty fields take the model family's pipeline defaults."""

    steps: int | None = Field(default=None, ge=1, le=1000, description=f"Denoising steps; {MODEL_DEFAULT}.")
    guidance: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description=f"Guidance scale (FLUX.1: distilled); {MODEL_DEFAULT}."
    )
    true_cfg_scale: float = Field(
        default=1.0, ge=1, allow_inf_nan=False, description="FLUX.1 only: > 1 runs true CFG with negative prompts."
    )
    height: int | None = Field(
        default=None, ge=16, le=MAX_PIXELS, multiple_of=16, description=f"Pixels, a multiple of 16; {MODEL_DEFAULT}."
    )
    width: int | None = Field(
        default=None, ge=16, le=MAX_PIXELS, multiple_of=16, description=f"Pixels, a multiple of 16; {MODEL_DEFAULT}."
    )
    max_sequence_length: int | None = Field(
        default=None, ge=1, le=512, description=f"T5 tokens per prompt (FLUX.1, SD3); {MODEL_DEFAULT}."
    )
    original_size: tuple[int, int] | None = Field(
        default=None, description="SDXL micro-conditioning (height, width); empty: the image size."
    )
    crops_coords_top_left: tuple[int, int] = Field(default=(0, 0), description="SDXL micro-conditioning (top, left).")
    target_size: tuple[int, int] | None = Field(
        default=None, description="SDXL micro-conditioning (height, width); empty: the image size."
    )

    @model_validator(mode="after")
    def _sizes(self) -> ImageSettings:
        for name in ("original_size", "target_size"):
            size = getattr(self, name)
            if size is not None and not all(0 < v <= MAX_PIXELS for v in size):
                raise RequestError(name, size, ALLOWED[name])
        if not all(0 <= v <= MAX_PIXELS for v in self.crops_coords_top_left):
            raise RequestError("crops_coords_top_left", self.crops_coords_top_left, ALLOWED["crops_coords_top_left"])
        return self

    def check_family(self, family: type[Family], negative_prompts: bool) -> None:
        """Options that only some families take; another family would ignore them, so refuse them."""
        name = family.pipeline_class
        if family.true_cfg:
            if self.true_cfg_scale > 1 and not negative_prompts:
                raise RequestError("true_cfg_scale", self.true_cfg_scale, "> 1 needs negative_prompts")
        elif self.true_cfg_scale != 1:
            allowed = f"only FLUX.1 takes it; {name} guides with guidance and negative_prompts"
            raise RequestError("true_cfg_scale", self.true_cfg_scale, allowed)
        if not family.micro_conditioning:
            for field in ("original_size", "crops_coords_top_left", "target_size"):
                if getattr(self, field) != ImageSettings.model_fields[field].default:
                    raise RequestError(field, getattr(self, field), f"is SDXL micro-conditioning; {name} takes none")


class Placement(_Model):
    """Where and how the stages hold the model: dtype, batch size, device memory, offload, VAE tiling."""

    dtype: Dtype = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU.")
    batch_size: int = Field(default=1, ge=1, description="Items per forward pass in every stage.")
    max_memory: dict[str, str] | None = Field(
        default=None, description='Memory per device, e.g. {"0": "16GiB", "1": "16GiB", "cpu": "64GiB"}.'
    )
    offload_dir: str | None = Field(default=None, description="Folder for weights offloaded to disk.")
    tiled_decode: bool = Field(default=False, description="Decode in VAE tiles (bounded memory for large images).")
    sliced_decode: bool = Field(default=False, description="Decode one image of a batch at a time.")
    variant: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Weights variant to load, e.g. fp16 (*.fp16.*)."
    )
    revision: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[A-Za-z0-9_-]+([./][A-Za-z0-9_-]+)*$",  # no "..", no leading or trailing "/"
        description="Hub id only: the branch, tag or commit to load, e.g. v1.0 or a commit hash; empty: main.",
    )
    pipeline_stages: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Split the denoiser into this many parts, one process (device) each, micro-batches streamed.",
    )
    pipeline_split: list[Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,64}\.[0-9]{1,4}$")]] | None = Field(
        default=None, description="Blocks where parts 2..N start, e.g. [single_transformer_blocks.4]; empty: balanced."
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="With pipeline stages: items per micro-batch (a batch is cut); empty: batch_size.",
    )

    compile: bool = Field(
        default=False,
        description="Compile the denoiser's repeated blocks (torch.compile, regional); its compiled code is kept in "
        "the store, so it is compiled once per machine kind and shape. Near-exact: images differ in the last bits.",
    )

    cache: str | None = Field(
        default=None,
        description="Reuse the denoiser's block outputs across steps (diffusers' cache configs; Flux): first-block"
        "[:THRESHOLD] (default 0.05; each item denoised alone), taylorseer or magcache. Approximate; empty: off.",
    )

    quantize: Literal["int8", "int8-weight", "float8", "nf4"] | None = Field(
        default=None,
        description="Quantize components as they load (diffusers' and transformers' quantization configs): int8 "
        "(torchao, int8 weights and activations), int8-weight, float8 (CUDA 8.9+), nf4 (bitsandbytes, CUDA). "
        "Approximate; empty: off.",
    )
    quantize_components: list[Annotated[str, StringConstraints(pattern=r"^[a-z_0-9]{1,32}$")]] | None = Field(
        default=None, description="Components to quantize, e.g. [transformer, text_encoder_2]; empty: the denoiser "
        "and the largest text encoder.",
    )  # fmt: skip

    group_offload: Literal["block", "leaf"] | None = Field(
        default=None,
        description="Keep the denoiser in CPU memory and move each block (or each leaf module) to the GPU as it runs "
        "(diffusers' group offloading): for a denoiser that does not fit, instead of max_memory's CPU offload.",
    )
    offload_stream: bool = Field(default=False, description="With group_offload: overlap transfers (CUDA streams).")

    @field_validator("cache")
    @classmethod
    def _cache(cls, value: str | None) -> str | None:
        """The canonical spelling (first-block:0.05), which the content keys name."""
        if value is None or value == "":
            return None
        name, _, threshold = value.partition(":")
        if name in ("taylorseer", "magcache") and not threshold:
            return name
        if name == "first-block":
            try:
                number = float(threshold or FIRST_BLOCK_THRESHOLD)
            except ValueError:
                number = -1.0
            if 0 < number <= 1:
                return f"first-block:{number:g}"
        raise RequestError("cache", value, ALLOWED["cache"])

    @property
    def spinning(self) -> bool:
        """Whether the stage threads of a run may spin while they wait (`isolation.set_wait_policy`): the levers
        whose many short parallel regions ran slower with sleeping threads (compiled kernels, int8)."""
        return self.compile or self.quantize is not None

    @model_validator(mode="after")
    def _levers_where_they_run(self) -> Placement:
        if self.quantize_components is not None and self.quantize is None:
            raise RequestError("quantize_components", self.quantize_components, "needs quantize")
        if self.offload_stream and self.group_offload is None:
            raise RequestError("offload_stream", True, "needs group_offload")
        if self.group_offload and (self.max_memory or self.offload_dir):
            allowed = "is a placement of its own: leave max_memory and offload_dir out"
            raise RequestError("group_offload", self.group_offload, allowed)
        for name in ("compile", "cache", "quantize", "group_offload"):
            if getattr(self, name) and self.pipeline_stages > 1:
                allowed = "does not go with pipeline_stages > 1 yet: use one of them"
                raise RequestError(name, getattr(self, name), allowed)
        return self

    @model_validator(mode="before")
    @classmethod
    def _max_memory(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_memory" in data:
            data = {**data, "max_memory": parse_max_memory(data["max_memory"])}
        return data


class RunOptions(_Model):
    """How a run is carried out; none of this changes an image's pixels."""

    strict: bool = Field(default=False, description="Stop at a damaged artifact instead of recomputing it.")
    retries: int = Field(default=0, ge=0, le=10, description="Retries of a failed stage.")
    chunk_size: int | None = Field(
        default=None, ge=1, description="Items per chunk (each stage loads its model once a chunk); empty: automatic."
    )
    metadata: bool = Field(
        default=True, description="Write what made each image into its PNG (A1111 `parameters` and a JSON chunk)."
    )


class Output(_Model):
    """Where a `generate` run writes."""

    out: str = Field(default="outputs", description="Output root; the run writes under OUT/RUN_ID/.")
    run_id: str | None = Field(
        default=None, pattern=RUN_ID_PATTERN, description="Plain name of the run folder; empty: a new timestamped one."
    )
    store: str | None = Field(default=None, description="Artifact store (folder or fsspec URL); empty: OUT/.store.")


class GenerateRequest(_Model):
    """Everything that determines a run's images, checked before any model is loaded."""

    prompts: list[StrictStr] | None = Field(default=None, description="Prompts, one image each.")
    prompts_file: PromptsFile | None = Field(default=None, description="Instead: a checked prompts file.")
    negative_prompts: list[StrictStr] | None = None  # one per prompt, or one for every prompt
    seed: int = 0
    model: str = Field(description="Diffusers pipeline folder or Hub id.")
    settings: ImageSettings = Field(default_factory=ImageSettings)
    placement: Placement = Field(default_factory=Placement)
    out: str = "outputs"
    run_id: str

    @property
    def count(self) -> int:
        """How many images the request makes."""
        return len(self.prompts) if self.prompts is not None else self.prompts_file.count

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> GenerateRequest:
        if self.prompts is not None and self.prompts_file is not None:
            raise RequestError("prompts", self.prompts, "give prompts or a prompts file, one of them")
        if self.prompts_file is None and not self.prompts:
            raise RequestError("prompts", self.prompts, ALLOWED["prompts"])
        for i, prompt in enumerate(self.prompts or []):
            if not prompt.strip() or "\x00" in prompt:
                raise RequestError("prompts", self.prompts, f"prompt {i} must be non-empty text")
        for i, prompt in enumerate(self.negative_prompts or []):
            if "\x00" in prompt:
                raise RequestError(
                    "negative_prompts",
                    self.negative_prompts,
                    f"negative prompt {i} must be text without NUL characters",
                )
        if self.negative_prompts is not None and len(self.negative_prompts) not in (1, self.count):
            allowed = f"must hold one negative prompt for every prompt, or one per prompt ({self.count})"
            allowed += f", not {len(self.negative_prompts)}"
            raise RequestError("negative_prompts", self.negative_prompts, allowed)
        if not 0 <= self.seed <= MAX_SEED - self.count:
            raise RequestError("seed", self.seed, f"must be an integer from 0 to {MAX_SEED - self.count}")
        if not _RUN_ID.fullmatch(self.run_id) or self.run_id in {".", ".."}:  # fullmatch: no trailing newline
            raise RequestError("run_id", self.run_id, ALLOWED["run_id"])
        if (info.context or {}).get("check_model", True):
            family = FAMILIES[check_model_dir(self.model, self.placement.variant)["_class_name"]]
            self.settings.check_family(family, self.negative_prompts is not None)
            check_pipeline_stages(self.model, family, self.placement)
            check_quantize(self.model, family, self.placement)
            if self.placement.group_offload and not visible_gpus():
                allowed = "needs a GPU to move the denoiser's groups to as they run; this machine shows none"
                raise RequestError("group_offload", self.placement.group_offload, allowed)
            if self.placement.cache and not family.block_cache:
                allowed = f"needs a denoiser that takes diffusers' cache configs (Flux), not {family.pipeline_class}'s"
                raise RequestError("cache", self.placement.cache, allowed)
            if family.true_cfg and self.negative_prompts is not None and self.settings.true_cfg_scale <= 1:
                allowed = f"{family.pipeline_class} uses negative prompts only with true_cfg_scale > 1"
                raise RequestError("negative_prompts", self.negative_prompts, allowed + " (its guidance is distilled)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.run_id


QUANTIZE_NEEDS = {"int8": "torchao", "int8-weight": "torchao", "float8": "torchao", "nf4": "bitsandbytes"}


def quantized_components(model: str, family: type[Family], placement: Placement) -> tuple[str, ...]:
    """The components `placement.quantize` applies to: those named, or the denoiser and the largest text encoder
    (by the bytes of its weight files)."""
    if placement.quantize is None:
        return ()
    if placement.quantize_components is not None:
        return tuple(dict.fromkeys(placement.quantize_components))
    encoders = [n for n in family.text_components if n.startswith("text_encoder") and (Path(model) / n).is_dir()]
    size = {n: sum(p.stat().st_size for p in weight_files(Path(model) / n, placement.variant)) for n in encoders}
    return (family.denoiser, *([max(encoders, key=lambda name: size[name])] if encoders else []))


def gpu_capabilities() -> list[float]:
    """Each visible NVIDIA GPU's compute capability, asked of nvidia-smi (no CUDA initialised here)."""
    import shutil
    import subprocess

    if not visible_gpus() or shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout  # fmt: skip
        return [float(line) for line in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def check_quantize(model: str, family: type[Family], placement: Placement) -> None:
    """`quantize` and its components against the model, the installed packages and this machine's devices."""
    import importlib.util

    mode = placement.quantize
    if mode is None:
        return
    allowed_components = [family.denoiser, *(n for n in family.text_components if n.startswith("text_encoder"))]
    for name in placement.quantize_components or []:
        if name not in allowed_components:
            allowed = f"must name components of {family.pipeline_class} to quantize: {', '.join(allowed_components)}"
            raise RequestError("quantize_components", placement.quantize_components, allowed)
    package = QUANTIZE_NEEDS[mode]
    if importlib.util.find_spec(package) is None:
        raise RequestError("quantize", mode, f"needs the {package} package (pip install {package})")
    capabilities = gpu_capabilities()
    if mode == "float8" and not any(c >= 8.9 for c in capabilities):
        shown = ", ".join(map(str, capabilities)) or "none"
        allowed = f"needs a CUDA GPU of compute capability 8.9 or more (this machine: {shown})"
        raise RequestError("quantize", mode, allowed)
    if mode == "nf4" and not capabilities:
        raise RequestError("quantize", mode, "needs a CUDA GPU (bitsandbytes' 4-bit kernels); this machine shows none")


def check_pipeline_stages(model: str, family: type[Family], placement: Placement) -> None:
    """`pipeline_stages` and `pipeline_split` against the model's blocks and this machine's GPUs."""
    n, split, micro = placement.pipeline_stages, placement.pipeline_split, placement.micro_batch_size
    if n == 1:
        if split:
            raise RequestError("pipeline_split", split, "needs pipeline_stages > 1")
        if micro is not None:
            raise RequestError("micro_batch_size", micro, "needs pipeline_stages > 1")
        return
    if micro is not None and micro > placement.batch_size:
        raise RequestError("micro_batch_size", micro, f"must be at most batch_size ({placement.batch_size})")
    if not family.denoiser_blocks:
        allowed = f"must be 1 for {family.pipeline_class}: its UNet's skip connections cross its blocks (Flux, SD3: 2+)"
        raise RequestError("pipeline_stages", n, allowed)
    blocks = family.block_names(model)
    if n > len(blocks):
        raise RequestError("pipeline_stages", n, f"must be at most the denoiser's {len(blocks)} blocks")
    gpus = visible_gpus()
    if gpus and n > len(gpus):
        raise RequestError("pipeline_stages", n, f"must be at most the {len(gpus)} visible GPUs (one part per GPU)")
    if placement.max_memory or placement.offload_dir:
        allowed = "places each part whole on its own device: leave max_memory and offload_dir out"
        raise RequestError("pipeline_stages", n, allowed)
    if split is not None:
        at = [blocks.index(name) if name in blocks else -1 for name in split]
        if len(split) != n - 1 or -1 in at or at != sorted(set(at)) or at[0] == 0:
            allowed = (f"must name {n - 1} of the denoiser's blocks in forward order, after the first, where parts "
                       f"2..{n} start ({blocks[0]} .. {blocks[-1]})")  # fmt: skip
            raise RequestError("pipeline_split", split, allowed)


def one_line(exc: ValidationError, prefix: str = "") -> RequestError:
    """The first problem of a pydantic error as a RequestError naming the parameter (our words where we have them)."""
    error = exc.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, RequestError):
        return cause
    loc = [str(p) for p in error["loc"] if p not in ("settings", "placement")]
    if len(loc) >= 2 and loc[0] in ("prompts", "negative_prompts") and loc[1].isdigit():
        loc = [f"{loc[0]}[{loc[1]}]"]  # "prompts.1" -> the offending prompt
    parameter = prefix + (loc[0] if loc else "request")
    allowed = ALLOWED.get(loc[0] if loc else "", error["msg"].removeprefix("Value error, "))
    return RequestError(parameter, error.get("input"), allowed)


def validate_request(check_model: bool = True, **fields: Any) -> GenerateRequest:
    """Build a GenerateRequest or raise RequestError with a one-line message.

    ImageSettings and Placement fields may also be given flat (`steps=2`). `check_model=False` checks
    everything but the model folder (used before the default model is built).
    """
    for group, model in (("settings", ImageSettings), ("placement", Placement)):
        flat = {name: fields.pop(name) for name in list(fields) if name in model.model_fields}
        if flat:
            given = fields.get(group) or {}
            fields[group] = {**(given.model_dump() if isinstance(given, BaseModel) else given), **flat}
    if check_model and isinstance(fields.get("model"), str):
        try:  # the revision is checked before it names a download
            placement = Placement.model_validate(fields.get("placement") or {})
        except ValidationError as exc:
            raise one_line(exc) from None
        fields.update(model=resolve_model(fields["model"], placement.revision), placement=placement)
    try:
        request = GenerateRequest.model_validate(fields, context={"check_model": check_model})
    except ValidationError as exc:
        raise one_line(exc) from None
    if check_model and Path(request.model).exists():  # recorded absolute: a resume from elsewhere finds it
        request = request.model_copy(update={"model": str(Path(request.model).absolute())})
    return request


def resolve_settings(settings: ImageSettings, model: str | Path) -> DenoiseSettings:
    """The settings a run uses: each empty field takes the model family's pipeline default."""
    family = family_for(model)
    height, width = family.default_size(model)
    return DenoiseSettings(
        steps=settings.steps or family.default_steps,
        guidance=family.default_guidance if settings.guidance is None else settings.guidance,
        height=settings.height or height,
        width=settings.width or width,
        max_sequence_length=settings.max_sequence_length or family.default_max_sequence_length,
        true_cfg_scale=settings.true_cfg_scale,
        original_size=settings.original_size,
        crops_coords_top_left=settings.crops_coords_top_left,
        target_size=settings.target_size,
    )


def parse_max_memory(value: str | dict[str, Any] | None) -> dict[str, str] | None:
    """Parse "0=16GiB,1=16GiB,cpu=64GiB" (or a mapping) into {"0": "16GiB", ..., "cpu": "64GiB"}."""
    if value is None or value == "" or value == {}:
        return None
    allowed = (
        'device=size pairs such as "0=16GiB,1=16GiB,cpu=64GiB" '
        "(devices: GPU index or cpu; sizes in B/KB/MB/GB/KiB/MiB/GiB)"
    )
    if isinstance(value, str):
        pairs = [part.split("=", 1) for part in value.split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise RequestError("max_memory", value, allowed)
        mapping = {k.strip(): v.strip() for k, v in pairs}
    elif isinstance(value, dict):
        mapping = {str(k).strip(): str(v).strip() for k, v in value.items()}
    else:
        raise RequestError("max_memory", value, allowed)
    for device, size in mapping.items():
        if not _DEVICE.fullmatch(device) or not _SIZE.fullmatch(size):
            raise RequestError("max_memory", value, allowed)
    gpus = len(visible_gpus())
    for device in mapping:
        index = device.removeprefix("cuda:")
        if index.isdecimal() and int(index) >= gpus:
            raise RequestError("max_memory", value, f"names GPU {index}, but this machine has {gpus} GPU(s)")
    return mapping


def check_gpu_ids(parameter: str, value: Any, devices: list[str]) -> None:
    """GPU ids as CUDA_VISIBLE_DEVICES takes them (device groups): each must be one of the GPUs this process sees,
    or the replica would run on the CPU (no such GPU) or on a GPU CUDA_VISIBLE_DEVICES hides."""
    gpus = visible_gpus()
    for device in devices:
        if device in gpus:
            continue
        if os.environ.get("CUDA_VISIBLE_DEVICES") and gpus:
            allowed = f"names GPU {device}, but CUDA_VISIBLE_DEVICES shows this process only GPU(s) {','.join(gpus)}"
        else:
            allowed = f"names GPU {device}, but this machine has {len(gpus)} GPU(s)"
        raise RequestError(parameter, value, allowed)


def read_text_file(parameter: str, path: str | Path, what: str) -> str:
    """A regular UTF-8 text file's text (a leading BOM dropped), or RequestError naming `parameter`; `what`
    says what the file must be ("UTF-8 text file, one prompt a line").

    Refuses what is not a regular file before opening it (a FIFO would block, a folder fails late)."""
    path = Path(path)
    try:
        regular = path.is_file()
    except OSError:  # e.g. a path through a file ("a.txt/x")
        regular = False
    if not regular:
        raise RequestError(parameter, str(path), f"must be an existing {what} (a regular file)")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(parameter, str(path), f"must be a {what}; byte {exc.start} is not UTF-8") from None
    except OSError as exc:
        raise RequestError(parameter, str(path), f"could not be read ({exc.strerror}); it must be a {what}") from None


def check_model_dir(model: str, variant: str | None = None) -> dict[str, Any]:
    """Check that `model` is a local diffusers pipeline folder we can run (with weights of `variant`, or
    the plain ones); return its model_index.json."""
    path = Path(model)
    if not path.is_dir():
        raise RequestError("model", model, "must be an existing diffusers pipeline folder or a reachable Hub id")
    index_path = path / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError("model", model, "is not a diffusers pipeline: no readable UTF-8 model_index.json") from None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name not in SUPPORTED_PIPELINES:
        raise RequestError(
            "model", model, f"pipeline {class_name!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    for name, entry in index.items():  # every component: [library, class] of a library we load, or null
        if not isinstance(entry, list) and not _COMPONENT.fullmatch(name) and not (path / name).is_dir():
            continue  # pipeline config such as `requires_safety_checker`, `force_zeros_for_empty_prompt`
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str | None) for v in entry)):
            allowed = f"model_index.json entry {name!r} must be [library, class], not {json.dumps(entry)[:40]}"
            raise RequestError("model", model, allowed)
        if entry[0] is not None and not known_library(entry[0]):
            allowed = f"component {name!r} comes from {entry[0]!r}: only diffusers and transformers components load"
            raise RequestError("model", model, allowed + " (never remote code)")
        if entry[0] == "diffusers" and entry[1] is not None and not diffusers_has(entry[1]):
            allowed = f"component {name!r} is declared as diffusers class {entry[1]!r}, which this diffusers lacks"
            raise RequestError("model", model, allowed + " (model_index.json)")
    # The required components, and the optional ones `decode` loads when the model has them (a safety checker).
    optional = [name for name in FAMILIES[class_name].decode_components if (index.get(name) or [None])[0]]
    for component in dict.fromkeys([*REQUIRED_COMPONENTS[class_name], *optional]):
        entry = index.get(component)
        folder = path / component
        if not entry or entry[0] is None or not folder.is_dir() or not any(folder.iterdir()):
            raise RequestError("model", model, f"component {component!r} is missing from the pipeline folder")
        if component not in WEIGHTED_COMPONENTS:
            continue
        if entry[0] == "diffusers":  # its config names the class it was saved as
            try:
                saved = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                raise RequestError("model", model, f"component {component!r}: {component}/config.json is not a "
                                   "readable JSON object") from None  # fmt: skip
            if isinstance(saved, str) and saved != entry[1]:
                allowed = (f"component {component!r} is declared as {entry[1]!r} in model_index.json, but "
                           f"{component}/config.json was saved by {saved!r}")  # fmt: skip
                raise RequestError("model", model, allowed)
        variants = {_variant(m) for m in map(_WEIGHTS.fullmatch, (f.name for f in folder.iterdir())) if m}
        if variant not in variants:
            if variant is None and variants:
                allowed = f"component {component!r} has only variant weights ({', '.join(sorted(variants))})"
                raise RequestError("model", model, allowed + ": pass --variant (placement.variant)")
            if variant is not None and variants:
                allowed = f"component {component!r} has no {variant!r} variant weights (it has: "
                shown = ", ".join(sorted(v or "the plain ones" for v in variants))
                raise RequestError("model", model, f"{allowed}{shown})")
            allowed = (
                f"component {component!r} has no safetensors weights under the names diffusers loads "
                "(diffusion_pytorch_model.safetensors, model.safetensors or their shards; pickled weights are refused)"
            )
            raise RequestError("model", model, allowed)
        for weights in weight_files(folder, variant):
            problem = safetensors_problem(weights)
            if problem:
                raise RequestError("model", model, f"component {component!r}: {component}/{weights.name} {problem}")
    return index


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """A component's safetensors files of `variant` (or the plain ones) under the names diffusers loads."""
    found = ((path, _WEIGHTS.fullmatch(path.name)) for path in folder.iterdir() if path.name.endswith(".safetensors"))
    return sorted(path for path, match in found if match and _variant(match) == variant)


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, read from its header alone (truncated, not safetensors), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(size - 8, 100 * 2**20):
                return "is not a safetensors file (no header)"
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "is not a safetensors file (its header is not a JSON object)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "is not a safetensors file (a tensor without data_offsets)"
    if end > size - 8 - length:
        return f"is truncated: its header places {end} bytes of tensors, the file holds {size - 8 - length}"
    return None


def diffusers_has(class_name: str) -> bool:
    """Whether the installed diffusers exports `class_name` (read from its package's import structure, without
    importing diffusers)."""
    import importlib.util

    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        return True  # not installed here: the stage that loads it will say
    return bool(re.fullmatch(r"\w+", class_name)) and f'"{class_name}"' in _diffusers_init(spec.origin)


@functools.cache
def _diffusers_init(origin: str) -> str:
    return Path(origin).read_text(encoding="utf-8")


def _variant(match: re.Match) -> str | None:
    """The variant of a weights file name matched by _WEIGHTS ("fp16" of model.fp16.safetensors), or None."""
    suffix = match.group(2) or match.group(5)
    return suffix[1:] if suffix else None


def known_library(library: str) -> bool:
    """diffusers, transformers, or one of diffusers' pipeline modules (SD 1.5's `stable_diffusion` safety
    checker); found on disk, without importing diffusers."""
    if library in ("diffusers", "transformers"):
        return True
    import importlib.util

    spec = importlib.util.find_spec("diffusers")
    folders = spec.submodule_search_locations if spec else None
    return bool(re.fullmatch(r"[a-z0-9_]+", library)) and any(
        (Path(folder) / "pipelines" / library).is_dir() for folder in folders or []
    )


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them (without importing torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    folder = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(folder.iterdir())))] if folder.is_dir() else []


def resolve_model(model: str, revision: str | None = None) -> str:
    """A local folder as it is; a Hub id ("org/name") to its snapshot at `revision` (None: main) in the local
    Hugging Face cache, downloaded first if need be (huggingface_hub's progress bars on stderr).

    The stages load that snapshot folder, so the revision is pinned here. A local folder is one revision: a
    `revision` with it is refused, unless the folder is a Hub snapshot (a resumed run's recorded model)."""
    if Path(model).exists() or not re.match(r"^[\w.-]+/[\w.-]+$", model):
        if revision is not None and Path(model).exists() and not is_hub_snapshot(model):
            raise RequestError("revision", revision, "applies to a Hub id; a local folder is one revision")
        return model
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    try:  # safetensors and configs only: never pickled weights
        return snapshot_download(
            model, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
        )
    except RevisionNotFoundError:
        raise RequestError("revision", revision, f"is not a branch, tag or commit of {model} on the Hub") from None
    except LocalEntryNotFoundError:
        if not constants.HF_HUB_OFFLINE:
            raise RequestError("model", model, "is neither a local folder nor a Hub id that could be fetched") from None
        at = "" if revision is None else f" at revision {revision!r}"
        allowed = f"is not in the Hugging Face cache{at} and HF_HUB_OFFLINE=1 forbids downloading it"
        raise RequestError("model", model, allowed) from None
    except (HfHubHTTPError, OSError, ValueError):
        raise RequestError("model", model, "is neither a local folder nor a Hub id that could be fetched") from None


def is_hub_snapshot(path: str | Path) -> bool:
    """A folder of the Hugging Face cache, `.../models--org--name/snapshots/COMMIT`: what resolve_model makes."""
    path = Path(path).absolute()
    return path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--")


def check_store(store: str | None, out: str, options: dict[str, Any] | None = None) -> str:
    """The store a run uses, STORE or OUT/.store by default (absolute), checked without creating anything;
    `options`: a URL store's fsspec storage options."""
    from stagediff.artifacts.store import is_url

    check_storage_options(options)
    if store is None or store == "":
        check_writable("out", out)
        return check_store_folder(Path(out) / ".store")  # held to what --store is: a real folder, writable
    if not is_url(store):
        if Path(store).exists() and not Path(store).is_dir():
            raise RequestError("store", store, "must be a folder (it is created if missing) or an fsspec URL")
        return check_store_folder(store)
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(store, **(options or {}))
    except (ValueError, ImportError, TypeError) as exc:
        allowed = f"must be a folder or a URL of an installed fsspec filesystem ({type(exc).__name__}: {exc})"
        raise RequestError("store", store, allowed.splitlines()[0]) from None
    if fs.protocol and set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) & BUCKET_PROTOCOLS:
        probe_bucket(store, path.split("/")[0], options)
    return store


# Object stores whose URLs start with a bucket (container) that must exist before a run writes into it.
BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def probe_bucket(store: str, bucket: str, options: dict[str, Any] | None) -> None:
    """The bucket of an object store listed once, quickly (few retries, short timeouts), so that an unreachable
    endpoint, a missing bucket or missing credentials is one line before any work, not a traceback later."""
    import fsspec

    protocol = store.split("://", 1)[0]
    quick = dict(options or {})
    if protocol in ("s3", "s3a"):
        config = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 2, "mode": "standard"}}
        quick["config_kwargs"] = {**config, **quick.get("config_kwargs", {})}
    endpoint = (options or {}).get("endpoint_url") or ((options or {}).get("client_kwargs") or {}).get("endpoint_url")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    at = f" at {endpoint}" if endpoint else ""
    try:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **quick)
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise RequestError("store", store, f"its bucket {bucket!r} does not exist{at} (create it first)") from None
    except PermissionError as exc:
        raise RequestError("store", store, f"access to its bucket {bucket!r} is denied{at} ({exc})") from None
    except Exception as exc:  # the filesystems' own errors: botocore's, aiohttp's, ...
        name = type(exc).__name__
        if "Credentials" in name:
            allowed = (f"no credentials for its bucket{at}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                       "key and secret in --storage-options)")  # fmt: skip
        elif isinstance(exc, (OSError, TimeoutError)) or "Connect" in name or "Timeout" in name:
            allowed = f"cannot reach its endpoint{at or ' (the default AWS endpoint)'} ({name})"
        else:
            allowed = f"its bucket {bucket!r} cannot be listed{at} ({name}: {str(exc).splitlines()[0][:200]})"
        raise RequestError("store", store, allowed) from None


# The folders of a local store that a run writes into (artifacts/store.py's layout): objects/ and locks/ hold a
# folder per kind, each holding a folder per key prefix (objects/<kind>/<key[:2]>/).
STORE_FOLDERS = {"objects": True, "locks": True, "runs": False, "requests": False}


def check_store_folder(path: str | Path) -> str:
    """A local store: a folder this process may write into or create (`check_writable`), and so are the folders
    of it that runs write into, where they exist; its absolute path. Else RequestError, nothing created."""
    from stagediff.artifacts.store import KINDS

    check_writable("store", path)
    root = Path(path).absolute()

    def there(folder: Path) -> bool:
        """Whether `folder` exists; RequestError if it is not a folder this process may list and write into."""
        if not folder.exists() and not folder.is_symlink():
            return False
        if not folder.is_dir():
            what = "is not a folder"
        elif not os.access(folder, os.W_OK | os.X_OK):
            what = "is not writable"
        elif not os.access(folder, os.R_OK):
            what = "is not readable"
        else:
            return True
        raise RequestError("store", str(path), f"must be a store this process can write into; {folder} {what}")

    for name, per_kind in STORE_FOLDERS.items():
        if there(root / name) and per_kind:
            for kind in KINDS:
                if there(root / name / kind):
                    for shard in (root / name / kind).iterdir():
                        if len(shard.name) == 2:
                            there(shard)
    return str(root)


# fsspec storage options that s3fs (and the S3 client it makes) takes as strings, and the ones it takes as flags.
STRING_OPTIONS = ("endpoint_url", "key", "secret", "token", "profile", "username", "password")
CLIENT_STRING_OPTIONS = (
    "endpoint_url",
    "region_name",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
)
FLAG_OPTIONS = ("anon", "use_ssl", "requester_pays", "version_aware")
SECRET_OPTIONS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                  "aws_session_token"}  # fmt: skip


def check_storage_options(options: Any) -> None:
    """A URL store's fsspec storage options: a JSON object whose known entries have the types the filesystem
    takes (an endpoint an http(s) URL), else RequestError before any client is made. Unknown entries pass
    through; secrets are never shown."""
    if options is None:
        return

    def refuse(allowed: str) -> NoReturn:
        shown = options if not isinstance(options, dict) else json.dumps(hidden(options), default=str)
        raise RequestError("storage_options", shown, allowed)

    if not isinstance(options, dict):
        refuse('must be a JSON object, e.g. {"endpoint_url": "http://127.0.0.1:9000"}')
    client = options.get("client_kwargs")
    for name in ("client_kwargs", "config_kwargs", "s3_additional_kwargs"):
        if options.get(name) is not None and not isinstance(options[name], dict):
            refuse(f"{name} must be a JSON object")
    entries = [(name, options, name) for name in STRING_OPTIONS]
    entries += [(f"client_kwargs.{name}", client or {}, name) for name in CLIENT_STRING_OPTIONS]
    for shown, where, name in entries:
        value = where.get(name)
        if value is None:
            continue
        if name == "endpoint_url":
            if not isinstance(value, str) or not _ENDPOINT.fullmatch(value):
                refuse(f'{shown} must be an http(s) URL such as "http://127.0.0.1:9000"')
        elif not isinstance(value, str):
            refuse(f"{shown} must be a string")
    for name in FLAG_OPTIONS:
        if options.get(name) is not None and not isinstance(options[name], bool):
            refuse(f"{name} must be true or false")


def hidden(options: Any) -> Any:
    """Storage options as a message may show them: the values of secrets replaced by "***"."""
    if isinstance(options, dict):
        return {k: "***" if k in SECRET_OPTIONS else hidden(v) for k, v in options.items()}
    return options


def check_writable(parameter: str, path: str | Path) -> None:
    """`path` is, or can become, a folder this process may write into: else RequestError, nothing created."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if existing.is_symlink() and existing == path:
        allowed = "is a symbolic link: stagediff writes only into real folders (give the folder it points to)"
        raise RequestError(parameter, str(path), allowed)
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is not a folder"
        raise RequestError(parameter, str(path), f"must be a folder (or not exist yet); it {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RequestError(parameter, str(path), f"must be writable; {existing} is not")


def check_new_folder(parameter: str, path: str | Path) -> None:
    """A folder a command creates: it must not exist yet (or be empty); nothing that is there is ever replaced."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return check_writable(parameter, path)
    if path.exists() or path.is_symlink():
        allowed = "already exists: choose a new folder (nothing that is there is ever deleted or overwritten)"
        raise RequestError(parameter, str(path), allowed)
    check_writable(parameter, path)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
