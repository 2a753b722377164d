"""Batch generation over a prompts file, without Prefect or torch: check every line in one streaming pass,
then make the items chunk by chunk from the file's stored copy (`stagediff.sources`).

A prompts file is `.txt` (one prompt a line), `.jsonl` (one JSON object a line) or `.csv` (a header
row, then one item a row) with the columns in COLUMNS; only `prompt` is required. Blank lines are
skipped. An item without `seed` gets `seed + position` (its 0-based place among the file's items,
as prompt i of a `generate` run gets `seed + i`); one without `id` is named
`{position:05d}-{first 8 hex of the sha256 of its line's content}`, so appending lines never renames
or recomputes the items above them. The batch's record (which items are done) is `stagediff.record`'s.
"""

from __future__ import annotations

import csv
import fcntl
import functools
import hashlib
import io
import json
import logging
import re
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from stagediff.request import (
    ALLOWED,
    MAX_SEED,
    RUN_ID_PATTERN,
    ImageSettings,
    RequestError,
    one_line,
    validate_request,
)
from stagediff.sources import open_file, skip_items, text_lines

COLUMNS = ("id", "prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width")
SETTINGS = ("steps", "guidance", "height", "width")  # ImageSettings fields a row may set for itself
FORMATS = (".txt", ".jsonl", ".csv")
MAX_PROBLEMS = 100  # a file's first bad cells, listed; the rest are counted
_ID = re.compile(RUN_ID_PATTERN)
_AUTO_ID = re.compile(r"^(\d{5,})-[0-9a-f]{8}$")
_checked: dict[tuple, int] = {}  # check_batch: the file last checked in this process -> its item count


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
        return defaults.model_copy(update=own) if own else defaults

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
    """Bad lines in a prompts file: one line of the message per bad cell (the first MAX_PROBLEMS of them)."""

    def __init__(self, path: str | Path, problems: list[LineProblem], more: int = 0) -> None:
        lines = "\n".join(f"  {problem}" for problem in problems)
        rest = f"\n  ... and {more} more" if more else ""
        total = len(problems) + more
        super().__init__(f"{total} problem(s) in prompts file {path}; nothing was computed:\n{lines}{rest}")
        self.path, self.problems = str(path), problems


# 1. Reading: (line number, {column: raw value}) rows, or a LineProblem for a line that is not a row at all

Row = tuple[int, "dict[str, Any] | LineProblem"]


def file_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        allowed = f"must be an existing UTF-8 {', '.join(FORMATS)} file (the extension picks the format)"
        raise RequestError("prompts_file", str(path), allowed)
    return suffix[1:]


def iter_rows(stream: IO[bytes], fmt: str, path: str | Path, first: int = 1) -> Iterator[Row]:
    """The rows of a prompts file (a binary stream), in order, one at a time (`first`: the number of the stream's
    next line, for txt and jsonl)."""
    if fmt == "txt":
        for n, text in text_lines(stream, "prompts_file", path, first):
            if text.strip():
                yield n, {"prompt": text.strip()}
    elif fmt == "jsonl":
        for n, text in text_lines(stream, "prompts_file", path, first):
            if not text.strip():
                continue
            try:
                fields = json.loads(text)
            except json.JSONDecodeError:
                fields = None
            if isinstance(fields, dict):
                yield n, fields
            else:
                yield n, LineProblem(n, "(line)", text, 'must be one JSON object, e.g. {"prompt": "a red fox"}')
    else:
        yield from _csv_rows(stream, path)


def _csv_rows(stream: IO[bytes], path: str | Path) -> Iterator[Row]:
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # "\n", "\r\n" and quoted line breaks
    reader = csv.DictReader(text)
    try:
        header = reader.fieldnames or []
        problems = [LineProblem(1, "(header)", name, f"is not a column; columns: {', '.join(COLUMNS)}")
                    for name in header if name not in COLUMNS]  # fmt: skip
        if "prompt" not in header:
            problems.append(LineProblem(1, "(header)", ",".join(header), "must name a 'prompt' column (a header row)"))
        if problems:
            yield from ((1, problem) for problem in problems)
            return
        start = reader.line_num + 1  # a row may span several lines (quoted newlines): report its first
        for fields in reader:
            if None in fields:  # more cells than header columns
                yield start, LineProblem(start, "(row)", fields.pop(None), "has more cells than the header row")
            # An empty cell means "not given"; so does a cell missing at the end of a short row.
            yield start, {k: v for k, v in fields.items() if v not in ("", None)}
            start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        allowed = f"must be UTF-8 text; the row after line {reader.line_num} is not (byte {exc.start})"
        raise RequestError("prompts_file", str(path), allowed) from None
    finally:
        text.detach()  # the caller closes the stream


# 2. Checking: every cell by the rules of a `generate` request


