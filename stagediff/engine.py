"""The run engine: a list of items through encode -> denoise -> decode against the artifact store.

`generate` and `batch` are thin callers: they turn their request into `Item`s, and the engine
1. names every artifact by its content key (`keys.item_keys`, the one key function),
2. cuts the items into chunks (see `next_chunk_size`), grouped by settings so that batches fill,
3. for each chunk and stage, runs one stage process over the items whose artifact the store lacks
   (none when it lacks nothing); a damaged artifact is computed again with a warning, or stops a
   `strict` run with `ArtifactError` before the stage starts,
4. tells the caller after every stage of every chunk which artifact each item has (`on_stored`), so
   the caller persists its record at once, and reports each stored item as progress.

Every stage process loads its models once for its chunk, and a stage process groups its items by
settings into batches itself: items with other settings never cost another load.
"""

from __future__ import annotations

import functools
import logging
import math
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from stagediff.artifacts import ArtifactError, Store
from stagediff.isolation import run_stage_process
from stagediff.jobs import (
    KIND_OF_STAGE,
    STAGES,
    DecodeItem,
    DecodeJob,
    DenoiseItem,
    DenoiseJob,
    DenoiseSettings,
    EncodeItem,
    EncodeJob,
    ItemRef,
    StageContext,
    StageResult,
)
from stagediff.keys import ModelIdentity, item_keys, model_hash, model_identity, resolve_dtype
from stagediff.progress import Progress
from stagediff.request import GenerateRequest, Placement, RunOptions, resolve_settings

