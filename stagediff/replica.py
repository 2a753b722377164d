"""Data-parallel replicas: a run's items cut into contiguous shares, each an engine run of its own.

A replica is one process (forked from the fan-out flow's stage forkserver, a flow run on a pool worker, or
a torchrun/accelerate rank) whose stage processes see only its devices (`CUDA_VISIBLE_DEVICES`) or,
without GPUs, run on its share of the cores. It writes into the shared store and returns only store keys:
whoever started it gathers the items by index. Item i is seeded with `seed + i` wherever it runs,
so its image is the one a single replica would make.

On the CPU the last bit of some kernels (oneDNN convolutions, whole-tensor sums) depends on how many
threads compute them, so a CPU replica keeps the thread count a plain one-process run gets and takes
its share of the cores by CPU affinity: its images are the plain pipeline's, bit for bit. `threads`
trades that for speed (e.g. one thread per core); the stage processes wait passively between
parallel regions (see stagediff/forkserver.py), so more threads than cores do not spin.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stagediff.artifacts.store import is_url
from stagediff.isolation import outnumbered, oversubscribed
from stagediff.request import ImageSettings, Placement, RequestError, RunOptions, check_gpu_ids, visible_gpus
from stagediff.sources import Source

if TYPE_CHECKING:
    from stagediff.artifacts import Store

log = logging.getLogger("stagediff.replica")


class ReplicaJob(BaseModel):
    """What one replica computes and where: its range of a request's items (stored once, in the store; never
    the items themselves), the model, the store, its devices."""

    model_config = ConfigDict(extra="forbid")

    replica: int = Field(ge=0, description="0-based replica number.")
    model: str
    kind: Literal["generate", "batch"] = Field(default="generate", description="How items are made of the source.")
    source: Source = Field(description="The request's items as stored: the prompts (generate) or the batch file.")
    start: int = Field(ge=0, description="First item (0-based position in the source).")
    stop: int = Field(ge=0, description="One past the last item.")
    seed: int = Field(default=0, ge=0, description="Base seed: item i gets seed + i (unless a batch row says).")
    negative_prompts: list[str] | None = Field(default=None, description="generate: one for all, or one per item.")
    settings: ImageSettings = Field(default_factory=ImageSettings, description="The run's (a batch row's on top).")
    placement: Placement = Field(default_factory=Placement)
    options: RunOptions = Field(default_factory=RunOptions)
    store: str = Field(description="The shared artifact store: a folder (one machine) or a URL.")
    store_options: dict[str, Any] | None = None
    devices: str | None = Field(default=None, description="CUDA_VISIBLE_DEVICES of its processes; None: as given.")
    cpus: list[int] | None = Field(default=None, description="The CPUs its processes run on; None: as given.")
    threads: int | None = Field(default=None, ge=1, description="torch threads of its stage processes; None: torch's.")
    work_dir: str | None = Field(default=None, description="Its folder for offloaded weights; None: a temporary one.")
    result: str = Field(description="Store-relative name of its result; its journal's segments are in RESULT/.")
    title: str = Field(default="", description="Its name in the UI: replica 1/2 of fan-out RUN (items 0-47).")

    @property
    def journal(self) -> str:
        return self.result.removesuffix(".json")

    @property
    def count(self) -> int:
        return self.stop - self.start


class Journal:
    """A replica's record as it goes, for whoever gathers it: one small segment object per engine report
    (`JOURNAL/00000042.json`: the items listed before a chunk, or what a stage stored), written whole (one PUT)."""

    def __init__(self, store: Store, prefix: str, ids: dict[int, tuple[str, int | None]]) -> None:
        self.store, self.prefix, self.ids, self.seq = store, prefix, ids, 0

    def write(self, segment: dict[str, Any]) -> None:
        self.store.write(f"{self.prefix}/{self.seq:08d}.json", json.dumps(segment, separators=(",", ":")).encode())
        self.seq += 1

    def listed(self, items: list, keys: dict[int, dict[str, str]]) -> None:
        from stagediff.record import item_row

        rows = []
        for item in items:
            item_id, line = self.ids.get(item.index) or (f"{item.index:05d}", None)
            rows.append(item_row(item, keys[item.index], item_id, line))
        self.write({"listed": rows})

    def stored(self, stored: Any) -> None:
        from stagediff.jobs import KIND_OF_STAGE

        refs = {i: [ref.key, ref.sha256, stored.made.get(i, "reused")] for i, ref in stored.refs.items()}
        self.write({"kind": KIND_OF_STAGE[stored.stage], "refs": refs, "whole": stored.whole})
        if stored.stage == "decode":
            for index in stored.refs:
                self.ids.pop(index, None)


def job_items(job: ReplicaJob, store: Store, ids: dict[int, tuple[str, int | None]]) -> Iterator[Any]:
    """The engine Items of a job's range, read from the stored source one at a time; a batch item's id and line
    go into `ids` (for the journal) as it is made."""
    from stagediff.sources import open_source

    if job.kind == "generate":
        from stagediff.engine import request_items
        from stagediff.request import GenerateRequest

        request = GenerateRequest.model_construct(model=job.model, settings=job.settings, seed=job.seed,
                                                  negative_prompts=job.negative_prompts)  # fmt: skip
        yield from request_items(request, job.source, store, job.start, job.stop)
        return
    from stagediff.batch import run_items

    with open_source(store, job.source) as stream:
        rows = run_items(stream, job.source.format, job.seed, job.settings, job.model, job.source.name, job.start)
        for row, item in rows:
            if row.position >= job.stop:
                return
            ids[item.index] = (row.id, row.line)
            yield item


def split(count: int, shares: int) -> list[range]:
    """Contiguous shares of `count` items, as accelerate's `split_between_processes` cuts them: the first
    `count % shares` one item longer; with more shares than items, the last ones are empty. No padding."""
    size, extra = divmod(count, shares)
    ranges, start = [], 0
    for share in range(shares):
        stop = start + size + (1 if share < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def parse_device_groups(value: str | list[str]) -> list[str]:
    """ "0,1;2,3" (or ["0,1", "2,3"]) -> ["0,1", "2,3"]; ValueError naming what is wrong."""
    groups = value.split(";") if isinstance(value, str) else list(value)
    groups = [group.replace(" ", "") for group in groups]
    seen: set[str] = set()
    for group in groups:
        devices = group.split(",")
        if not group or not all(device.isascii() and device.isdigit() for device in devices):
            raise ValueError('must be device groups such as "0,1;2,3": GPU indexes, "," within a group, ";" between')
        if seen & set(devices):
            raise ValueError("a device may belong to one group only")
        seen |= set(devices)
    return groups


def cpu_shares(replicas: int, cpus: list[int] | None = None) -> list[list[int]]:
    """`cpus` (default: the CPUs this process may run on) cut into contiguous shares, one per replica, the
    first ones one CPU longer when uneven; with more replicas than CPUs, replica r gets CPU r mod count."""
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if replicas > len(cpus):
        return [[cpus[r % len(cpus)]] for r in range(replicas)]
    return [cpus[share.start : share.stop] for share in split(len(cpus), replicas)]


def default_torch_threads() -> int:
    """The intra-op threads torch gives a fresh process here when no OMP_NUM_THREADS or MKL_NUM_THREADS is set
    (its physical cores): what the plain pipeline computes with. torchrun and accelerate set OMP_NUM_THREADS=1
    in their ranks; torch's inter-op default comes from the same core count and no variable changes it."""
    import torch

    return torch.get_num_interop_threads()