def _check_text(column: str, value: Any, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or "\x00" in value or (required and not value.strip()):
        raise RequestError(column, value, "must be non-empty text" if required else "must be text")
    return value


@functools.lru_cache(maxsize=4096)
def _check_setting_cached(column: str, kind: type, value: Any) -> Any:
    return _check_setting_slow(column, value)


def _check_setting_slow(column: str, value: Any) -> Any:
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


def _check_setting(column: str, value: Any) -> Any:
    """One item setting, checked by the same rules (the same models) as a `generate` request; the parsed value.
    Ids and seeds (one per line) take a direct path with the same rules; settings repeat, so they are cached."""
    if column == "id" and isinstance(value, str):
        if not _ID.fullmatch(value) or value in {".", ".."}:
            raise RequestError("run_id", value, ALLOWED["run_id"])
        return value
    if column == "seed" and (type(value) is int or (isinstance(value, str) and value.isascii() and value.isdigit())):
        seed = int(value)
        if not 0 <= seed <= MAX_SEED - 1:
            raise RequestError("seed", value, f"must be an integer from 0 to {MAX_SEED - 1}")
        return seed
    try:
        hash(value)
    except TypeError:
        return _check_setting_slow(column, value)
    return _check_setting_cached(column, type(value), value)


def auto_id(position: int, given: dict[str, Any]) -> str:
    content = json.dumps(given, sort_keys=True, ensure_ascii=False)
    return f"{position:05d}-{hashlib.sha256(content.encode()).hexdigest()[:8]}"


def row_problems(line: int, fields: dict[str, Any]) -> list[LineProblem]:
    """What is wrong with a row (nothing for a good one); the check pass's fast path for prompt-only rows."""
    if len(fields) == 1 and isinstance(fields.get("prompt"), str):
        prompt = fields["prompt"]
        if prompt.strip() and "\x00" not in prompt:
            return []
    bad = [LineProblem(line, key, value, f"is not a column; columns: {', '.join(COLUMNS)}")
           for key, value in fields.items() if key not in COLUMNS]  # fmt: skip
    for column in COLUMNS:
        if column not in fields:
            continue
        try:
            if column in ("prompt", "negative_prompt"):
                _check_text(column, fields[column], required=column == "prompt")
            else:
                _check_setting(column, fields[column])
        except RequestError as exc:
            bad.append(LineProblem(line, column, fields[column], exc.allowed))
    if "prompt" not in fields:
        bad.append(LineProblem(line, "prompt", None, "is required: the text to generate an image for"))
    return bad


def check_row(position: int, line: int, fields: dict[str, Any], seed: int) -> BatchItem | list[LineProblem]:
    """An item from a row; its missing seed is `seed + position`, its missing settings are None (the run's)."""
    bad = row_problems(line, fields)
    if bad:
        return bad
    text = ("prompt", "negative_prompt")
    given = {column: fields[column] if column in text else _check_setting(column, fields[column])
             for column in COLUMNS if column in fields}  # fmt: skip
    settings = {name: given.get(name) for name in SETTINGS}
    return BatchItem(given.get("id") or auto_id(position, given), line, position, given["prompt"],
                     given.get("negative_prompt"), given.get("seed", seed + position), **settings)  # fmt: skip


def iter_items(
    stream: IO[bytes], fmt: str, seed: int, path: str | Path = "prompts", start: int = 0
) -> Iterator[BatchItem]:
    """The items of a checked file (a stored snapshot) from item `start` on, one at a time; ValueError at a bad
    row. The rows before `start` are read past unchecked where items are lines (txt, jsonl)."""
    lines = 0 if fmt == "csv" else skip_items(stream, fmt, start)  # type: ignore[arg-type]
    rows = enumerate(iter_rows(stream, fmt, path, lines + 1), 0 if fmt == "csv" else start)
    for position, (line, row) in rows:
        if position < start:  # csv: a row may span lines, each is read
            continue
        if isinstance(row, LineProblem):
            raise ValueError(f"prompts snapshot {path}: {row}")
        item = check_row(position, line, row, seed)
        if isinstance(item, list):
            raise ValueError(f"prompts snapshot {path}: {item[0]}")
        yield item


def _id_hash(item_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")


def check_batch_file(path: str | Path, seed: int, copy: IO[bytes] | None = None) -> tuple[int, str]:
    """One pass over a prompts file: (item count, sha256 of its bytes), copying the bytes to `copy`.

    BatchFileError lists the first MAX_PROBLEMS bad cells (and counts the rest), every line checked;
    RequestError if the file cannot be read. Memory: 8 bytes per explicit id (a hash, to find repeated
    ids), whatever the file's size."""
    from stagediff.sources import reader

    fmt = file_format(path)
    problems: list[LineProblem] = []
    more = 0
    hashes = array("Q")  # of the explicit ids, in order
    auto_like: dict[str, int] = {}  # explicit ids shaped like an automatic one: (rare) checked at the end
    count = 0

    def problem(p: LineProblem) -> None:
        nonlocal more
        if len(problems) < MAX_PROBLEMS:
            problems.append(p)
        else:
            more += 1

    with open_file("prompts_file", path, f"UTF-8 {', '.join(FORMATS)} file") as raw:
        stream, tee = reader(raw, copy)
        rows = iter_rows(stream, fmt, path) if fmt != "txt" else ()
        if fmt == "txt":  # a prompt a line: only a NUL character can be wrong
            for line, text in text_lines(stream, "prompts_file", path):
                prompt = text.strip()
                if prompt:
                    if "\x00" in prompt:
                        problem(LineProblem(line, "prompt", prompt, "must be non-empty text"))
                    count += 1
        for line, row in rows:
            if isinstance(row, LineProblem):  # a row with too many cells is reported, then counted as a row
                problem(row)
                continue
            bad = row_problems(line, row)
            for p in bad:
                problem(p)
            if not bad and "id" in row:
                hashes.append(_id_hash(row["id"]))
                if _AUTO_ID.match(row["id"]):
                    auto_like.setdefault(row["id"], line)
            count += 1
        sha256 = tee.digest.hexdigest()
    if not count and not problems:
        raise RequestError("prompts_file", str(path), "is empty: it must hold at least one prompt")
    if has_repeats(hashes) or auto_like:
        for p in repeated_ids(path, fmt, seed, auto_like):
            problem(p)
    if problems or more:
        raise BatchFileError(path, sorted(problems, key=lambda p: p.line), more)
    if seed + count - 1 > MAX_SEED:
        raise RequestError("seed", seed, f"must be at most {MAX_SEED - count + 1} for {count} items")
    return count, sha256


def has_repeats(hashes: array) -> bool:
    if len(hashes) < 2:
        return False
    import numpy as np

    values = np.sort(np.frombuffer(hashes, dtype=np.uint64))
    return bool((values[1:] == values[:-1]).any())


def repeated_ids(path: str | Path, fmt: str, seed: int, auto_like: dict[str, int]) -> list[LineProblem]:
    """The lines whose item id an earlier line has (a second pass, only when the first saw a repeat)."""
    first: dict[str, int] = {}
    found = []
    with open_file("prompts_file", path, "prompts file") as raw:
        position = 0
        for line, row in iter_rows(raw, fmt, path):
            if isinstance(row, LineProblem):
                continue
            item = check_row(position, line, row, seed)
            position += 1
            if isinstance(item, list):
                continue
            if "id" not in row and item.id not in auto_like:
                continue
            if item.id in first:
                allowed = f"must be unique; line {first[item.id]} has it"
                found.append(LineProblem(line, "id", item.id, allowed))
            first.setdefault(item.id, line)
    return found


def read_batch_file(path: str | Path, seed: int) -> list[BatchItem]:
    """Every item of a (small) prompts file, after the whole file is checked: for tests and tools."""
    check_batch_file(path, seed)
    with open_file("prompts_file", path, "prompts file") as raw:
        return list(iter_items(raw, file_format(path), seed, path))


def check_batch(prompts_file: str, store: str, seed: int) -> int:
    """The flow's and the CLI's check of what only `batch` takes, before anything loads or is written: the
    store folder, the seed, then every line of the file; the item count, or RequestError / BatchFileError.

    The file's lines are checked once per process while it is unchanged (same file, size and modification
    time): the CLI's check serves the flow it runs. The flow checks every line again as it copies the file."""
    validate_request(check_model=False, prompts=["-"], model="-", run_id="batch", seed=seed)
    if Path(store).exists() and not Path(store).is_dir():
        raise RequestError("store", store, "must be a folder (or not exist yet)")
    try:
        stat = Path(prompts_file).stat()
        seen = (str(Path(prompts_file).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, seed)
    except OSError:
        seen = None  # check_batch_file names the problem
    if seen in _checked:
        return _checked[seen]
    count = check_batch_file(prompts_file, seed)[0]
    if seen is not None:
        _checked.clear()
        _checked[seen] = count
    return count


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


def run_items(
    stream: IO[bytes],
    fmt: str,
    seed: int,
    settings: ImageSettings,
    model: str,
    path: str | Path = "prompts",
    start: int = 0,
) -> Iterator[tuple[BatchItem, Any]]:
    """(row, engine Item) for every item of a checked file from item `start` on, one at a time: the row's settings
    over the run's, resolved against the model's defaults (FLUX.1 uses a negative prompt only with true CFG)."""
    from stagediff.engine import Item
    from stagediff.family import family_for
    from stagediff.request import resolve_settings

    true_cfg = family_for(model).true_cfg
    resolved: dict[tuple, Any] = {}
    for row in iter_items(stream, fmt, seed, path, start):
        own = (row.steps, row.guidance, row.height, row.width)
        if own not in resolved:
            if len(resolved) > 1024:
                resolved.clear()
            resolved[own] = (row.settings(settings), resolve_settings(row.settings(settings), model))
        row_settings, item_settings = resolved[own]
        negative = row.negative_prompt if not true_cfg or row_settings.true_cfg_scale > 1 else None
        yield row, Item(row.position, row.prompt, negative, row.seed, item_settings)
