"""The weights' fingerprint cache cannot be fooled by `touch`: a same-size rewrite whose mtime is restored, or a
same-size file moved over the weights with the old mtime, is another model; an untouched file is not hashed again."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from stagediff import keys
from stagediff.artifacts import sha256_file


@pytest.fixture
def model(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny Flux model (built by stagediff.tiny_model) and a private fingerprint cache."""
    monkeypatch.setenv("STAGEDIFF_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_model, tmp_path / "tiny-flux"))


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files that are actually read and hashed (cache misses)."""
    calls: list[str] = []
    monkeypatch.setattr(keys, "sha256_file", lambda p: calls.append(os.path.basename(p)) or sha256_file(p))
    return calls


def fingerprint(model: Path) -> str:
    return keys.model_hash(keys.model_identity(model))


def weights(model: Path) -> Path:
    path = model / "transformer" / "diffusion_pytorch_model.safetensors"
    assert path.is_file()
    return path


def flipped(path: Path) -> bytes:
    """The file's bytes with its tensor data inverted: same size, same (valid) safetensors header."""
    data = path.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]  # u64 header length, the JSON header, then the tensors
    assert len(data) - start >= 64
    return data[:start] + bytes(b ^ 0xFF for b in data[start:])


def restore_times(path: Path, before: os.stat_result) -> None:
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # what `touch -r saved file` does
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def wait_for_a_new_ctime() -> None:
    """ctime comes from the kernel's coarse clock (a tick of a few ms): let it move past the hashing's stat."""
    time.sleep(0.05)


def test_unchanged_files_are_hashed_once(model: Path, hashed: list[str]) -> None:
    first = fingerprint(model)
    assert "diffusion_pytorch_model.safetensors" in hashed
    hashed.clear()
    assert fingerprint(model) == first  # a new FileHashes, read back from $STAGEDIFF_CACHE/fingerprints.json
    assert hashed == []


def test_same_size_rewrite_with_restored_mtime_is_another_model(model: Path, hashed: list[str]) -> None:
    first = fingerprint(model)
    path = weights(model)
    before = path.stat()
    new = flipped(path)
    wait_for_a_new_ctime()
    with open(path, "r+b") as f:  # in place, like `cat new > file`: the same inode
        f.write(new)
    restore_times(path, before)
    assert path.stat().st_ino == before.st_ino and path.stat().st_ctime_ns != before.st_ctime_ns
    hashed.clear()
    assert fingerprint(model) != first
    assert hashed == [path.name]  # only the rewritten file is read again


def test_same_size_replacement_with_restored_mtime_is_another_model(model: Path, hashed: list[str]) -> None:
    first = fingerprint(model)
    path = weights(model)
    before = path.stat()
    replacement = path.with_name(path.name + ".new")
    replacement.write_bytes(flipped(path))
    restore_times(replacement, before)
    os.replace(replacement, path)  # like `mv`: another inode, same size and mtime
    assert path.stat().st_ino != before.st_ino
    hashed.clear()
    assert fingerprint(model) != first
    assert hashed == [path.name]


def test_old_cache_entries_are_hashed_again(model: Path, hashed: list[str]) -> None:
    """An entry of the previous shape, [size, mtime_ns, sha256], is unknown: never read as a hash."""
    first = fingerprint(model)
    cache = Path(os.environ["STAGEDIFF_CACHE"]) / "fingerprints.json"
    known = json.loads(cache.read_text())
    assert known and all(len(entry) == 5 for entry in known.values())
    stale = "0" * 64  # a hash that must not be served
    cache.write_text(json.dumps({real: [os.stat(real).st_size, os.stat(real).st_mtime_ns, stale] for real in known}))
    hashed.clear()
    assert fingerprint(model) == first
    assert sorted(hashed) == sorted(os.path.basename(real) for real in known)
    assert all(len(entry) == 5 for entry in json.loads(cache.read_text()).values())  # rewritten in the new shape
