"""Garbage collection of a store: remove the artifacts that no kept run references.

A run is kept while it is registered in the store (every run registers itself when it starts) and
its manifest still exists; deleting a run folder releases its artifacts. Only artifacts older than
`--older-than` go, so a run that is starting, or objects written a moment ago, are left alone.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from stagediff.artifacts import Store
from stagediff.artifacts.store import KINDS
from stagediff.request import RequestError

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
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
        )


def referenced_keys(store: Store, report: GcReport) -> set[str]:
    """Keys referenced by kept runs; registrations of deleted runs are dropped (unless dry run)."""
    keys: set[str] = set()
    for entry, manifest_path in store.runs().items():
        try:
            manifest = json.loads(Path(manifest_path).read_text())
        except FileNotFoundError:
            report.forgotten_runs += 1
            if not report.dry_run:
                store.remove(entry)
            continue
        except (OSError, ValueError):
            manifest = {}  # unreadable now: keep it registered, reference nothing
        report.runs += 1
        for item in manifest.get("items", []):
            keys.update(item.get("keys", {}).values())
    return keys


def created(store: Store, kind: str, key: str) -> float | None:
    try:
        return float(json.loads(store.read(store.record_name(kind, key)) or b"")["created"])
    except (ValueError, KeyError, TypeError):
        return None


def collect_garbage(store: Store, older_than: float, dry_run: bool = False) -> GcReport:
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
