"""The run engine: a list of items through encode -> denoise -> decode against the artifact store.

`generate` and `batch` are thin callers: they stream their request's items (`Item`s, made one at a time
from the request's stored copy), and the engine
1. names every artifact by its content key (`keys.item_keys`, the one key function),
2. passes over the items whose image the store already holds (verified) without touching their earlier
   stages, and cuts the others into chunks as they come (see `next_chunk_size`), each grouped by settings
   so that batches fill: memory is bounded by a chunk, never by the run,
3. for each chunk and stage, runs one stage process over the items whose artifact the store lacks
   (none when it lacks nothing); a damaged artifact is computed again with a warning, or stops a
   `strict` run with `ArtifactError` before the stage starts,
4. tells the caller after every stage of every chunk which artifact each item has (`on_stored`), so
   the caller records it at once, and reports each stored item as progress.

Every stage process loads its models once for its chunk, and a stage process groups its items by
settings into batches itself: items with other settings never cost another load.
"""

from __future__ import annotations

import functools
import logging
import math
import shlex
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from stagediff.artifacts import ArtifactError, Store, atomic_write_bytes
from stagediff.default_model import cache_dir
from stagediff.family import family_for
from stagediff.isolation import run_isolated, run_stage_process
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
from stagediff.keys import (
    ModelIdentity,
    digest,
    item_keys,
    key_context,
    model_hash,
    model_identity,
    resolve_dtype,
)
from stagediff.progress import Progress
from stagediff.request import (
    GenerateRequest,
    Placement,
    RequestError,
    RunOptions,
    quantized_components,
    resolve_settings,
)

if TYPE_CHECKING:
    from stagediff.sources import Source

FIRST_CHUNK = 64  # items in the first chunk: up to this many, a run loads each model once
MAX_RELOAD_SHARE = 0.03  # later chunks are sized so that loading again costs at most this share of their work
DONE_BATCH = 256  # items found done are reported to the caller this many at a time
RECENT_PROCESSES = 8  # stage processes the summary lists per stage (the record lists every one)

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
    """What one stage did over the whole run, in counts: its size does not grow with the run."""

    computed: int = 0
    reused: int = 0
    damaged: int = 0  # found damaged in the store, computed again
    process_count: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_PROCESSES))  # the last processes' entries
    pid: int | None = None  # of the first process
    seconds: float = 0.0
    startup_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cuda_max_memory_allocated_mb: float | None = None
    loads: int = 0
    device_map: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)
    environment: dict[str, Any] | None = None  # the device setting its processes saw (CUDA_VISIBLE_DEVICES, threads)
    interrupted: bool = False  # its process failed, died or was cancelled (`computed`: what it had stored)

    def add_process(self, entry: dict[str, Any]) -> None:
        self.process_count += 1
        self.recent.append(entry)
        self.pid = self.pid or entry.get("pid")
        self.seconds += entry.get("seconds", 0.0)
        self.startup_seconds += entry.get("startup_seconds", 0.0)
        self.peak_rss_mb = max(self.peak_rss_mb, entry.get("peak_rss_mb", 0.0))
        cuda = entry.get("cuda_max_memory_allocated_mb")
        if cuda:
            self.cuda_max_memory_allocated_mb = max(self.cuda_max_memory_allocated_mb or 0.0, cuda)
        self.loads += entry.get("loads", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "skipped": not self.process_count,  # every item was in the store: no process started
            "computed": self.computed,
            "reused": self.reused,
            "damaged": self.damaged,
            "pid": self.pid,
            "seconds": round(self.seconds, 4),
            "startup_seconds": round(self.startup_seconds, 4),
            "peak_rss_mb": self.peak_rss_mb,
            "cuda_max_memory_allocated_mb": self.cuda_max_memory_allocated_mb,
            "loads": self.loads,
            "device_map": self.device_map,
            "warnings": self.warnings,
            "environment": self.environment,
            "interrupted": self.interrupted,
            "process_count": self.process_count,
            "processes": list(self.recent),  # the last RECENT_PROCESSES; the record holds every one
        }


