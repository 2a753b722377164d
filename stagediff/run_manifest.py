"""A run folder's bookkeeping: its record (`stagediff.record`), the files it links from the store, and
its small summary (`manifest.json` of a `generate`, fan-out or launcher run, `batch.json` of a batch).

    OUT/RUN/manifest.json      the summary: request, settings, counts, stages, the first items
    OUT/RUN/record.db          every item, stage process and run (SQLite)
    OUT/RUN/items.jsonl        every item, one JSON object a line (written when a run ends)
    OUT/RUN/images/00042.png   links to the store's objects (embeddings/ and latents/ likewise)

Writing the record of a chunk costs the same whatever the run's size; the summary is rewritten after every
stage of every chunk and stays small.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import stagediff
from stagediff.artifacts import ArtifactError, Store, verify_file
from stagediff.engine import Engine, Item, Stored
from stagediff.jobs import KIND_OF_STAGE, STAGE_OF_KIND
from stagediff.record import (
    FIRST_ITEMS,
    FORMAT,
    SUFFIX,
    Record,
    is_old_format,
    item_row,
    read_summary,
    settings_json,
    write_summary,
)
from stagediff.request import GenerateRequest, RequestError, check_writable

READ_AHEAD = 1024  # rows of the record a rerun reads at once to find the items done before
SUMMARY_SECONDS = 2.0  # the summary is rewritten at most this often while a stage is under way (and at its end)
log = logging.getLogger(__name__)


def request_fields(request: GenerateRequest) -> dict[str, Any]:
    """What determines the run's outputs (the output location does not)."""
    fields = request.model_dump(mode="json", exclude={"out", "run_id"})
    fields.pop("prompts_file" if fields.get("prompts_file") is None else "prompts", None)
    return fields


def identity(fields: dict[str, Any]) -> dict[str, Any]:
    """A recorded request without where its prompts file was (its content counts)."""
    if isinstance(fields.get("prompts_file"), dict):
        fields = {**fields, "prompts_file": {k: v for k, v in fields["prompts_file"].items() if k != "path"}}
    return fields


