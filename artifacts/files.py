"""Atomic, checksummed files: every artifact is written to a temporary sibling, fsynced, renamed,
and verified against its sha256 before a later stage reads it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
from pathlib import Path


class ArtifactError(RuntimeError):
    """A persisted artifact is missing, truncated, corrupted or not what the caller expects."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> str:
    """Write `data` to `path` so that no reader ever sees a partial file; return its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:  # e.g. a full disk: say which file it was writing, leave no partial file
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return sha256_bytes(data)


def verify_file(path: str | Path, sha256: str) -> bytes:
    """Return the bytes of `path` if their sha256 is `sha256`, else raise ArtifactError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} is missing") from None
    actual = sha256_bytes(data)
    if actual != sha256:
        raise ArtifactError(f"artifact {path} is corrupted: sha256 {actual[:12]}… != recorded {sha256[:12]}…")
    return data


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata in a safetensors file's header, read without torch; ValueError if unreadable."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a safetensors file: {exc}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header in one fixed order (metadata keys sorted), so that identical
    tensors and metadata give identical bytes: safetensors writes its metadata in hash-map order."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | dict(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_metadata(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG; ValueError if it is not one. Plain tEXt chunks are read directly (a done-check
    of a million images must not decode each one); compressed or international ones through Pillow."""
    if data[:8] == PNG_SIGNATURE:
        text, at = {}, 8
        while at + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[at : at + 8])
            chunk = data[at + 8 : at + 8 + length]
            if len(chunk) != length:
                break  # truncated: Pillow says what is wrong
            if kind in (b"iTXt", b"zTXt"):
                return _png_metadata_pillow(data)
            if kind == b"tEXt":
                key, _, value = chunk.partition(b"\0")
                text[key.decode("latin-1")] = value.decode("latin-1")
            if kind == b"IEND":
                return text
            at += 12 + length
    return _png_metadata_pillow(data)


def _png_metadata_pillow(data: bytes) -> dict[str, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return dict(getattr(image, "text", {}))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a PNG file: {exc}") from None
