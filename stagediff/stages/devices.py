"""Devices and dtypes: what the stages make of `dtype` and `max_memory`, in torch's and accelerate's terms."""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def accelerator_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if accelerator_count() else torch.float32
    return DTYPES[name]


def dtype_name(name: str) -> str:
    """ "auto" resolved on this machine: "bfloat16" with accelerators, "float32" without."""
    return str(torch_dtype(name)).removeprefix("torch.")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def size_in_bytes(size: str) -> int:
    """ "16GiB" -> 17179869184; "100KB" -> 100000 (accelerate would read a lowercase "kb" as kilobits)."""
    number = size.rstrip("BbKkMmGgTtIi ")
    return int(float(number) * _UNITS[size[len(number) :].strip().upper()])


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


def device_map_of(obj: Any) -> dict[str, str] | None:
    """The accelerate/diffusers device map of a model or pipeline, as strings (for the manifest)."""
    device_map = getattr(obj, "hf_device_map", None)
    if device_map is None:
        return None
    return {str(k): str(v) for k, v in device_map.items()}
