"""Where a run's items come from, at any size: a prompts file read in one streaming pass, stored once.

A run's prompts (a `generate` prompts file, `batch`'s file, or the inline prompts) are checked line by
line in one pass that holds no more than a line, and copied as they are read into the artifact store as
`requests/<sha256>.<format>`: immutable, named by their content. Every later reader (the run's chunks, a
replica on another machine, `stagediff resume`, gc) streams its items from that copy, so an edit of the
original file after the check never changes a run, and no list of prompts ever travels in a flow-run
parameter or sits in memory whole.

Lines end with "\\n" (or "\\r\\n") and nothing else: a U+2028, U+0085, "\\v" or "\\f" inside a prompt stays
in it. A UTF-8 byte order mark at the start is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from stagediff.request import RequestError

if TYPE_CHECKING:
    from stagediff.artifacts import Store

Format = Literal["txt", "jsonl", "csv", "json"]  # json: one JSON string a line (inline prompts)
BOM = b"\xef\xbb\xbf"


class Source(BaseModel):
    """A run's items as stored once: the snapshot's store-relative name, its format, sha256 and item count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    format: Format
    sha256: str
    count: int


def snapshot_name(sha256: str, fmt: str) -> str:
    return f"requests/{sha256}.{fmt}"


class Tee(io.RawIOBase):
    """A binary stream that hashes what is read through it and copies it to `copy` (when given)."""

    def __init__(self, raw: IO[bytes], copy: IO[bytes] | None = None) -> None:
        self.raw, self.copy, self.digest, self.size = raw, copy, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.size += n
        if self.copy is not None:
            self.copy.write(data)
        return n


def reader(raw: IO[bytes], copy: IO[bytes] | None = None) -> tuple[io.BufferedReader, Tee]:
    tee = Tee(raw, copy)
    return io.BufferedReader(tee, buffer_size=1 << 20), tee


def text_lines(stream: IO[bytes], parameter: str, path: str | Path, first: int = 1) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line end) of a binary stream split on "\\n" alone; a line that is
    not UTF-8 is a RequestError naming it. `first`: the number of the stream's next line (see `skip_items`)."""
    for number, raw in enumerate(stream, first):
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            allowed = f"must be UTF-8 text; line {number} is not (byte {exc.start} of the line)"
            raise RequestError(parameter, str(path), allowed) from None
        yield number, text.removesuffix("\n").removesuffix("\r")


def skip_items(stream: IO[bytes], fmt: Format, n: int) -> int:
    """Read past the first `n` items of a checked snapshot whose items are lines (txt and jsonl: the lines that
    are not blank; json: every line), without parsing or checking them; returns the lines read. A replica
    starts at its share of a million-line file this way in a fraction of a second."""
    lines = items = 0
    while items < n:
        raw = stream.readline()
        if not raw:
            break
        lines += 1
        if lines == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if fmt == "json" or raw.decode("utf-8").strip():  # blank as the readers see it (str.strip: \x1c, U+3000)
            items += 1
    return lines


def open_file(parameter: str, path: str | Path, what: str) -> IO[bytes]:
    """A regular file opened for reading, or RequestError naming `parameter` (a FIFO would block, a folder
    fails late)."""
    path = Path(path)
    try:
        regular = path.is_file()
    except OSError:  # e.g. a path through a file ("a.txt/x")
        regular = False
    if not regular:
        raise RequestError(parameter, str(path), f"must be an existing {what} (a regular file)")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise RequestError(parameter, str(path), f"could not be read ({exc.strerror}); it must be a {what}") from None


# 1. `generate`'s prompts: a text file, one prompt a line (blank lines skipped), or the inline list


def prompt_lines(
    stream: IO[bytes], fmt: Format, path: str | Path = "prompts", first: int = 1
) -> Iterator[tuple[int, str]]:
    """(line number, prompt) of a prompts snapshot or file: txt lines stripped, blank ones skipped; json
    lines are JSON strings (prompts that may hold line breaks). `first`: as `text_lines`'."""
    for number, text in text_lines(stream, "prompts_file", path, first):
        if fmt == "json":
            yield number, json.loads(text)
        elif text.strip():
            yield number, text.strip()


