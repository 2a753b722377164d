"""What every stage shares: dtype, placement, metadata and batching."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

import stagediff
from artifacts import load_tensors
from stagediff.spec import ItemRef, StageContext

log = logging.getLogger("stagediff.stages")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def accelerator_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if accelerator_count() else torch.float32
    return DTYPES[name]


def accelerate_max_memory(max_memory: dict[str, str] | None) -> dict[int | str, str] | None:
    """{"0": "16GiB", "cuda:1": "8GiB", "cpu": "64GiB"} -> accelerate's {0: "16GiB", 1: "8GiB", "cpu": "64GiB"}."""
    if not max_memory:
        return None
    out: dict[int | str, str] = {}
    for device, size in max_memory.items():
        if device.isdigit():
            out[int(device)] = size
        elif device.startswith(("cuda:", "xpu:")):
            out[int(device.split(":")[1])] = size
        else:
            out[device] = size
    return out


def metadata(ctx: StageContext, stage: str, **fields: Any) -> dict[str, str]:
    """safetensors metadata: what produced the artifact."""
    return {
        "stagediff_version": stagediff.__version__,
        "stage": stage,
        "model": str(ctx.model),
        "dtype": ctx.dtype,
        **{k: str(v) for k, v in fields.items()},
    }


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def device_map_of(obj: Any) -> dict[str, str] | None:
    """The accelerate/diffusers device map of a model or pipeline, as strings (for the manifest)."""
    device_map = getattr(obj, "hf_device_map", None)
    if device_map is None:
        return None
    return {str(k): str(v) for k, v in device_map.items()}


def run_path(ctx: StageContext, relative: str) -> Path:
    return Path(ctx.run_dir) / relative


def item_path(ctx: StageContext, folder: str, index: int, suffix: str) -> str:
    """Run-relative path of one item's artifact: `folder/{index:05d}suffix`, or `folder/{name}suffix` if named."""
    stem = (ctx.item_names or {}).get(index, f"{index:05d}")
    return f"{folder}/{stem}{suffix}"


def load_item(ctx: StageContext, ref: ItemRef) -> dict[str, torch.Tensor]:
    """An earlier stage's tensors for one item, verified against its sha256 and provenance."""
    return load_tensors(run_path(ctx, ref.path), ref.sha256, {"model": ctx.model, "index": ref.index})[0]


def quiet_progress_bars() -> None:
    """Stage logs go to the flow run; loading bars on the terminal would only interleave with them."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


quiet_progress_bars()
