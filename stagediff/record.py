"""A run's record at any size: one SQLite database, written chunk by chunk, and a small summary beside it.

`OUT/RUN/record.db` (a `generate`, fan-out or launcher run) and `STORE/batch.db` (a batch folder) hold
one row per item (its prompt, seed, settings, content keys, sha256 of each artifact, status, and whether
each stage computed or reused it), one row per stage process and one per run (each command or flow run
over the folder). Writing a chunk's record is one transaction of that chunk's rows: it costs the same at
item 10 and at item 999,990. Nothing is held in memory but the counts.

The summary (`manifest.json`, `batch.json`) is derived from it after every stage of every chunk, bounded
whatever the run's size: settings, counts, what each stage did, the first FIRST_ITEMS items. The full
item list is `items.jsonl` beside it, one JSON object a line, written when a run ends (and at any time by
`stagediff items FOLDER`). The database is in WAL mode, so readers (gc, `stagediff items`, a UI) never
block the run; a crash loses at most the chunk in flight, whose artifacts are in the store anyway.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stagediff.artifacts import atomic_write_bytes

FORMAT = 2  # of manifest.json / batch.json: 1 listed every item inline (stagediff 0.1 before run records)
FIRST_ITEMS = 100  # items the summary lists; items.jsonl lists them all
KINDS = ("embeddings", "latents", "images")
# breaks of a line for str.splitlines that JSON leaves unescaped: escaped, so that every reader sees one item a line
LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
SUFFIX = {"embeddings": "safetensors", "latents": "safetensors", "images": "png"}
IMAGE_ROW = "key_images, sha_images, status, image_stat, seen, prompt, negative_prompt, seed, settings"

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,          -- file stem of its artifacts (generate: 00042; batch: the item id)
    idx INTEGER NOT NULL,         -- its place in the request (generate's prompt i, batch's position)
    line INTEGER,                 -- batch: its line in the prompts file
    prompt TEXT NOT NULL,
    negative_prompt TEXT,
    seed INTEGER NOT NULL,
    settings TEXT NOT NULL,       -- JSON: the resolved settings it is made with
    key_embeddings TEXT, key_latents TEXT, key_images TEXT,
    sha_embeddings TEXT, sha_latents TEXT, sha_images TEXT,
    made_embeddings TEXT, made_latents TEXT, made_images TEXT,  -- computed | reused | recomputed (damaged)
    status TEXT NOT NULL,         -- pending | done | failed | removed (batch: no longer in the file)
    run INTEGER,                  -- the run that recorded its image
    seen INTEGER,                 -- the last run that listed it
    updated REAL,
    image_stat TEXT               -- inode:size:mtime_ns:ctime_ns of its folder image when its sha256 was checked
);
CREATE INDEX IF NOT EXISTS items_idx ON items (idx);
CREATE INDEX IF NOT EXISTS items_updated ON items (updated);
CREATE TABLE IF NOT EXISTS runs (run INTEGER PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS processes (run INTEGER, stage TEXT, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Record:
    """A run folder's item record (see the module docstring); one writer at a time (the folder's run)."""

    def __init__(self, path: str | Path, layout: str) -> None:
        """`layout`: "run" (images/00042.png, embeddings/..., latents/...) or "batch" (images/{id}.png)."""
        self.path, self.layout = Path(path), layout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # commits survive a crash of the process, not of the OS
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(items)")}
        if "image_stat" not in columns:  # a record written before the column existed
            self.db.execute("ALTER TABLE items ADD COLUMN image_stat TEXT")
        self.run = 0
        self.tally = {"listed": 0, "done": 0, "computed": 0}  # this run's, kept as it goes (no scan per chunk)

    def close(self) -> None:
        self.db.close()

    # 1. Writing: a run, a chunk's rows, what each stage stored

    def start_run(self, info: dict[str, Any]) -> int:
        """A new run over this record; returns its number."""
        for run in self.runs():  # the caller holds the folder: a run still "running" was killed
            if run.get("status") == "running":
                self.db.execute("UPDATE runs SET info = ? WHERE run = ?",
                                (json.dumps({**run, "status": "interrupted"}), run["run"]))  # fmt: skip
        (last,) = self.db.execute("SELECT COALESCE(MAX(run), 0) FROM runs").fetchone()
        self.run = last + 1
        self.db.execute("INSERT INTO runs VALUES (?, ?)", (self.run, json.dumps({"run": self.run, **info})))
        return self.run

    def update_run(self, **fields: Any) -> dict[str, Any]:
        info = {**self.run_info(self.run), **fields}
        self.db.execute("UPDATE runs SET info = ? WHERE run = ?", (json.dumps(info), self.run))
        return info

    def run_info(self, run: int) -> dict[str, Any]:
        row = self.db.execute("SELECT info FROM runs WHERE run = ?", (run,)).fetchone()
        return json.loads(row[0]) if row else {}

    def runs(self, last: int | None = None) -> list[dict[str, Any]]:
        query = "SELECT info FROM runs ORDER BY run" + ("" if last is None else f" DESC LIMIT {int(last)}")
        found = [json.loads(info) for (info,) in self.db.execute(query)]
        return found if last is None else found[::-1]

    def set_meta(self, **values: Any) -> None:
        with self.db:
            self.db.executemany(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                [(name, json.dumps(value)) for name, value in values.items()],
            )

    def meta(self) -> dict[str, Any]:
        return {name: json.loads(value) for name, value in self.db.execute("SELECT name, value FROM meta")}

    def listed(self, rows: Iterable[dict[str, Any]]) -> None:
        """Items about to be worked on (their keys known): new ones pending, known ones kept as they are
        when their image key is unchanged, else pending again. One transaction."""
        t = time.time()
        rows = list(rows)
        self.tally["listed"] += len(rows)
        with self.db:
            self.db.executemany(
                """INSERT INTO items (id, idx, line, prompt, negative_prompt, seed, settings, key_embeddings,
                       key_latents, key_images, status, seen, updated)
                   VALUES (:id, :idx, :line, :prompt, :negative_prompt, :seed, :settings, :key_embeddings,
                       :key_latents, :key_images, 'pending', :seen, :updated)
                   ON CONFLICT(id) DO UPDATE SET idx = excluded.idx, line = excluded.line, seen = excluded.seen,
                       prompt = excluded.prompt, negative_prompt = excluded.negative_prompt, seed = excluded.seed,
                       settings = excluded.settings, updated = excluded.updated,
                       sha_embeddings = CASE WHEN items.key_embeddings IS excluded.key_embeddings
                           THEN items.sha_embeddings END,
                       sha_latents = CASE WHEN items.key_latents IS excluded.key_latents THEN items.sha_latents END,
                       key_embeddings = excluded.key_embeddings, key_latents = excluded.key_latents,
                       status = CASE WHEN items.key_images IS excluded.key_images AND items.status IN
                           ('done', 'removed') THEN 'done' ELSE 'pending' END,
                       sha_images = CASE WHEN items.key_images IS excluded.key_images THEN items.sha_images END,
                       key_images = excluded.key_images""",
                [{**row, "seen": self.run, "updated": t} for row in rows],
            )

    def seen(self, ids: list[str]) -> None:
        """Items this run listed without changing them (done before, under the same keys). One transaction."""
        with self.db:
            self.db.executemany("UPDATE items SET seen = ?, status = 'done' WHERE id = ?", [(self.run, i) for i in ids])

    def stored(
        self,
        kind: str,
        made: dict[str, tuple[str, str]],
        stats: dict[str, str | None] | None = None,
        whole: bool = False,
    ) -> None:
        """`made`: item id -> (sha256, computed | reused | recomputed) of its `kind` artifact; an image makes
        the item done (by this run). `whole`: images found in the store before any stage ran, so this run made
        none of those items' parts (an image another run stored while this one made its parts leaves what
        this run made as it is). One transaction."""
        t = time.time()
        if kind == "images":
            self.tally["done"] += len(made)
            self.tally["computed"] += sum(m != "reused" for _, m in made.values())
        sha, how = f"sha_{kind}", f"made_{kind}"
        done = ", status = 'done', run = :run" if kind == "images" else ""
        if kind == "images":  # the folder's image file as linked from the checked store object
            done += ", image_stat = :stat"
        if kind == "images" and whole:
            done += ", made_embeddings = 'reused', made_latents = 'reused'"
        with self.db:
            self.db.executemany(
                f"UPDATE items SET {sha} = :sha, {how} = :made, updated = :t{done} WHERE id = :id",
                [
                    {"id": i, "sha": s, "made": m, "t": t, "run": self.run, "stat": (stats or {}).get(i)}
                    for i, (s, m) in made.items()
                ],
            )

    def image_row(self, item_id: str) -> tuple | None:
        """(image key, image sha256, status, the folder image's stat when its sha256 was checked, the last run
        that listed it, prompt, negative prompt, seed, settings) of an item."""
        return self.db.execute(f"SELECT {IMAGE_ROW} FROM items WHERE id = ?", (item_id,)).fetchone()

    def image_rows(self, start: int, n: int) -> dict[str, tuple]:
        """Item id -> `image_row` of the items at indices start to start + n - 1 (one range of the index)."""
        rows = self.db.execute(f"SELECT id, {IMAGE_ROW} FROM items WHERE idx >= ? AND idx < ?", (start, start + n))
        return {row[0]: row[1:] for row in rows}

    def checked_images(self, stats: dict[str, str]) -> None:
        """`stats`: item id -> the stat of its folder image, whose sha256 was just checked. One transaction."""
        with self.db:
            self.db.executemany("UPDATE items SET image_stat = ? WHERE id = ?", [(v, k) for k, v in stats.items()])

    def process(self, stage: str, info: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO processes VALUES (?, ?, ?)", (self.run, stage, json.dumps(info)))

    def finish(self, status: str, error: str | None = None) -> None:
        """Close this run: its pending items failed (with `error`), its items listed by no run removed."""
        with self.db:
            if status == "failed":
                self.db.execute("UPDATE items SET status = 'failed' WHERE status = 'pending' AND seen = ?",
                                (self.run,))  # fmt: skip
            if status == "completed" and self.layout == "batch":
                self.db.execute("UPDATE items SET status = 'removed' WHERE seen < ? AND status != 'removed'",
                                (self.run,))  # fmt: skip
        counts = self.counts()
        self.update_run(status=status, finished=now(), computed=counts["computed_by_this_run"], done=counts["done"],
                        **({"error": error} if error else {}))  # fmt: skip

    # 2. Reading: counts, the first and latest items, every item as JSON, every key

    def progress(self) -> dict[str, int]:
        """This run's counts so far, without reading the table: items listed, images stored, computed."""
        return {"items_so_far": self.tally["listed"], "images_so_far": self.tally["done"],
                "computed_so_far": self.tally["computed"]}  # fmt: skip

    def counts(self) -> dict[str, int]:
        """Every item's status (one pass over the table: when a run ends)."""
        found = dict(self.db.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall())
        counts = {status: found.get(status, 0) for status in ("done", "pending", "failed", "removed")}
        (made,) = self.db.execute("SELECT COUNT(*) FROM items WHERE run = ? AND made_images != 'reused'",
                                  (self.run,)).fetchone()  # fmt: skip
        return {"items": sum(v for k, v in counts.items() if k != "removed"), **counts, "computed_by_this_run": made}

    def items(self, where: str = "", args: tuple = (), order: str = "idx", limit: int | None = None) -> Iterator[dict]:
        query = f"SELECT * FROM items {where} ORDER BY {order}" + ("" if limit is None else f" LIMIT {int(limit)}")
        cursor = self.db.execute(query, args)
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield self.entry(dict(zip(names, row, strict=True)))

    def first(self, n: int = FIRST_ITEMS) -> list[dict[str, Any]]:
        return list(self.items("WHERE status != 'removed'", limit=n))

    def latest(self, n: int) -> list[dict[str, Any]]:
        """The items most recently recorded done."""
        return list(self.items("WHERE status = 'done'", order="updated DESC, idx DESC", limit=n))

    def entry(self, row: dict[str, Any]) -> dict[str, Any]:
        """An item as the summary and items.jsonl show it."""
        files = {"image": f"images/{row['id']}.png"}
        if self.layout == "run":  # the intermediates this folder links (none for an item whose image was stored)
            for kind in ("embeddings", "latents"):
                if row[f"sha_{kind}"] is not None:
                    files[kind] = f"{kind}/{row['id']}.safetensors"
        entry = {"index": row["idx"], "id": row["id"]}
        if row["line"] is not None:
            entry["line"] = row["line"]
        return {
            **entry,
            "prompt": row["prompt"],
            "negative_prompt": row["negative_prompt"],
            "seed": row["seed"],
            "settings": json.loads(row["settings"]),
            **files,
            "keys": {kind: row[f"key_{kind}"] for kind in KINDS},
            "sha256": {kind: row[f"sha_{kind}"] for kind in KINDS},
            "made": {kind: row[f"made_{kind}"] for kind in KINDS},
            "status": row["status"],
            "run": row["run"],
        }

    def keys(self) -> Iterator[str]:
        """Every content key the record holds (gc keeps their artifacts)."""
        for row in self.db.execute("SELECT key_embeddings, key_latents, key_images FROM items"):
            yield from (key for key in row if key)

    def export(self, path: Path) -> Path:
        """items.jsonl: every item in request order (removed ones last), written atomically; each line `entry`'s
        object as SQLite builds it (no Python object per row: a million items in seconds)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for where in ("WHERE status != 'removed'", "WHERE status = 'removed'"):
                    for (line,) in self.db.execute(f"SELECT {entry_sql(self.layout)} FROM items {where} ORDER BY idx"):
                        f.write((line if line.isascii() else line.translate(LINE_BREAKS)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


@functools.cache
def entry_sql(layout: str) -> str:
    """`Record.entry` as an SQL expression over an items row: the same members in the same order (optional ones,
    the line and a run's intermediates, left out where null: `json_patch` removes a member patched with null)."""

    def per_kind(column: str) -> str:
        return "json_object(" + ", ".join(f"'{kind}', {column}_{kind}" for kind in KINDS) + ")"

    files, optional = "'image', 'images/' || id || '.png'", ["'line', line"]
    if layout == "run":
        for kind in ("embeddings", "latents"):
            path = f"CASE WHEN sha_{kind} IS NOT NULL THEN '{kind}/' || id || '.safetensors' END"
            files += f", '{kind}', {path}"
            optional.append(f"'{kind}', {path}")
    whole = (f"json_object('index', idx, 'id', id, 'line', line, 'prompt', prompt, 'negative_prompt', negative_prompt, "
             f"'seed', seed, 'settings', json(settings), {files}, 'keys', {per_kind('key')}, "
             f"'sha256', {per_kind('sha')}, 'made', {per_kind('made')}, 'status', status, 'run', run)")  # fmt: skip
    return f"json_patch({whole}, json_object({', '.join(optional)}))"


def item_row(item: Any, keys: dict[str, str], item_id: str, line: int | None = None) -> dict[str, Any]:
    """The row of an engine `Item` (before its stages)."""
    return {"id": item_id, "idx": item.index, "line": line, "prompt": item.prompt,
            "negative_prompt": item.negative_prompt, "seed": item.seed, "settings": settings_json(item.settings),
            **{f"key_{kind}": keys[kind] for kind in KINDS}}  # fmt: skip


@functools.lru_cache(maxsize=1024)
def settings_json(settings: Any) -> str:
    """Resolved settings as the record stores them (a run has few distinct ones: made once each)."""
    from dataclasses import asdict

    return json.dumps(asdict(settings), separators=(",", ":"))


def write_summary(path: Path, summary: dict[str, Any]) -> Path:
    atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
    return path


def read_summary(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def is_old_format(summary: dict[str, Any]) -> bool:
    """A summary written before run records (format 1): every item listed inline, no record beside it."""
    return summary.get("format") != FORMAT