FIRST_CHUNK = 64  # items in the first chunk: up to this many, a run loads each model once
MAX_RELOAD_SHARE = 0.03  # later chunks are sized so that loading again costs at most this share of their work

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image to make: what determines it, all resolved (no "model default" left)."""

    index: int  # its place in the run: prompt i of `generate`, the line's position in `batch`
    prompt: str
    negative_prompt: str | None
    seed: int
    settings: DenoiseSettings

    @property
    def group(self) -> tuple:
        """Items of one group share a batch inside a stage: same settings, negatives all or none."""
        return (self.settings, self.negative_prompt is not None)


@dataclass
class StageRecord:
    """What one stage did over the whole run, for the manifest."""

    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)  # one per stage process: pid, items, loads, ...
    device_map: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)
    environment: dict[str, Any] | None = None  # the device setting its processes saw (CUDA_VISIBLE_DEVICES, threads)
    interrupted: bool = False  # its process failed, died or was cancelled (`computed`: what it had stored)

    def to_dict(self) -> dict[str, Any]:
        first = self.processes[0] if self.processes else {}
        cuda = [p["cuda_max_memory_allocated_mb"] for p in self.processes if p["cuda_max_memory_allocated_mb"]]
        return {
            "skipped": not self.processes,  # every item was in the store: no process started
            "computed": sorted(self.computed),
            "reused": sorted(self.reused),
            "damaged": sorted(self.damaged),
            "pid": first.get("pid"),
            "seconds": round(sum(p["seconds"] for p in self.processes), 4),
            "startup_seconds": round(sum(p["startup_seconds"] for p in self.processes), 4),
            "peak_rss_mb": max((p["peak_rss_mb"] for p in self.processes), default=0.0),
            "cuda_max_memory_allocated_mb": max(cuda, default=None),
            "loads": sum(p["loads"] for p in self.processes),
            "device_map": self.device_map,
            "warnings": self.warnings,
            "environment": self.environment,
            "interrupted": self.interrupted,
            "processes": self.processes,
        }


@dataclass
class Engine:
    """How a run's stages are carried out; `run` takes the items."""

    ctx: StageContext
    identity: ModelIdentity
    tiled_decode: bool = False
    sliced_decode: bool = False
    strict: bool = False
    retries: int = 0
    chunk_size: int | None = None  # None: FIRST_CHUNK, then sized from what the first chunk measured
    tags: set[str] = field(default_factory=set)  # stage task tags (device concurrency limits)
    metadata: bool = True  # PNGs carry what made them (`parameters` and a JSON chunk)
    prefect_tasks: bool = True  # False: stage processes without Prefect tasks (torchrun ranks, local replicas)
    logger: logging.Logger | logging.LoggerAdapter = log
    stages: dict[str, StageRecord] = field(default_factory=dict)  # a stage appears once it has been checked

    def keys(self, item: Item) -> dict[str, str]:
        return item_keys(
            self.identity, item.prompt, item.negative_prompt, item.seed, item.settings, self.ctx.dtype,
            self.tiled_decode, self.sliced_decode, self.metadata,
        )  # fmt: skip

    def run(
        self,
        items: list[Item],
        keys: dict[int, dict[str, str]],
        on_stored: Callable[[str, dict[int, ItemRef]], None],
        progress: Progress | None = None,
    ) -> None:
        """Every item's artifacts into the store; `keys[index]` from `self.keys`, computed by the caller once.

        `on_stored(stage, refs)`: after each stage of each chunk, the refs of that chunk's items.
        """
        progress = progress or Progress(len(items))
        ordered = order_by_group(items)
        chunk_size, start, n = self.chunk_size or FIRST_CHUNK, 0, 0
        while start < len(ordered):
            n += 1
            chunk = ordered[start : start + chunk_size]
            start += len(chunk)
            # "chunk 2/5" where the number of chunks is known (a fixed size, or one chunk), else "chunk 2"
            known = self.chunk_size is not None or (n == 1 and start >= len(ordered))
            label = f"chunk {n}/{math.ceil(len(ordered) / chunk_size)}" if known else f"chunk {n}"
            measured = self.run_chunk(chunk, keys, label, on_stored, progress)
            if self.chunk_size is None and measured:
                chunk_size = next_chunk_size(measured)
                if start < len(ordered):
                    self.logger.info("next chunks: %d items (loading is at most %.0f%% of a chunk's work)",
                                     chunk_size, 100 * MAX_RELOAD_SHARE)  # fmt: skip

    def run_chunk(
        self,
        chunk: list[Item],
        keys: dict[int, dict[str, str]],
        label: str,
        on_stored: Callable[[str, dict[int, ItemRef]], None],
        progress: Progress,
    ) -> list[StageResult]:
        """encode -> denoise -> decode for one chunk; the results of the stage processes that loaded a model."""
        store = self.ctx.open_store()
        refs: dict[int, ItemRef] = {}
        measured = []
        for stage in STAGES:
            kind = KIND_OF_STAGE[stage]
            todo, found = self.missing(store, stage, chunk, keys)
            record = self.stages.setdefault(stage, StageRecord())
            record.reused += list(found)
            if stage == "decode":
                progress.reused(len(found))
            if todo:
                progress.todo(stage, len(todo))
                self.logger.info("%s: %d of %d items to compute [%s]", stage, len(todo), len(chunk), label)
                job = self.job(stage, todo, keys, refs)
                on_item = lambda index, stage=stage: progress.stored(stage, index)  # noqa: E731
                try:
                    if self.prefect_tasks:
                        from stagediff.tasks import run_stage  # the flows' Prefect task (imports Prefect)

                        task = run_stage.with_options(
                            name=stage, task_run_name=f"{stage} [{label}]", retries=self.retries, tags=self.tags
                        )
                        result = task(stage, job, on_item=on_item)
                    else:
                        result = run_stage_process(stage, job, on_item, self.logger)
                except BaseException:  # what its process had stored is in the store: a rerun reuses it
                    record.computed += sorted({i for s, i in progress.seen if s == stage} & {i.index for i in todo})
                    record.interrupted = True
                    raise
                found |= self.collect(store, kind, todo, keys, result)
                record.computed += [item.index for item in todo]
                record.processes.append({**result.process, "items": sorted(r.index for r in result.items),
                                         "loads": result.loads, "load_seconds": result.load_seconds,
                                         "compute_seconds": result.compute_seconds,
                                         **({"pipeline": result.pipeline} if result.pipeline else {})})  # fmt: skip
                record.device_map = record.device_map or result.device_map
                record.environment = record.environment or result.environment
                record.warnings += [w for w in result.warnings if w not in record.warnings]
                if result.loads:
                    measured.append(result)
            else:
                self.logger.info("%s: all %d items in the store, no process started [%s]", stage, len(chunk), label)
            refs = found
            on_stored(stage, refs)
        return measured

    def verify(self, items: list[Item], keys: dict[int, dict[str, str]]) -> None:
        """For a strict run, before anything is written: ArtifactError at the first damaged artifact the store
        holds for these items (a refusal changes nothing, not even the run's record)."""
        store = self.ctx.open_store()
        for item in items:
            for stage in STAGES:
                store.check(KIND_OF_STAGE[stage], keys[item.index][KIND_OF_STAGE[stage]])

    def missing(
        self, store: Store, stage: str, chunk: list[Item], keys: dict[int, dict[str, str]]
    ) -> tuple[list[Item], dict[int, ItemRef]]:
        """The chunk's items whose artifact of `stage` the store lacks, and the refs of those it has.

        A damaged artifact is computed again (logged as a warning), or with `strict` raises ArtifactError.
        """
        kind = KIND_OF_STAGE[stage]
        todo, found = [], {}
        for item in chunk:
            key = keys[item.index][kind]
            try:
                record = store.check(kind, key)
            except ArtifactError as exc:
                if self.strict:
                    raise
                self.logger.warning("%s; computing it again", exc)
                self.stages.setdefault(stage, StageRecord()).damaged.append(item.index)
                record = None
            if record is None:
                todo.append(item)
            else:
                found[item.index] = ItemRef(item.index, kind, key, record.sha256)
        return todo, found

    def job(self, stage: str, todo: list[Item], keys: dict[int, dict[str, str]], refs: dict[int, ItemRef]):
        """The typed job of one stage for the items it has to compute; `refs`: the previous stage's artifacts."""
        if stage == "encode":
            items = [EncodeItem(i.index, i.prompt, i.negative_prompt, i.settings.max_sequence_length,
                                keys[i.index]["embeddings"]) for i in todo]  # fmt: skip
            return EncodeJob(self.ctx, items)
        if stage == "denoise":
            items = [DenoiseItem(i.index, refs[i.index], i.seed, i.settings, keys[i.index]["latents"]) for i in todo]
            return DenoiseJob(self.ctx, items)
        items = [DecodeItem(i.index, refs[i.index], i.settings.height, i.settings.width, keys[i.index]["images"],
                            self.parameters(i) if self.metadata else None) for i in todo]  # fmt: skip
        return DecodeJob(self.ctx, items, tiled=self.tiled_decode, sliced=self.sliced_decode)

    @functools.cached_property
    def model_hash(self) -> str:
        return model_hash(self.identity)

    def parameters(self, item: Item) -> dict[str, Any]:
        """What made an item's image, as its PNG records it: enough to make it again with `stagediff generate`."""
        s = item.settings
        command = ["stagediff", "generate", "--model", self.ctx.model, "--prompt", item.prompt]
        if item.negative_prompt is not None:
            command += ["--negative-prompt", item.negative_prompt]
        command += ["--seed", str(item.seed), "--steps", str(s.steps), "--guidance", str(s.guidance)]
        command += ["--height", str(s.height), "--width", str(s.width), "--max-sequence-length",
                    str(s.max_sequence_length), "--dtype", self.ctx.dtype]  # fmt: skip
        if s.true_cfg_scale != 1:
            command += ["--true-cfg-scale", str(s.true_cfg_scale)]
        for flag, pair in (("--original-size", s.original_size), ("--target-size", s.target_size)):
            if pair is not None:
                command += [flag, f"{pair[0]},{pair[1]}"]
        if s.crops_coords_top_left != (0, 0):
            command += ["--crop-top-left", f"{s.crops_coords_top_left[0]},{s.crops_coords_top_left[1]}"]
        command += ["--tiled-decode"] * self.tiled_decode + ["--sliced-decode"] * self.sliced_decode
        command += ["--variant", self.ctx.variant] if self.ctx.variant else []
        return {
            "prompt": item.prompt,
            "negative_prompt": item.negative_prompt,
            "seed": item.seed,
            "settings": asdict(s),
            "model": self.ctx.model,
            "model_hash": self.model_hash,
            "scheduler": self.identity.scheduler.get("_class_name"),
            "dtype": self.ctx.dtype,
            "tiled_decode": self.tiled_decode,
            "sliced_decode": self.sliced_decode,
            "command": shlex.join(command),
        }

    @staticmethod
    def collect(
        store: Store, kind: str, todo: list[Item], keys: dict[int, dict[str, str]], result: StageResult
    ) -> dict[int, ItemRef]:
        """The refs of the items a stage was given: what it wrote, or what another run wrote meanwhile."""
        refs = {ref.index: ref for ref in result.items}
        for item in todo:
            if item.index not in refs:
                record = store.check(kind, keys[item.index][kind])
                if record is None:
                    name = store.path(store.object_name(kind, keys[item.index][kind]))
                    raise ArtifactError(f"{kind} stage ended without writing {name}")
                refs[item.index] = ItemRef(item.index, kind, record.key, record.sha256)
        return refs