def check_prompts_file(path: str | Path, copy: IO[bytes] | None = None) -> tuple[int, str]:
    """One pass over a prompts file: (prompt count, sha256 of its bytes), copying them to `copy`; a bad line
    is a RequestError naming its number, raised before anything else happens."""
    with open_file("prompts_file", path, "UTF-8 text file, one prompt a line") as raw:
        stream, tee = reader(raw, copy)
        count = 0
        for number, prompt in prompt_lines(stream, "txt", path):
            if "\x00" in prompt:
                raise RequestError("prompts_file", str(path), f"line {number} holds a NUL character")
            count += 1
    if not count:
        raise RequestError("prompts_file", str(path), "is empty: it must hold at least one prompt")
    return count, tee.digest.hexdigest()


def inline_bytes(prompts: list[str]) -> bytes:
    """Inline prompts as a json snapshot: one JSON string a line."""
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts).encode()


# 2. Snapshots in the store


@contextlib.contextmanager
def staging(store: Store) -> Iterator[IO[bytes]]:
    """A temporary file to copy a snapshot into: beside its final place on a local store (one rename)."""
    if store.local:
        folder = Path(store.path("requests"))
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".snapshot.", suffix=".tmp", dir=folder)
    else:
        fd, tmp = tempfile.mkstemp(prefix="stagediff-snapshot.", suffix=".tmp")
    os.close(fd)
    f = open(tmp, "w+b")  # noqa: SIM115 (closed below; `.name` is the path `commit` renames)
    try:
        yield f
    finally:
        f.close()
        Path(tmp).unlink(missing_ok=True)


def commit(store: Store, staged: IO[bytes], sha256: str, fmt: Format, count: int) -> Source:
    """Put a staged snapshot at its content name (kept as it is when it is there already)."""
    source = Source(name=snapshot_name(sha256, fmt), format=fmt, sha256=sha256, count=count)
    staged.flush()
    os.fsync(staged.fileno())
    if store.local:
        final = Path(store.path(source.name))
        if not final.exists():
            os.replace(staged.name, final)
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    elif not store.fs.exists(store.path(source.name)):
        folder = store.path("requests")
        with contextlib.suppress(OSError):
            store.fs.makedirs(folder, exist_ok=True)
        if store.object_store:  # one PUT of the final key (multipart uploads appear whole at the end)
            store.fs.put_file(staged.name, store.path(source.name))
        else:
            tmp = f"{folder}/.{sha256}.{secrets.token_hex(6)}.tmp"
            store.fs.put_file(staged.name, tmp)
            store.fs.mv(tmp, store.path(source.name))
    return source


def store_inline(store: Store, prompts: list[str]) -> Source:
    data = inline_bytes(prompts)
    sha256 = hashlib.sha256(data).hexdigest()
    with staging(store) as staged:
        staged.write(data)
        return commit(store, staged, sha256, "json", len(prompts))


def store_prompts_file(store: Store, path: str | Path) -> Source:
    """Check a prompts file and store it in the same pass."""
    with staging(store) as staged:
        count, sha256 = check_prompts_file(path, staged)
        return commit(store, staged, sha256, "txt", count)


@contextlib.contextmanager
def open_source(store: Store, source: Source) -> Iterator[IO[bytes]]:
    """The stored snapshot as a binary stream (ArtifactError-free: a missing one is a RequestError)."""
    path = store.path(source.name)
    try:
        f = open(path, "rb") if store.local else store.fs.open(path, "rb", block_size=1 << 20)  # noqa: SIM115
    except FileNotFoundError:
        allowed = f"its prompts snapshot {path} is gone from the store (removed by hand?); start the run again"
        raise RequestError("prompts", source.name, allowed) from None
    with f:
        yield f


def has_source(store: Store, source: Source) -> bool:
    if store.local:
        return Path(store.path(source.name)).is_file()
    return bool(store.fs.exists(store.path(source.name)))