def plan_replicas(
    replicas: int | None,
    device_groups: str | list[str] | None,
    pool: str | None,
    store: str | None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Each replica's devices, CPUs and threads, or RequestError (one line) before anything is written.

    Without GPUs each replica runs on its share of the cores (`cpus`), with `threads` torch threads (default:
    torch's own count, as a plain run, for the same bits). More replicas than items is allowed: the extra
    ones stay idle (they start no process)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise RequestError("threads", threads, "must be an integer >= 1")
    if replicas is not None and device_groups is not None:
        raise RequestError("replicas", replicas, "give replicas or device_groups, not both")
    if pool is not None and (store is None or not is_url(store)):
        allowed = "a pool's replicas run on other machines: the store must be a URL they all reach (s3://...)"
        raise RequestError("store", store, allowed)
    if device_groups is not None:
        try:
            groups = parse_device_groups(device_groups)
        except ValueError as exc:
            raise RequestError("device_groups", device_groups, str(exc)) from None
        if pool is None:  # a pool's workers have GPUs of their own
            check_gpu_ids("device_groups", device_groups, [d for group in groups for d in group.split(",")])
        return [{"devices": group, "cpus": None, "threads": None} for group in groups]
    if replicas is None:
        replicas = 1
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise RequestError("replicas", replicas, "must be an integer >= 1")
    if pool is not None:
        return [{"devices": None, "cpus": None, "threads": None} for _ in range(replicas)]  # the workers decide
    gpus = visible_gpus()
    if gpus:
        if replicas > len(gpus):
            raise RequestError("replicas", replicas, f"must be at most the {len(gpus)} GPUs of this machine")
        per = len(gpus) // replicas
        groups = [",".join(gpus[r * per : (r + 1) * per]) for r in range(replicas)]
        return [{"devices": group, "cpus": None, "threads": None} for group in groups]
    return [{"devices": None, "cpus": cpus, "threads": threads} for cpus in cpu_shares(replicas)]  # no GPU


def apply_devices(job: ReplicaJob) -> None:
    """Pin this process' stage processes to the replica's devices: set before the stage forkserver starts,
    which they are forked from (and `STAGEDIFF_TORCH_THREADS`, which every stage process applies). The CPU
    affinity is this process' own, so every process it starts inherits it."""
    if job.devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = job.devices
    if job.cpus is not None and hasattr(os, "sched_setaffinity"):  # Linux; elsewhere the OS places them
        os.sched_setaffinity(0, job.cpus)
    if job.threads is not None:
        os.environ["STAGEDIFF_TORCH_THREADS"] = str(job.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(job.threads))


def run_replica(job: ReplicaJob, prefect_tasks: bool = False, logger: Any = None) -> dict[str, Any]:
    """Compute the share's items into the store, journaling each chunk's record as it goes (`Journal`); return a
    small result (also written to the store): what each stage did, where it ran."""
    from stagediff.engine import build_engine
    from stagediff.isolation import warm_up

    started = time.time()
    apply_devices(job)
    warm_up(job.model, job.placement.compile, spin=job.placement.spinning)
    work_dir = job.work_dir or tempfile.mkdtemp(prefix=f"stagediff-replica-{job.replica}-")
    engine = build_engine(
        job.model, job.placement, job.store, work_dir, job.options, job.store_options,
        prefect_tasks=prefect_tasks, logger=logger or log,
    )  # fmt: skip
    store = engine.ctx.open_store()
    ids: dict[int, tuple[str, int | None]] = {}
    journal = Journal(store, job.journal, ids)
    engine.run(job_items(job, store, ids), on_stored=journal.stored, on_listed=journal.listed)
    result = {
        "replica": job.replica,
        "pid": os.getpid(),
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpus": job.cpus,
        "threads": job.threads,
        "dtype": engine.ctx.dtype,
        "seconds": round(time.time() - started, 3),
        "items": [job.start, job.stop],
        "segments": journal.seq,
        "stages": {name: info.to_dict() for name, info in engine.stages.items()},
    }
    store.write(job.result, json.dumps(result).encode())
    return result


def run_local_replica(job: ReplicaJob) -> dict[str, Any]:
    """A local replica, in a process forked from the stage forkserver: its own stage processes fork from it
    in turn (everything is imported already, and no accelerator was ever touched). Unless its threads outnumber
    its cores and the forkserver made them spin (it did not know of CPU replicas): then they come from a
    forkserver of the replica's own, which makes them sleep (see `isolation.set_wait_policy`)."""
    apply_devices(job)
    spinning = "OMP_WAIT_POLICY" not in os.environ  # as the forkserver set it (or the user did)
    os.environ["STAGEDIFF_START_METHOD"] = "forkserver" if spinning and oversubscribed() else "fork"
    return run_replica(job)


def cpu_replicas(groups: list[dict[str, Any]] | None) -> bool:
    """Whether `plan_replicas`' replicas include local CPU ones whose threads outnumber their cores."""
    return any(g["cpus"] is not None and outnumbered(g["threads"], len(g["cpus"])) for g in groups or [])