def request_items(request: GenerateRequest) -> list[Item]:
    """A `generate` request's items: prompt i with its negative prompt, seed + i and the resolved settings."""
    settings = resolve_settings(request.settings, request.model)
    negatives = request.negative_prompts or [None] * len(request.prompts)
    return [Item(i, p, negatives[i], request.seed + i, settings) for i, p in enumerate(request.prompts)]


def build_engine(
    model: str,
    placement: Placement,
    store: str,
    work_dir: str,
    options: RunOptions,
    store_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Engine:
    """The engine of a run over `model` with these placement and run options; `kwargs`: Engine's other fields."""
    ctx = StageContext(
        model=model,
        work_dir=work_dir,
        store=store,
        dtype=resolve_dtype(placement.dtype),  # "auto" is asked of a stage process: never torch here
        batch_size=placement.batch_size,
        max_memory=placement.max_memory,
        offload_dir=placement.offload_dir,
        store_options=store_options,
        variant=placement.variant,
        revision=placement.revision,
        pipeline_stages=placement.pipeline_stages,
        pipeline_split=tuple(placement.pipeline_split) if placement.pipeline_split else None,
        micro_batch_size=placement.micro_batch_size,
    )
    return Engine(
        ctx=ctx,
        identity=model_identity(model, placement.variant),
        tiled_decode=placement.tiled_decode,
        sliced_decode=placement.sliced_decode,
        strict=options.strict,
        retries=options.retries,
        chunk_size=options.chunk_size,
        metadata=options.metadata,
        **kwargs,
    )


def order_by_group(items: list[Item]) -> list[Item]:
    """Items of one group together (groups in order of first appearance), so that chunks and batches fill."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    return [item for group in groups.values() for item in group]


def next_chunk_size(measured: list[StageResult]) -> int:
    """Items per chunk such that a chunk's model loads (and process start-ups) cost at most MAX_RELOAD_SHARE
    of its work, from what the stage processes of the last chunk measured; never fewer than FIRST_CHUNK."""
    load = sum(r.load_seconds + (r.process or {}).get("startup_seconds", 0.0) for r in measured)
    per_item = sum(r.compute_seconds / max(1, len(r.items)) for r in measured)
    if per_item <= 0:
        return FIRST_CHUNK
    return max(FIRST_CHUNK, math.ceil(load * (1 - MAX_RELOAD_SHARE) / MAX_RELOAD_SHARE / per_item))