class RunFolder:
    """One folder's record and summary, and the store's objects linked into it as stages store them."""

    def __init__(self, folder: Path, layout: str, summary_name: str, base: dict[str, Any]) -> None:
        """`layout`: "run" (images/00042.png, embeddings/, latents/) or "batch" (images/{id}.png);
        `base`: what the summary says besides what the record counts."""
        self.folder, self.layout, self.summary_path = folder, layout, folder / summary_name
        self.record = Record(folder / ("record.db" if layout == "run" else "batch.db"), layout)
        self.summary_base = dict(base)
        self.engine: Engine | None = None
        self.store: Store | None = None
        self.ids: dict[int, tuple[str, int | None]] = {}  # batch: index -> (item id, line) of items in flight
        self.checked: dict[str, str | None] = {}  # item id -> stat of its folder image, sha256 checked this run
        self.last_summary = 0.0
        self.extra: dict[str, Any] = {}
        self.total: int | None = None  # items the run's request holds
        # rows of the record read ahead for `known`: (first index, end index, id -> row)
        self.ahead: tuple[int, int, dict[str, tuple]] = (0, 0, {})
        self.same_keys: set[int] = set()  # runs whose key context is this run's: their rows' keys are this run's

    # 1. A run

    def start(self, engine: Engine | None, store: Store, total: int | None = None, **info: Any) -> int:
        self.engine, self.store, self.total = engine, store, total
        context = None if engine is None else engine.key_context()  # a fan-out's replicas may have many: none
        if context is not None:
            info["key_context"] = context
        run = self.record.start_run({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "status": "running", **info})  # fmt: skip
        if context is not None:
            self.same_keys = {r["run"] for r in self.record.runs() if r.get("key_context") == context}
        self.summary_base.update(status="running")
        self.summary_base.pop("error", None)
        self.save(force=True)
        return run

    def item_id(self, index: int) -> tuple[str, int | None]:
        """(file stem, line): 00042 for item 42 of a run, the item's id in a batch."""
        if self.layout == "run":
            return f"{index:05d}", None
        return self.ids[index]

    def on_listed(self, items: list[Item], keys: dict[int, dict[str, str]]) -> None:
        """Items about to be worked on: their rows, with their keys (before any artifact of theirs is read)."""
        self.listed_rows([item_row(item, keys[item.index], *self.item_id(item.index)) for item in items])

    def known(self, item: Item, keys_of: Callable[[], dict[str, str]]) -> bool:
        """Whether the record holds the item done under its keys and its image in the folder is that one (its
        sha256 checked): then it needs no store read at all. A row last listed by a run of this key context,
        with the item's prompt, negative prompt, seed and settings, holds the item's keys: they are not made
        again (at 100,000 items, that was most of a rerun's time)."""
        item_id = self.item_id(item.index)[0]
        if not self.ahead[0] <= item.index < self.ahead[1]:  # the record's next rows in request order, at once
            self.ahead = (item.index, item.index + READ_AHEAD, self.record.image_rows(item.index, READ_AHEAD))
        row = self.ahead[2].pop(item_id, None)
        if row is None:  # not at its place of last time (or new): looked up alone
            row = self.record.image_row(item_id)
        if row is None:
            return False
        image_key, sha, status, checked, seen, prompt, negative_prompt, seed, settings = row
        if not sha or status not in ("done", "removed"):
            return False
        same = (seen in self.same_keys and prompt == item.prompt and negative_prompt == item.negative_prompt
                and seed == item.seed and settings == settings_json(item.settings))  # fmt: skip
        if not same and image_key != keys_of()["images"]:
            return False
        path = self.folder / "images" / f"{item_id}.png"
        stat = file_stat(path)
        if stat is None or stat != checked:  # new, or changed since its sha256 was checked: check it again
            try:
                verify_file(path, sha)
            except ArtifactError:
                return False
            self.checked[item_id] = stat
        self.record.tally["done"] += 1
        return True

    def on_known(self, items: list[Item]) -> None:
        """Items `known` found done: this run saw them (a batch item it does not see is removed at its end)."""
        ids = [self.item_id(item.index)[0] for item in items]
        self.record.seen(ids)
        if self.checked:
            self.record.checked_images(self.checked)
            self.checked.clear()
        for item in items:
            self.ids.pop(item.index, None)

    def listed_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.ids[row["idx"]] = (row["id"], row["line"])
        self.record.listed(rows)

    def on_stored(self, stored: Stored) -> None:
        """Link what a stage stored into the folder and record its sha256 and how it was made."""
        refs = {i: (ref.key, ref.sha256, stored.made.get(i, "reused")) for i, ref in stored.refs.items()}
        self.stored_refs(KIND_OF_STAGE[stored.stage], refs, stored.whole)

    def stored_refs(self, kind: str, refs: dict[int, tuple[str, str, str]], whole: bool = False) -> None:
        """`refs`: item index -> (key, sha256, computed | reused | recomputed) of its `kind` artifact; `whole`:
        images the store held before any stage ran (this run made none of those items' parts)."""
        stats = {}
        if self.layout == "run" or kind == "images":
            for index, (key, _, _) in refs.items():
                name = self.item_id(index)[0]
                path = self.folder / kind / f"{name}.{SUFFIX[kind]}"
                self.store.materialize(kind, key, path)
                if kind == "images":
                    stats[name] = file_stat(path)
        made = {self.item_id(i)[0]: (sha, how) for i, (_, sha, how) in refs.items()}
        self.record.stored(kind, made, stats, whole)
        if kind == "images":
            for index in refs:
                self.ids.pop(index, None)
        self.save(force=kind == "images")

    def replay(self, segment: dict[str, Any]) -> tuple[str, int, int] | None:
        """Apply one segment of a replica's journal (`replica.Journal`); for what a stage stored, returns the
        stage, the items it computed (the rest it found stored) and the images it adds."""
        if "listed" in segment:
            self.listed_rows(segment["listed"])
            return None
        refs = {int(i): tuple(ref) for i, ref in segment["refs"].items()}
        self.stored_refs(segment["kind"], refs, segment.get("whole", False))
        computed = sum(made != "reused" for _, _, made in refs.values())
        return STAGE_OF_KIND[segment["kind"]], computed, len(refs) if segment["kind"] == "images" else 0

    def on_process(self, stage: str, entry: dict[str, Any]) -> None:
        self.record.process(stage, entry)

    def finish(self, status: str, error: str | None = None) -> dict[str, Any]:
        """Close the run: the record, the summary, and items.jsonl (every item) beside them."""
        self.record.finish(status, error)
        self.summary_base.update(status=status)
        if error is not None:
            self.summary_base["error"] = error
        else:
            self.summary_base.pop("error", None)
        summary = self.save(force=True, final=True)
        if status == "completed":
            self.record.export(self.folder / "items.jsonl")
        return summary

    def close(self) -> None:
        self.record.close()  # its WAL is checkpointed into record.db and removed

    # 2. The summary

    def summary(self, final: bool = False) -> dict[str, Any]:
        stages = {name: info.to_dict() for name, info in self.engine.stages.items()} if self.engine else {}
        return {
            "format": FORMAT,
            **self.summary_base,
            "stagediff_version": stagediff.__version__,
            "total": self.total,
            "counts": self.record.counts() if final else None,  # every item's status, when the run ends
            "progress": self.record.progress(),
            "stages": stages,
            **self.extra,
            "runs": self.record.runs(last=5),
            "record": self.record.path.name,
            "items_file": "items.jsonl",
            "first_items": self.record.first(FIRST_ITEMS),
        }

    def save(self, force: bool = False, final: bool = False) -> dict[str, Any] | None:
        """Rewrite the summary (at most every SUMMARY_SECONDS unless forced)."""
        now = time.monotonic()
        if not force and now - self.last_summary < SUMMARY_SECONDS:
            return None
        self.last_summary = now
        summary = self.summary(final)
        write_summary(self.summary_path, summary)
        return summary

    def hooks(self) -> dict[str, Callable]:
        """The engine's callbacks for this folder."""
        return {"on_stored": self.on_stored, "on_listed": self.on_listed, "on_process": self.on_process,
                "known": self.known, "on_known": self.on_known}  # fmt: skip


