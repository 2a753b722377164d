"""Batch generation over a prompts file, without Prefect or torch: read and check every line, name
each item, and keep the batch manifest (`STORE/batch.json`) that says which items are done.

A prompts file is `.txt` (one prompt a line), `.jsonl` (one JSON object a line) or `.csv` (a header
row, then one item a row) with the columns in COLUMNS; only `prompt` is required. Blank lines are
skipped. An item without `seed` gets `seed + position` (its 0-based place among the file's items,
as prompt i of a `generate` run gets `seed + i`); one without `id` is named
`{position:05d}-{first 8 hex of the sha256 of its line's content}`, so appending lines never renames
or recomputes the items above them.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import stagediff
from stagediff.artifacts import ArtifactError, atomic_write_bytes, verify_file
from stagediff.request import MAX_SEED, ImageSettings, RequestError, one_line, read_text_file, validate_request

COLUMNS = ("id", "prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width")
SETTINGS = ("steps", "guidance", "height", "width")  # ImageSettings fields a row may set for itself
FORMATS = (".txt", ".jsonl", ".csv")
MANIFEST_NAME = "batch.json"


@dataclass(frozen=True)
class BatchItem:
    """One checked line of a prompts file."""

    id: str  # file stem of the item's artifacts: images/{id}.png
    line: int  # 1-based line number in the file
    position: int  # 0-based place among the file's items; also the item's index in the stages
    prompt: str
    negative_prompt: str | None  # used by the CFG families (SD3, SDXL, SD 1.5); FLUX.1 needs true CFG, not here
    seed: int
    steps: int | None  # None: the run's setting, else the model's default (resolved by the flow)
    guidance: float | None
    height: int | None
    width: int | None

    def settings(self, defaults: ImageSettings) -> ImageSettings:
        """The run's settings with this row's own on top."""
        own = {name: getattr(self, name) for name in SETTINGS if getattr(self, name) is not None}
        return defaults.model_copy(update=own)

    @property
    def image(self) -> str:
        return f"images/{self.id}.png"


@dataclass(frozen=True)
class LineProblem:
    """One bad cell of a prompts file: where it is, what it holds and what is allowed."""

    line: int
    column: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        shown = (
            repr(self.value)
            if not isinstance(self.value, str) or len(self.value) < 60
            else repr(self.value[:57] + "...")
        )
        return f"line {self.line}, column {self.column}: invalid value {shown}: {self.allowed}"


class BatchFileError(ValueError):
    """Bad lines in a prompts file: one line of the message per bad cell, every one of them at once."""

    def __init__(self, path: str | Path, problems: list[LineProblem]) -> None:
        lines = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(f"{len(problems)} problem(s) in prompts file {path}; nothing was computed:\n{lines}")
        self.path, self.problems = str(path), problems


# 1. Reading: (line number, {column: raw value}) rows, and the lines that cannot be read at all


def read_rows(path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], list[LineProblem]]:
    """The file's rows with their line numbers, and problems with lines that are not rows at all."""
    path = Path(path)
    allowed = f"must be an existing UTF-8 {', '.join(FORMATS)} file"
    if path.suffix.lower() not in FORMATS:
        raise RequestError("prompts_file", str(path), f"{allowed} (the extension picks the format)")
    text = read_text_file("prompts_file", path, f"UTF-8 {', '.join(FORMATS)} file")
    reader = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows}[path.suffix.lower()]
    rows, problems = reader(text)
    if not rows and not problems:
        raise RequestError("prompts_file", str(path), "is empty: it must hold at least one prompt")
    return rows, problems