@dataclass
class Stored:
    """What a stage stored for a chunk (or what the store held): the caller records it."""

    stage: str
    items: list[Item]  # the items this report is about
    keys: dict[int, dict[str, str]]  # index -> its content keys
    refs: dict[int, ItemRef]  # index -> the stage's artifact
    made: dict[int, str]  # index -> computed | reused | recomputed (was damaged)
    whole: bool = False  # the store held these items' images before any stage ran: the run made none of their parts


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
    on_process: Callable[[str, dict[str, Any]], None] | None = None
    on_listed: Callable[[list[Item], dict[int, dict[str, str]]], None] | None = None
    on_known: Callable[[list[Item]], None] | None = None

    def key_arguments(self) -> dict[str, Any]:
        """`item_keys`' arguments but the item's own: the one list that both `keys` and `key_context` pass, so
        that a rerun's key shortcut can never miss one."""
        return {"model": self.identity, "dtype": self.ctx.dtype, "tiled": self.tiled_decode,
                "sliced": self.sliced_decode, "metadata": self.metadata, "named": self.ctx.model,
                "levers": self.ctx.levers, "encode_levers": self.ctx.encode_levers}  # fmt: skip

    def keys(self, item: Item) -> dict[str, str]:
        return item_keys(prompt=item.prompt, negative_prompt=item.negative_prompt, seed=item.seed,
                         settings=item.settings, **self.key_arguments())  # fmt: skip

    def key_context(self) -> str:
        """What `keys` depends on besides the item (see `keys.key_context`)."""
        return key_context(**self.key_arguments())

    def keys_into(self, keys: dict[int, dict[str, str]], item: Item) -> dict[str, str]:
        """The item's keys, made once: kept in `keys`."""
        found = keys.get(item.index)
        if found is None:
            found = keys[item.index] = self.keys(item)
        return found

    def run(
        self,
        items: Iterable[Item],
        on_stored: Callable[[Stored], None],
        progress: Progress | None = None,
        on_process: Callable[[str, dict[str, Any]], None] | None = None,
        on_listed: Callable[[list[Item], dict[int, dict[str, str]]], None] | None = None,
        known: Callable[[Item, Callable[[], dict[str, str]]], bool] | None = None,
        on_known: Callable[[list[Item]], None] | None = None,
    ) -> None:
        """Every item's artifacts into the store, the items taken one at a time as they come.

        `known(item, keys_of)`: True for an item the caller's record holds done with the item's keys (`keys_of()`
        makes them, for a record that does not hold them already), its image checked (a rerun's done items cost
        a record look-up, not a store read); `on_known(items)` is all that is said of them.

        `on_listed(items, keys)`: before a chunk's stages (and before items found done are reported), so the
        caller records the items and their keys first; `on_stored(stored)`: after each stage of each chunk
        (and for each DONE_BATCH items whose image the store held), what was stored; `on_process(stage,
        entry)`: each stage process, as it ends.
        """
        progress = progress or Progress(0)
        self.on_process, self.on_listed, self.on_known = on_process, on_listed, on_known
        store = self.ctx.open_store()
        chunk_size, n = self.chunk_size or FIRST_CHUNK, 0
        pending: list[Item] = []
        keys: dict[int, dict[str, str]] = {}
        done: list[tuple[Item, ItemRef]] = []
        already: list[Item] = []
        for item in items:
            if known is not None and known(item, functools.partial(self.keys_into, keys, item)):
                already.append(item)
                if len(already) >= DONE_BATCH:
                    self.report_known(already, keys, progress)
                    for item in already:
                        keys.pop(item.index, None)
                    already = []
                continue
            ref = self.image_in_store(store, item, self.keys_into(keys, item))
            if ref is not None:
                done.append((item, ref))
                if len(done) >= DONE_BATCH:
                    self.report_done(done, keys, on_stored, progress)
                    for item, _ in done:
                        del keys[item.index]
                    done = []
                continue
            pending.append(item)
            if len(pending) < chunk_size:
                continue
            self.report_done(done, keys, on_stored, progress)  # every item before the chunk is reported: then
            self.report_known(already, keys, progress)  # the keys of the chunk's items are the only ones left
            done, already, n = [], [], n + 1
            measured = self.run_chunk(order_by_group(pending), keys, f"chunk {n}", on_stored, progress)
            pending, keys = [], {}
            if self.chunk_size is None and measured:
                size = next_chunk_size(measured)
                if size != chunk_size:
                    self.logger.info("next chunks: %d items (loading is at most %.0f%% of a chunk's work)",
                                     size, 100 * MAX_RELOAD_SHARE)  # fmt: skip
                chunk_size = size
        self.report_done(done, keys, on_stored, progress)
        self.report_known(already, keys, progress)
        if pending:
            self.run_chunk(order_by_group(pending), keys, f"chunk {n + 1}", on_stored, progress)

    def image_in_store(self, store: Store, item: Item, keys: dict[str, str]) -> ItemRef | None:
        """The item's image when the store holds it, verified (its earlier stages are then not needed)."""
        try:
            record = store.check("images", keys["images"])
        except ArtifactError:
            if self.strict:
                raise
            return None  # its chunk's decode stage finds it damaged again: warns, counts and computes it once
        return None if record is None else ItemRef(item.index, "images", keys["images"], record.sha256)

    def report_known(self, items: list[Item], keys: dict[int, dict[str, str]], progress: Progress) -> None:
        """Items the caller's record holds done: listed again (this run saw them), reused by every stage."""
        if not items:
            return
        if self.on_known is not None:
            self.on_known(items)
        for stage in STAGES:
            self.stages.setdefault(stage, StageRecord()).reused += len(items)
        progress.reused(len(items))

    def report_done(
        self,
        done: list[tuple[Item, ItemRef]],
        keys: dict[int, dict[str, str]],
        on_stored: Callable[[Stored], None],
        progress: Progress,
    ) -> None:
        """Items whose image the store held: reused by every stage, reported as the decode stage's."""
        if not done:
            return
        if self.on_listed is not None:
            self.on_listed([item for item, _ in done], keys)
        for stage in STAGES:
            self.stages.setdefault(stage, StageRecord()).reused += len(done)
        progress.reused(len(done))
        items = [item for item, _ in done]
        refs = {item.index: ref for item, ref in done}
        on_stored(
            Stored(
                "decode",
                items,
                {i.index: keys[i.index] for i in items},
                refs,
                dict.fromkeys(refs, "reused"),
                whole=True,
            )
        )

    def run_chunk(
        self,
        chunk: list[Item],
        keys: dict[int, dict[str, str]],
        label: str,
        on_stored: Callable[[Stored], None],
        progress: Progress,
    ) -> list[StageResult]:
        """encode -> denoise -> decode for one chunk; the results of the stage processes that loaded a model."""
        store = self.ctx.open_store()
        refs: dict[int, ItemRef] = {}
        measured = []
        progress.new_chunk()
        if self.on_listed is not None:
            self.on_listed(chunk, keys)
        for stage in STAGES:
            kind = KIND_OF_STAGE[stage]
            todo, found, damaged = self.missing(store, stage, chunk, keys)
            record = self.stages.setdefault(stage, StageRecord())
            record.reused += len(found)
            made = dict.fromkeys(found, "reused")
            if stage == "decode":
                progress.reused(len(found))
            if todo:
                progress.todo(stage, len(todo))
                self.logger.info("%s: %d of %d items to compute [%s, items %s]", stage, len(todo), len(chunk), label,
                                 item_span(todo))  # fmt: skip
                job = self.job(stage, todo, keys, refs)
                on_item = lambda index, stage=stage: progress.stored(stage, index)  # noqa: E731
                try:
                    if self.prefect_tasks:
                        from stagediff.tasks import run_stage_task  # the flows' Prefect task (imports Prefect)

                        result = run_stage_task(stage, job, on_item, f"{stage} [{label}]", self.retries, self.tags,
                                                self.logger)  # fmt: skip
                    else:
                        result = run_stage_process(stage, job, on_item, self.logger)
                except BaseException:  # what its process had stored is in the store: record it, a rerun reuses it
                    record.interrupted = True
                    try:
                        self.record_partial(store, stage, chunk, keys, progress, found, made, on_stored)
                    except Exception as exc:  # the stop (or failure) is what the run reports, not this
                        self.logger.warning("what the stopped %s stage stored is not recorded (%s: %s); a rerun "
                                            "finds it in the store", stage, type(exc).__name__, exc)  # fmt: skip
                    raise
                found |= self.collect(store, kind, todo, keys, result)
                # what this process wrote (an item sharing its key with one it wrote included); the rest another
                # process (a concurrent run) wrote while this one waited for its claim: reused
                wrote = {ref.key for ref in result.items}
                ours = [item for item in todo if keys[item.index][kind] in wrote]
                record.computed += len(ours)
                record.reused += len(todo) - len(ours)
                made |= {item.index: "reused" for item in todo}
                made |= {item.index: "recomputed" if item.index in damaged else "computed" for item in ours}
                entry = {**result.process, "items": item_span(result.items), "loads": result.loads,
                         "load_seconds": result.load_seconds, "compute_seconds": result.compute_seconds,
                         **({"pipeline": result.pipeline} if result.pipeline else {}),
                         **({"compiled": result.compiled} if result.compiled else {})}  # fmt: skip
                record.add_process(entry)
                if self.on_process is not None:
                    self.on_process(stage, entry)
                record.device_map = record.device_map or result.device_map
                record.environment = record.environment or result.environment
                record.warnings += [w for w in result.warnings if w not in record.warnings][:20]
                if result.loads:
                    measured.append(result)
            refs = found
            on_stored(Stored(stage, chunk, keys, refs, made))
        return measured

    def record_partial(
        self, store: Store, stage: str, chunk: list[Item], keys: dict[int, dict[str, str]], progress: Progress,
        found: dict[int, ItemRef], made: dict[int, str], on_stored: Callable[[Stored], None],
    ) -> None:  # fmt: skip
        """After a stage process failed or was stopped: report what it had stored (its items are in the store)."""
        kind = KIND_OF_STAGE[stage]
        stored = {index for s, index in progress.seen if s == stage} - set(found)
        refs = dict(found)
        for item in chunk:
            if item.index in stored:
                try:
                    record = store.check(kind, keys[item.index][kind])
                except ArtifactError:
                    record = None
                if record is not None:
                    refs[item.index] = ItemRef(item.index, kind, record.key, record.sha256)
                    made[item.index] = "computed"
        self.stages[stage].computed += len(refs) - len(found)
        if refs:
            on_stored(Stored(stage, chunk, keys, refs, made))

    def verify(self, items: Iterable[Item]) -> None:
        """For a strict run, before anything is written: ArtifactError at the first damaged artifact the store
        holds for these items (a refusal changes nothing, not even the run's record)."""
        store = self.ctx.open_store()
        for item in items:
            keys = self.keys(item)
            for stage in STAGES:
                store.check(KIND_OF_STAGE[stage], keys[KIND_OF_STAGE[stage]])

    def missing(
        self, store: Store, stage: str, chunk: list[Item], keys: dict[int, dict[str, str]]
    ) -> tuple[list[Item], dict[int, ItemRef], set[int]]:
        """The chunk's items whose artifact of `stage` the store lacks, the refs of those it has, and the items
        whose artifact was damaged (computed again, logged as a warning; with `strict`: ArtifactError)."""
        kind = KIND_OF_STAGE[stage]
        todo, found, damaged = [], {}, set()
        for item in chunk:
            key = keys[item.index][kind]
            try:
                record = store.check(kind, key)
            except ArtifactError as exc:
                if self.strict:
                    raise
                self.logger.warning("%s; computing it again", exc)
                self.stages.setdefault(stage, StageRecord()).damaged += 1
                damaged.add(item.index)
                record = None
            if record is None:
                todo.append(item)
            else:
                found[item.index] = ItemRef(item.index, kind, key, record.sha256)
        return todo, found, damaged

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
        command += ["--compile"] * self.ctx.compile + (["--cache", self.ctx.cache] if self.ctx.cache else [])
        if self.ctx.quantize:
            command += ["--quantize", self.ctx.quantize, "--quantize-components", ",".join(self.ctx.quantized)]
        levers = ",".join(filter(None, (self.ctx.encode_levers, self.ctx.levers)))
        levers = {"levers": levers} if levers else {}  # exact runs' PNGs unchanged
        return {
            **levers,
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


def request_items(
    request: GenerateRequest, source: Source, store: Store, start: int = 0, stop: int | None = None
) -> Iterator[Item]:
    """A `generate` request's items `start`..`stop` (default: all), read one at a time from its stored prompts:
    prompt i with its negative prompt, seed + i and the resolved settings."""
    from stagediff.sources import open_source, prompt_lines, skip_items

    settings = resolve_settings(request.settings, request.model)
    negatives = request.negative_prompts
    with open_source(store, source) as stream:
        lines = skip_items(stream, source.format, start)
        for i, (_, prompt) in enumerate(prompt_lines(stream, source.format, source.name, lines + 1), start):
            if stop is not None and i >= stop:
                return
            negative = None if negatives is None else negatives[i] if len(negatives) > 1 else negatives[0]
            yield Item(i, prompt, negative, request.seed + i, settings)


def item_span(items: list) -> str:
    """ "3-9" (or "3", "3-9 (5 items)" when not contiguous): the indexes of a chunk's items, for logs."""
    indexes = sorted(getattr(i, "index", i) for i in items)
    if not indexes:
        return "none"
    span = f"{indexes[0]}-{indexes[-1]}" if len(indexes) > 1 else str(indexes[0])
    return span if indexes[-1] - indexes[0] + 1 == len(indexes) else f"{span} ({len(indexes)} items)"


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
        compile=placement.compile,
        cache=placement.cache,
        quantize=placement.quantize,
        quantized=quantized_components(model, family_for(model), placement),
        denoiser=family_for(model).denoiser,
        group_offload=placement.group_offload,
        offload_stream=placement.offload_stream,
    )
    identity = model_identity(model, placement.variant)
    check_model_weights(model, placement.variant, digest(asdict(identity)))  # once per model version
    return Engine(
        ctx=ctx,
        identity=identity,
        tiled_decode=placement.tiled_decode,
        sliced_decode=placement.sliced_decode,
        strict=options.strict,
        retries=options.retries,
        chunk_size=options.chunk_size,
        metadata=options.metadata,
        **kwargs,
    )