def open_run(request: GenerateRequest) -> dict[str, Any] | None:
    """Check that the run folder is free for this request: new, or holding this very request (a rerun). Returns
    its summary when there is one; RequestError for a folder that holds another run, before any work."""
    run_dir = request.run_dir
    check_writable("out", request.out)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        allowed = f"{run_dir} is a symbolic link or a file: a run writes only into a folder of its own"
        raise RequestError("run_id", request.run_id, allowed)
    path = run_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        summary = read_summary(path)
    except (OSError, ValueError):
        raise RequestError("run_id", request.run_id, f"{path} is unreadable: choose another run id") from None
    if identity(summary_request(summary)) != identity(request_fields(request)):
        raise RequestError("run_id", request.run_id, f"{run_dir} already holds a different run; choose another run id")
    return summary


def summary_request(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The request a summary records, in today's shape (a format-1 manifest listed its prompts inline)."""
    request = dict(summary.get("request") or {})
    if is_old_format(summary):
        request.pop("prompts_file", None)
    return request


def adopt_old_manifest(run_dir: Path, summary: dict[str, Any] | None) -> None:
    """A run folder written before run records: its manifest is kept aside (manifest.v1.json) and the run goes on
    with a new record; every artifact it had is in the store and is reused, nothing is computed again."""
    if summary is None or not is_old_format(summary):
        return
    kept = run_dir / "manifest.v1.json"
    if not kept.exists():
        os.replace(run_dir / "manifest.json", kept)
    log.warning("%s was written by an older stagediff: kept as %s; the run goes on with a new record (the "
                "store's artifacts are reused)", run_dir / "manifest.json", kept.name)  # fmt: skip


def run_summary_base(request: GenerateRequest, source: Any, store: str, engine: Engine | None = None,
                     **extra: Any) -> dict[str, Any]:  # fmt: skip
    """What a generate-style run's summary says besides its counts."""
    from dataclasses import asdict

    from stagediff.request import resolve_settings

    base = {"run_id": request.run_id, "model": request.model, "request": request_fields(request),
            "source": source.model_dump(), "store": store,
            "settings": asdict(resolve_settings(request.settings, request.model))}  # fmt: skip
    if engine is not None:
        base.update(dtype=engine.ctx.dtype, model_hash=engine.model_hash)
    return {**base, **extra}


def file_stat(path: Path) -> str | None:
    """What changes when a file is rewritten or replaced, even with its size and mtime restored (`touch -r`
    changes ctime): inode:size:mtime_ns:ctime_ns; None if it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
