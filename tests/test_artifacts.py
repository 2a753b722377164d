"""Atomic, checksummed artifacts: a damaged or foreign file is never used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from artifacts import ArtifactError, load_tensors, save_tensors, sha256_file


def test_round_trip_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "e" / "00000.safetensors"
    tensors = {"prompt_embeds": torch.randn(4, 8), "pooled_prompt_embeds": torch.randn(8)}
    sha = save_tensors(path, tensors, {"model": "m", "index": "0"})
    assert sha == sha256_file(path)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    loaded, meta = load_tensors(path, sha, {"model": "m", "index": 0})
    assert meta["model"] == "m"
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing"])
def test_damaged_artifacts_are_detected(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.safetensors"
    sha = save_tensors(path, {"latents": torch.randn(16, 16)}, {"model": "m"})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:])
    else:
        path.unlink()
    with pytest.raises(ArtifactError, match=str(path)):
        load_tensors(path, sha)


def test_foreign_artifact_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    sha = save_tensors(path, {"latents": torch.zeros(2)}, {"model": "other-model", "index": "3"})
    with pytest.raises(ArtifactError, match="model='other-model'"):
        load_tensors(path, sha, {"model": "m", "index": 3})
