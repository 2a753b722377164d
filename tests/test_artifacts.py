"""Atomic, checksummed files: what every artifact write goes through; a damaged file is never used."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagediff.artifacts import ArtifactError, atomic_write_bytes, sha256_file, verify_file


def test_round_trip_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "e" / "00000.safetensors"
    sha = atomic_write_bytes(path, b"some bytes")
    assert sha == sha256_file(path)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert verify_file(path, sha) == b"some bytes"


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing"])
def test_damaged_files_are_detected(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.safetensors"
    sha = atomic_write_bytes(path, bytes(range(256)) * 4)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:])
    else:
        path.unlink()
    with pytest.raises(ArtifactError, match=str(path)):
        verify_file(path, sha)