def check_model_weights(model: str, variant: str | None, fingerprint: str) -> None:
    """RequestError naming the first component whose class is missing or whose weights do not fit its config
    (`stagediff.stages.model_check`, in a stage process); a model that passed is remembered by `fingerprint`, the
    hash of its configs and weights, so each version of a model is checked once on a machine."""
    passed = cache_dir() / "checked-models" / fingerprint
    if passed.exists():
        return
    if "stagediff.preload" in sys.modules:  # a process forked from the stage server: torch is here already
        from stagediff.stages.model_check import check_components

        problem = check_components(model, variant)
    else:
        problem = run_isolated("stagediff.stages.model_check:check_components", model, variant, name="check")[0]
    if problem:
        raise RequestError("model", model, problem)
    atomic_write_bytes(passed, b"")


def order_by_group(items: list[Item]) -> list[Item]:
    """Items of one group together (groups in order of first appearance), so that chunks and batches fill."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    return [item for group in groups.values() for item in group]


def next_chunk_size(measured: list[StageResult]) -> int:
    """Items per chunk such that a chunk's model loads (and process start-ups) cost at most MAX_RELOAD_SHARE
    of its work, from what the stage processes of the last chunk measured; never fewer than FIRST_CHUNK.

    A process's start-up is counted as the quickest one measured: the run's first stage process also waits for
    the stage server's one-time imports (seconds), which no later chunk pays; counted in full, it made chunks
    of thousands of items, and the run's images came minutes apart."""
    startup = min(((r.process or {}).get("startup_seconds", 0.0) for r in measured), default=0.0)
    load = sum(r.load_seconds + startup for r in measured)
    per_item = sum(r.compute_seconds / max(1, len(r.items)) for r in measured)
    if per_item <= 0:
        return FIRST_CHUNK
    return max(FIRST_CHUNK, math.ceil(load * (1 - MAX_RELOAD_SHARE) / MAX_RELOAD_SHARE / per_item))
