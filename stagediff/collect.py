"""Garbage collection of a store: remove the artifacts that no kept run references.

A run is kept while it is registered in the store (every run, of every kind, registers itself before it
reads or writes any artifact, with what its items are made from) and its folder still exists; deleting a
run folder releases its artifacts. gc forgets a run only on the machine that registered it: a folder it cannot
see may be on another machine that shares the store. gc reads each kept run's record once (and derives the keys
of a run that has not completed from its stored request), then walks the store's objects once. Only artifacts
older than `--older-than` go, so a run that is starting, or objects written a moment ago, are left alone.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stagediff.artifacts import Store
from stagediff.artifacts.store import KINDS
from stagediff.request import RequestError

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$", re.ASCII)
HOST = socket.gethostname()
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """ "7d" -> seconds; units s, m, h, d, w."""
    match = _AGE.match(text.strip())
    if not match:
        raise RequestError("older_than", text, "must be a duration such as 7d, 12h, 30m or 0s (units s, m, h, d, w)")
    return float(match.group(1)) * _UNIT[match.group(2)]


@dataclass
class GcReport:
    runs: int = 0  # kept runs (registered, manifest present)
    forgotten_runs: int = 0  # registrations whose manifest is gone
    elsewhere: int = 0  # registrations from another machine whose folder is not visible here (kept)
    referenced: int = 0  # objects kept because a kept run references them
    recent: int = 0  # unreferenced objects kept because they are younger than the limit
    removed: list[str] = field(default_factory=list)  # store-relative names of removed files
    freed_bytes: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"gc: {verb} {len(self.removed)} files ({self.freed_bytes / 2**20:.2f} MiB); kept {self.referenced} "
            f"artifacts referenced by {self.runs} runs and {self.recent} newer ones; "
            f"forgot {self.forgotten_runs} runs whose manifest is gone"
            + (
                f"; kept {self.elsewhere} runs of other machines (run gc there to forget a deleted one)"
                if self.elsewhere
                else ""
            )
        )


def referenced_keys(store: Store, report: GcReport) -> set[str]:
    """Keys referenced by kept runs; registrations of deleted runs are dropped (unless dry run).

    A run's record lists every item it has worked on; a run that has not completed (running, interrupted,
    failed: it may be resumed) also keeps every key its request will use, derived from its root (the stored
    prompts and what its keys depend on). A run from before run records lists its keys in its manifest."""
    keys: set[str] = set()
    for name, entry in store.runs().items():
        summary_path, root = Path(entry["manifest"]), entry.get("root")
        record_path = Path(root["record"]) if root else None
        gone = not summary_path.exists() and not (record_path and record_path.exists())
        if gone and entry.get("host", HOST) != HOST:
            report.elsewhere += 1  # its folder is on another machine: kept, as a run that has not completed
        elif gone:
            report.forgotten_runs += 1
            if not report.dry_run:
                store.remove(name)
            continue
        report.runs += 1
        try:
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        except (OSError, ValueError):
            summary = {}  # unreadable now: keep it registered, keep what its root says
        for item in summary.get("items", []) if isinstance(summary.get("items"), list) else []:
            keys.update(item.get("keys", {}).values())  # a run from before run records
        if record_path is not None and record_path.exists():
            from stagediff.record import Record

            record = Record(record_path, "run")
            try:
                keys.update(record.keys())
                completed = (record.runs(last=1) or [{}])[0].get("status") == "completed"
            finally:
                record.close()
        else:
            completed = False
        if root is not None and not completed:
            keys.update(root_keys(store, root))
    return keys


def root_keys(store: Store, root: dict) -> Iterator[str]:
    """Every content key of a registered run's request, derived as its engine derives them; nothing when its
    model or its stored prompts are gone (then only its record protects its artifacts)."""
    from stagediff.engine import request_items
    from stagediff.keys import item_keys, model_identity
    from stagediff.request import GenerateRequest, ImageSettings
    from stagediff.sources import Source, has_source

    source = Source.model_validate(root["source"])
    try:
        identity = model_identity(root["model"], root.get("variant"))
    except (OSError, ValueError, KeyError):
        return
    if not has_source(store, source):
        return
    if root["kind"] == "batch":
        from stagediff.batch import run_items
        from stagediff.sources import open_source

        settings = ImageSettings.model_validate(root["batch"]["settings"])

        def made() -> Iterator:
            with open_source(store, source) as stream:
                for _, item in run_items(stream, source.format, root["batch"]["seed"], settings, root["model"]):
                    yield item

        items = made()
    else:
        fields = root["request"]
        request = GenerateRequest.model_construct(
            model=root["model"], seed=fields["seed"], negative_prompts=fields.get("negative_prompts"),
            settings=ImageSettings.model_validate(fields["settings"]),
        )  # fmt: skip
        items = request_items(request, source, store)
    for item in items:
        found = item_keys(identity, item.prompt, item.negative_prompt, item.seed, item.settings, root["dtype"],
                          root["tiled_decode"], root["sliced_decode"], root["metadata"], root["model"],
                          root.get("levers", ""), root.get("encode_levers", ""))  # fmt: skip
        yield from found.values()


def created(store: Store, kind: str, key: str) -> float | None:
    try:
        return float(json.loads(store.read(store.record_name(kind, key)) or b"")["created"])
    except (ValueError, KeyError, TypeError):
        return None


def collect_garbage(store: Store, older_than: float, dry_run: bool = False) -> GcReport:
    with store.gc_lock(exclusive=True):  # a run that registers meanwhile waits: gc sees every run it could harm
        return _collect(store, older_than, dry_run)


def _collect(store: Store, older_than: float, dry_run: bool) -> GcReport:
    report = GcReport(dry_run=dry_run)
    # 1. What the kept runs reference
    keep = referenced_keys(store, report)
    # 2. Every file under objects/, grouped by key: record, object, leftovers of interrupted writes
    now = time.time()
    by_key: dict[tuple[str, str], list[str]] = {}
    for name in store.list("objects"):
        parts = name.split("/")  # objects/<kind>/<key[:2]>/<file>
        if len(parts) != 4 or parts[1] not in KINDS:
            continue
        key = parts[3].lstrip(".").split(".")[0]  # <key>.json, <key>.png, .<key>.png.<random>.tmp
        by_key.setdefault((parts[1], key), []).append(name)
    # 3. Remove the unreferenced, old enough ones (claimed ones are being written: left alone)
    for (kind, key), names in sorted(by_key.items()):
        if key in keep:
            report.referenced += 1
            continue
        stats = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # a temporary file renamed meanwhile
                stats[name] = store.stat(name)
        newest = max((mtime for _, mtime in stats.values() if mtime is not None), default=None)
        if newest is None:  # a filesystem without modification times: the record says when it was made
            newest = created(store, kind, key)
        if newest is None or now - newest < older_than:
            report.recent += 1
            continue
        claim = None if dry_run else store.claim(kind, key, wait=False)
        if not dry_run and claim is None:
            report.recent += 1
            continue
        for name, (size, _) in stats.items():
            if not dry_run:
                store.remove(name)
            report.removed.append(name)
            report.freed_bytes += size
        if claim is not None:
            if store.local:
                store.remove(store.lock_name(kind, key))  # claimers check the lock file is still theirs
            claim.release()
    return report
