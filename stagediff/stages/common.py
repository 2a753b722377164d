"""What every stage shares: dtype, placement, loading, metadata and batching."""

from __future__ import annotations

import logging
from typing import Any

import torch

import stagediff
from artifacts import Store
from stagediff.family import family_for, model_index
from stagediff.spec import ItemRef, StageContext

log = logging.getLogger("stagediff.stages")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def accelerator_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if accelerator_count() else torch.float32
    return DTYPES[name]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def size_in_bytes(size: str) -> int:
    """ "16GiB" -> 17179869184; "100KB" -> 100000 (accelerate would read a lowercase "kb" as kilobits)."""
    number = size.rstrip("BbKkMmGgTtIi ")
    return int(float(number) * _UNITS[size[len(number) :].strip().upper()])


def dtype_name(name: str) -> str:
    """ "auto" resolved on this machine: "bfloat16" with accelerators, "float32" without."""
    return str(torch_dtype(name)).removeprefix("torch.")


def accelerate_max_memory(max_memory: dict[str, str] | None) -> dict[int | str, int] | None:
    """{"0": "16GiB", "cuda:1": "8GiB", "cpu": "64GiB"} -> accelerate's {0: bytes, 1: bytes, "cpu": bytes}."""
    if not max_memory:
        return None
    out: dict[int | str, int] = {}
    for device, size in max_memory.items():
        if device.isdigit():
            out[int(device)] = size_in_bytes(size)
        elif device.startswith(("cuda:", "xpu:")):
            out[int(device.split(":")[1])] = size_in_bytes(size)
        else:
            out[device] = size_in_bytes(size)
    return out


def load_pipeline(ctx: StageContext, keep: tuple[str, ...], **kwargs: Any):
    """The model's pipeline with only the `keep` components (and the scheduler) loaded from disk.

    Every other component is None, so a stage never loads weights it does not use; `kwargs` go to
    `from_pretrained` (already loaded components, `device_map`, `max_memory`).
    """
    import diffusers

    family = family_for(ctx.model)
    index = model_index(ctx.model)
    skipped = {
        name: None
        for name, entry in index.items()
        if isinstance(entry, list) and name not in (*keep, "scheduler") and name not in kwargs
    }
    if index.get("requires_safety_checker") and "safety_checker" not in keep:
        skipped["requires_safety_checker"] = False  # SD 1.5: the checker runs in `decode`, not missing here
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        ctx.model, dtype=torch_dtype(ctx.dtype), use_safetensors=True, **skipped, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def metadata(ctx: StageContext, stage: str, **fields: Any) -> dict[str, str]:
    """safetensors metadata: what produced the artifact."""
    return {
        "stagediff_version": stagediff.__version__,
        "stage": stage,
        "model": str(ctx.model),
        "dtype": ctx.dtype,
        **{k: str(v) for k, v in fields.items()},
    }


def device_map_of(obj: Any) -> dict[str, str] | None:
    """The accelerate/diffusers device map of a model or pipeline, as strings (for the manifest)."""
    device_map = getattr(obj, "hf_device_map", None)
    if device_map is None:
        return None
    return {str(k): str(v) for k, v in device_map.items()}


def open_store(ctx: StageContext) -> Store:
    return Store(ctx.store_location)


def load_item(ctx: StageContext, ref: ItemRef) -> dict[str, torch.Tensor]:
    """An earlier stage's tensors for one item from the store, verified (sha256, size, key) before use."""
    return open_store(ctx).load_tensors(ref.kind, ref.key)


def quiet_progress_bars() -> None:
    """Stage logs go to the flow run; loading bars on the terminal would only interleave with them."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


quiet_progress_bars()
