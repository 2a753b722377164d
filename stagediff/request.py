"""What a user asks for, validated in one place before any model is loaded or any file is written."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stagediff.family import FAMILIES, Family

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

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$", re.IGNORECASE)
_DEVICE = re.compile(r"^(\d+|cpu|mps|cuda:\d+|xpu:\d+)$")
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """Bad input: `str(error)` is one line naming the parameter, the value and what is allowed."""

    def __init__(self, parameter: str, value: Any, allowed: str) -> None:
        shown = repr(value) if not isinstance(value, str) or len(value) < 80 else repr(value[:77] + "...")
        super().__init__(f"invalid {parameter}={shown}: {allowed}")
        self.parameter, self.value, self.allowed = parameter, value, allowed


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
        if not _DEVICE.match(device) or not _SIZE.match(size):
            raise RequestError("max_memory", value, allowed)
    return mapping


def check_model_dir(model: str) -> dict[str, Any]:
    """Check that `model` is a local diffusers pipeline folder we can run; return its model_index.json."""
    path = Path(model)
    if not path.is_dir():
        raise RequestError("model", model, "must be an existing diffusers pipeline folder or a reachable Hub id")
    index_path = path / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise RequestError("model", model, "is not a diffusers pipeline: no readable model_index.json") from None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name not in SUPPORTED_PIPELINES:
        raise RequestError(
            "model", model, f"pipeline {class_name!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    # The required components, and the optional ones `decode` loads when the model has them (a safety checker).
    optional = [name for name in FAMILIES[class_name].decode_components if (index.get(name) or [None])[0]]
    for component in dict.fromkeys([*REQUIRED_COMPONENTS[class_name], *optional]):
        entry = index.get(component)
        folder = path / component
        if not entry or entry[0] is None or not folder.is_dir() or not any(folder.iterdir()):
            raise RequestError("model", model, f"component {component!r} is missing from the pipeline folder")
        if component in WEIGHTED_COMPONENTS and not any(folder.glob("*.safetensors")):
            allowed = f"component {component!r} has no .safetensors weights (pickled weights are refused)"
            raise RequestError("model", model, allowed)
    return index


def resolve_model(model: str) -> str:
    """A local folder as it is; a Hub id ("org/name") to its snapshot in the local Hugging Face cache."""
    if Path(model).exists() or not re.match(r"^[\w.-]+/[\w.-]+$", model):
        return model
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # safetensors and configs only: never pickled weights
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        raise RequestError("model", model, "is neither a local folder nor a Hub id that could be fetched") from None


class Placement(BaseModel):
    """Where the stages put the weights. Empty means: accelerators if any, else the CPU."""

    model_config = ConfigDict(extra="forbid")

    max_memory: dict[str, str] | None = Field(
        default=None, description='Memory per device, e.g. {"0": "16GiB", "1": "16GiB", "cpu": "64GiB"}.'
    )
    offload_dir: str | None = Field(default=None, description="Folder for weights offloaded to disk.")

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, value: Any) -> dict[str, str] | None:
        return parse_max_memory(value)


class GenerateRequest(BaseModel):
    """Everything that determines a run's images, checked before any model is loaded."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[StrictStr] = Field(description="Prompts, one image each.")
    negative_prompts: list[StrictStr] | None = Field(
        default=None, description="One negative prompt per prompt; FLUX.1 needs true_cfg_scale > 1 for them."
    )
    model: str = Field(description="Diffusers pipeline folder or Hub id.")
    steps: int = Field(default=28, description="Denoising steps.")
    guidance: float = Field(
        default=3.5, description="Classifier-free guidance scale (FLUX.1-dev: its distilled guidance)."
    )
    true_cfg_scale: float = Field(default=1.0, description="FLUX.1 only: > 1 runs true CFG with the negative prompts.")
    height: int = Field(default=1024, description="Image height in pixels, a multiple of 16.")
    width: int = Field(default=1024, description="Image width in pixels, a multiple of 16.")
    seed: int = Field(default=0, description="Prompt i gets its noise from Generator('cpu').manual_seed(seed + i).")
    max_sequence_length: int = Field(default=512, description="T5 tokens per prompt (1..512).")
    batch_size: int = Field(default=1, description="Prompts per forward pass in each stage.")
    dtype: Dtype = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU.")
    original_size: tuple[int, int] | None = Field(
        default=None, description="SDXL micro-conditioning (height, width); empty: the image size."
    )
    crops_coords_top_left: tuple[int, int] = Field(default=(0, 0), description="SDXL micro-conditioning (top, left).")
    target_size: tuple[int, int] | None = Field(
        default=None, description="SDXL micro-conditioning (height, width); empty: the image size."
    )
    tiled_decode: bool = Field(default=False, description="Decode in VAE tiles (bounded memory for large images).")
    sliced_decode: bool = Field(default=False, description="Decode one image of a batch at a time.")
    placement: Placement = Field(default_factory=Placement)
    out: str = Field(default="outputs", description="Output root; the run writes under OUT/RUN_ID/.")
    run_id: str = Field(description="Plain name of the run folder under OUT.")

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, prompts: list[str]) -> list[str]:
        if not prompts:
            raise ValueError("at least one prompt is required")
        for i, prompt in enumerate(prompts):
            if not prompt.strip() or "\x00" in prompt:
                raise ValueError(f"prompt {i} must be non-empty text")
        return prompts

    @field_validator("negative_prompts")
    @classmethod
    def _negative_prompts(cls, negative_prompts: list[str] | None) -> list[str] | None:
        for i, prompt in enumerate(negative_prompts or []):
            if "\x00" in prompt:
                raise ValueError(f"negative prompt {i} must be text without NUL characters")
        return negative_prompts

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> GenerateRequest:
        if not 1 <= self.steps <= 1000:
            raise RequestError("steps", self.steps, "must be an integer from 1 to 1000")
        if not (self.guidance >= 0 and self.guidance != float("inf")):
            raise RequestError("guidance", self.guidance, "must be a finite number >= 0")
        if not (self.true_cfg_scale >= 1 and self.true_cfg_scale != float("inf")):
            raise RequestError("true_cfg_scale", self.true_cfg_scale, "must be a finite number >= 1 (1: off)")
        if self.negative_prompts is not None and len(self.negative_prompts) != len(self.prompts):
            allowed = (
                f"must hold one negative prompt per prompt ({len(self.prompts)}), not {len(self.negative_prompts)}"
            )
            raise RequestError("negative_prompts", self.negative_prompts, allowed)
        for name in ("original_size", "target_size"):
            size = getattr(self, name)
            if size is not None and not all(0 < v <= 16384 for v in size):
                raise RequestError(name, size, "must be (height, width) in pixels, each from 1 to 16384")
        if not all(0 <= v <= 16384 for v in self.crops_coords_top_left):
            allowed = "must be (top, left) in pixels, each from 0 to 16384"
            raise RequestError("crops_coords_top_left", self.crops_coords_top_left, allowed)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % 16 or value > 16384:
                raise RequestError(name, value, "must be a positive multiple of 16 (at most 16384)")
        if not 0 <= self.seed <= MAX_SEED - len(self.prompts):
            raise RequestError("seed", self.seed, f"must be an integer from 0 to {MAX_SEED - len(self.prompts)}")
        if not 1 <= self.max_sequence_length <= 512:
            raise RequestError("max_sequence_length", self.max_sequence_length, "must be an integer from 1 to 512")
        if self.batch_size < 1:
            raise RequestError("batch_size", self.batch_size, "must be an integer >= 1")
        if not _RUN_ID.match(self.run_id) or self.run_id in {".", ".."}:
            raise RequestError("run_id", self.run_id, "must be a plain name: letters, digits, '.', '_' or '-', no '/'")
        if (info.context or {}).get("check_model", True):
            self._check_family(FAMILIES[check_model_dir(self.model)["_class_name"]])
        return self

    def _check_family(self, family: type[Family]) -> None:
        """Options that only some families take; another family would ignore them, so refuse them."""
        name = family.pipeline_class
        if family.true_cfg:
            if self.true_cfg_scale > 1 and self.negative_prompts is None:
                raise RequestError("true_cfg_scale", self.true_cfg_scale, "> 1 needs negative_prompts")
            if self.negative_prompts is not None and self.true_cfg_scale <= 1:
                allowed = f"{name} uses negative prompts only with true_cfg_scale > 1 (its guidance is distilled)"
                raise RequestError("negative_prompts", self.negative_prompts, allowed)
        elif self.true_cfg_scale != 1:
            allowed = f"only FLUX.1 takes it; {name} guides with guidance and negative_prompts"
            raise RequestError("true_cfg_scale", self.true_cfg_scale, allowed)
        if not family.micro_conditioning:
            for field in ("original_size", "crops_coords_top_left", "target_size"):
                if getattr(self, field) != GenerateRequest.model_fields[field].default:
                    raise RequestError(field, getattr(self, field), f"is SDXL micro-conditioning; {name} takes none")

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.run_id

    def seed_of(self, index: int) -> int:
        return self.seed + index


def validate_request(check_model: bool = True, **fields: Any) -> GenerateRequest:
    """Build a GenerateRequest or raise RequestError with a one-line message.

    `check_model=False` checks everything but the model folder (used before the default model is built).
    """
    if check_model and isinstance(fields.get("model"), str):
        fields["model"] = resolve_model(fields["model"])
    try:
        return GenerateRequest.model_validate(fields, context={"check_model": check_model})
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, RequestError):
            raise cause from None
        parameter = ".".join(str(p) for p in error["loc"]) or "request"
        if parameter.startswith("prompts."):  # "prompts.1" -> the offending prompt
            parameter = f"prompts[{parameter.split('.', 1)[1]}]"
        message = error["msg"].removeprefix("Value error, ")
        raise RequestError(parameter, error.get("input"), message) from None
