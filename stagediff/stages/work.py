"""How a stage goes through its items: grouped by settings, in claimed batches, each artifact read
verified from the store, written back with its metadata, and reported to the flow as soon as it is done."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import torch

import stagediff
from stagediff.artifacts import Store
from stagediff.isolation import report
from stagediff.jobs import ItemRef, StageContext, StageResult

log = logging.getLogger("stagediff.stages")
T = TypeVar("T")


def batches(
    store: Store,
    kind: str,
    items: list[T],
    group_of: Callable[[T], Hashable],
    size: int,
    held: list | None = None,
) -> Iterator[list[T]]:
    """The items the store lacks, in batches of `size` whose items share `group_of(item)` (first seen first).

    Each batch is claimed in the store until the caller has written it (see `Store.claimed_batches`; with
    `held`, until the caller releases the claims kept there).
    """
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)
    pause = float(os.environ.get("STAGEDIFF_TEST_BATCH_DELAY") or 0)  # crash tests land their kill between batches
    for group in groups.values():
        for batch in store.claimed_batches(kind, group, lambda item: item.key, size, held=held):
            yield batch
            if pause:
                time.sleep(pause)


def hold_devices(stage: str) -> list[int]:
    """Take this process' GPUs (CUDA_VISIBLE_DEVICES) for as long as it lives: an flock per device, which the
    kernel releases when the process exits or dies, so no crash, kill or server restart can leak it. A stage
    that has to wait says for which device and for whom. No GPU: nothing to hold. Returns the open fds."""
    import fcntl

    from stagediff.default_model import cache_dir
    from stagediff.request import visible_gpus

    folder = cache_dir() / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    held = []
    for gpu in sorted(visible_gpus()):  # one order everywhere: two stages never wait on each other
        path = folder / f"gpu-{''.join(c if c.isalnum() or c in '-_' else '_' for c in gpu)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "another process"
            log.info("waiting for GPU %s: held by %s", gpu, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({stage} stage)\n".encode(), 0)
        held.append(fd)
    return held


def cpu_list(cpus: list[int] | None = None) -> str | None:
    """`cpus` (default: those this process may run on) as "0-3,8" (None where the OS does not say)."""
    if cpus is None and not hasattr(os, "sched_getaffinity"):
        return None
    runs: list[list[int]] = []
    for cpu in sorted(os.sched_getaffinity(0) if cpus is None else cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class Loaded:
    """A stage's models, loaded on first use (a stage with nothing to compute loads nothing), timed; it also
    applies and notes the process' device setting."""

    def __init__(self, load: Callable[[], Any], result: StageResult, stage: str = "stage") -> None:
        self.load, self.result, self.value, self.stage = load, result, None, stage
        self.started = time.perf_counter()
        threads = os.environ.get("STAGEDIFF_TORCH_THREADS")  # a replica's --threads
        if threads:
            torch.set_num_threads(int(threads))
        result.environment = {
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),  # threads that wait sleep (PASSIVE) or spin
            "cpus": cpu_list(),
        }

    def get(self) -> Any:
        if self.value is None:
            self.devices = hold_devices(self.stage)  # held until this stage process exits
            t0 = time.perf_counter()
            self.value = self.load()
            self.result.loads += 1
            self.result.load_seconds += time.perf_counter() - t0
        return self.value

    def finish(self) -> StageResult:
        self.result.compute_seconds = round(time.perf_counter() - self.started - self.result.load_seconds, 4)
        self.result.load_seconds = round(self.result.load_seconds, 4)
        return self.result


def load_tensors(store: Store, ref: ItemRef) -> dict[str, torch.Tensor]:
    """An earlier stage's tensors for one item, verified (sha256, size, key) before use."""
    return store.load_tensors(ref.kind, ref.key)


def metadata(ctx: StageContext, stage: str, **fields: Any) -> dict[str, str]:
    """safetensors / PNG metadata: what produced the artifact."""
    return {
        "stagediff_version": stagediff.__version__,
        "stage": stage,
        "model": str(ctx.model),
        "dtype": ctx.dtype,
        **{k: str(v) for k, v in fields.items()},
    }


def done(result: StageResult, ref: ItemRef) -> None:
    """One item's artifact is in the store: keep its ref and tell the flow (live progress)."""
    result.items.append(ref)
    report("item", ref.index)