def _txt_rows(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[LineProblem]]:
    rows = [(n, {"prompt": line.strip()}) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return rows, []


def _jsonl_rows(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[LineProblem]]:
    rows, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError:
            fields = None
        if isinstance(fields, dict):
            rows.append((n, fields))
        else:
            problems.append(LineProblem(n, "(line)", line, 'must be one JSON object, e.g. {"prompt": "a red fox"}'))
    return rows, problems


def _csv_rows(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[LineProblem]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    problems = [LineProblem(1, "(header)", name, f"is not a column; columns: {', '.join(COLUMNS)}")
                for name in header if name not in COLUMNS]  # fmt: skip
    if "prompt" not in header:
        problems.append(LineProblem(1, "(header)", ",".join(header), "must name a 'prompt' column (a header row)"))
    if problems:
        return [], problems
    rows = []
    start = reader.line_num + 1  # a row may span several lines (quoted newlines): report its first
    for fields in reader:
        if None in fields:  # more cells than header columns
            problems.append(LineProblem(start, "(row)", fields.pop(None), "has more cells than the header row"))
        # An empty cell means "not given"; so does a cell missing at the end of a short row.
        rows.append((start, {k: v for k, v in fields.items() if v not in ("", None)}))
        start = reader.line_num + 1
    return rows, problems


# 2. Checking: every cell by the rules of a `generate` request, every problem collected


def _check_text(column: str, value: Any, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or "\x00" in value or (required and not value.strip()):
        raise RequestError(column, value, "must be non-empty text" if required else "must be text")
    return value


def _check_setting(column: str, value: Any) -> Any:
    """One item setting, checked by the same rules (the same models) as a `generate` request; the parsed value."""
    if column == "id":  # an item id is a plain name, like a run id
        return validate_request(check_model=False, prompts=["-"], model="-", run_id=value).run_id
    if isinstance(value, bool):
        raise RequestError(column, value, "must be a number, not true/false")
    if column == "seed":
        return validate_request(check_model=False, prompts=["-"], model="-", run_id="item", seed=value).seed
    try:
        return getattr(ImageSettings.model_validate({column: value}), column)
    except ValidationError as exc:
        raise one_line(exc) from None


def auto_id(position: int, given: dict[str, Any]) -> str:
    content = json.dumps(given, sort_keys=True, ensure_ascii=False)
    return f"{position:05d}-{hashlib.sha256(content.encode()).hexdigest()[:8]}"


def check_rows(rows: list[tuple[int, dict[str, Any]]], seed: int) -> tuple[list[BatchItem], list[LineProblem]]:
    """Items from rows; an item's missing seed is `seed + position`, its missing settings are None (the run's)."""
    items, problems, first_line_of_id = [], [], {}
    for position, (line, fields) in enumerate(rows):
        given: dict[str, Any] = {}
        bad = [LineProblem(line, key, value, f"is not a column; columns: {', '.join(COLUMNS)}")
               for key, value in fields.items() if key not in COLUMNS]  # fmt: skip
        for column in COLUMNS:
            if column not in fields:
                continue
            try:
                if column in ("prompt", "negative_prompt"):
                    given[column] = _check_text(column, fields[column], required=column == "prompt")
                else:
                    given[column] = _check_setting(column, fields[column])
            except RequestError as exc:
                bad.append(LineProblem(line, column, fields[column], exc.allowed))
        if "prompt" not in fields:
            bad.append(LineProblem(line, "prompt", None, "is required: the text to generate an image for"))
        item_id = given.get("id") or auto_id(position, given)
        if item_id in first_line_of_id:
            bad.append(LineProblem(line, "id", item_id, f"must be unique; line {first_line_of_id[item_id]} has it"))
        first_line_of_id.setdefault(item_id, line)
        problems.extend(bad)
        if bad:
            continue
        settings = {name: given.get(name) for name in SETTINGS}
        item_seed = given.get("seed", seed + position)
        items.append(BatchItem(item_id, line, position, given["prompt"], given.get("negative_prompt"), item_seed,
                               **settings))  # fmt: skip
    return items, problems


def read_batch_file(path: str | Path, seed: int) -> list[BatchItem]:
    """Every item of a prompts file, or BatchFileError listing every bad cell (RequestError if unreadable)."""
    rows, problems = read_rows(path)
    items, more = check_rows(rows, seed)
    problems = sorted(problems + more, key=lambda p: p.line)
    if problems:
        raise BatchFileError(path, problems)
    if seed + len(rows) - 1 > MAX_SEED:
        raise RequestError("seed", seed, f"must be at most {MAX_SEED - len(rows) + 1} for {len(rows)} items")
    return items


def check_batch(prompts_file: str, store: str, seed: int) -> list[BatchItem]:
    """The flow's and the CLI's check of what only `batch` takes, before anything loads or is written: the
    store folder, the seed, then every line of the file; RequestError / BatchFileError naming what is wrong."""
    validate_request(check_model=False, prompts=["-"], model="-", run_id="batch", seed=seed)
    if Path(store).exists() and not Path(store).is_dir():
        raise RequestError("store", store, "must be a folder (or not exist yet)")
    return read_batch_file(prompts_file, seed)


# 3. The store: which items are done, what to compute in which chunk, and the manifest


def new_manifest() -> dict[str, Any]:
    return {"kind": "stagediff-batch", "stagediff_version": stagediff.__version__, "prompts_file": None,
            "status": "new", "runs": [], "items": []}  # fmt: skip


def read_batch_manifest(store: str | Path, logger: Any = None) -> dict[str, Any] | None:
    """The folder's batch.json (call it holding the folder's lock), or None when there is none yet.

    A damaged batch.json is kept aside (`batch.json.damaged-<time>`) and None returned: the run rebuilds the
    bookkeeping from the store, whose verified objects are the truth (nothing is computed again). Runs
    still marked "running" were interrupted (the lock says no run is active)."""
    path = Path(store) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("items"), list) or not isinstance(manifest.get("runs"), list):
            raise ValueError("not a batch manifest")
    except (ValueError, AttributeError, UnicodeDecodeError):
        kept = path.with_name(f"{MANIFEST_NAME}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, kept)
        (logger or logging.getLogger(__name__)).warning(
            "%s is damaged: kept as %s; its bookkeeping is rebuilt from the store", path, kept.name
        )
        return None
    for run in manifest["runs"]:
        if run.get("status") == "running":
            run.update(status="interrupted")
    return manifest


def write_batch_manifest(store: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(store) / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


@contextmanager
def store_lock(store: Path, logger: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
    """Hold `STORE/.lock` for a run: two runs writing one store would compute items twice and lose updates."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another run is writing %s: waiting for it to finish", store)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # the lock goes with the file when it is closed


def item_entry(item: BatchItem, resolved: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """An item as the manifest lists it: the row, the settings it was made with, its store keys;
    `status` is pending until its image is recorded."""
    return {**asdict(item), **resolved, "keys": keys, "image": item.image, "sha256": None, "status": "pending",
            "run": None}  # fmt: skip


def is_done(entry: dict[str, Any] | None, keys: dict[str, str], store: Path) -> bool:
    """Whether an item's image is in the batch folder, made under the same image key, with its recorded sha256."""
    if (
        entry is None
        or entry.get("status") not in ("done", "removed")
        or (entry.get("keys") or {}).get("images") != keys["images"]
    ):
        return False
    try:
        verify_file(store / entry["image"], entry["sha256"])
    except ArtifactError:
        return False
    return True


def plan(manifest: dict[str, Any], entries: list[dict[str, Any]], store: Path) -> list[str]:
    """Rewrite the manifest's items for this file (`entries` from `item_entry`); return the ids to compute.

    Items no longer in the file stay listed with status "removed" (their images are kept, and used
    again if the line comes back).
    """
    previous = {entry["id"]: entry for entry in manifest["items"]}
    listed, todo = [], []
    for wanted in entries:
        old = previous.pop(wanted["id"], None)
        if is_done(old, wanted["keys"], store):
            listed.append({**wanted, "sha256": old["sha256"], "status": "done", "run": old["run"]})
        else:
            listed.append(wanted)
            todo.append(wanted["id"])
    listed += [{**entry, "status": "removed"} for entry in previous.values()]
    manifest["items"] = listed
    return todo


def start_run(manifest: dict[str, Any], prompts_file: str, flow_run_id: str | None, todo: list[str]) -> dict:
    """Append this run to the manifest's `runs` and return it."""
    run = {
        "run": len(manifest["runs"]) + 1,
        "flow_run_id": flow_run_id,
        "prompts_file": prompts_file,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": "running",
        "computed": len(todo),
        "skipped": sum(entry["status"] == "done" for entry in manifest["items"]),
        "stages": {},
    }
    manifest["runs"].append(run)
    manifest.update(prompts_file=prompts_file, status="running")
    return run


def record_images(manifest: dict[str, Any], run: dict, images: dict[str, str]) -> None:
    """Mark items done: `images` maps item id -> the sha256 of its image in the batch folder."""
    for entry in manifest["items"]:
        if entry["id"] in images:
            entry.update(sha256=images[entry["id"]], status="done", run=run["run"])


def finish_run(manifest: dict[str, Any], run: dict, error: str | None = None) -> None:
    """Close the run; with `error`, its items not done are marked failed."""
    run.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), status="failed" if error else "completed")
    if error:
        run["error"] = error
        for entry in manifest["items"]:
            if entry["status"] == "pending":
                entry.update(status="failed", error=error)
    manifest["status"] = run["status"]
