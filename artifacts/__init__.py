"""Persisted intermediates: atomic, checksummed safetensors, PNGs and run manifests."""

from artifacts.files import (
    ArtifactError,
    atomic_write_bytes,
    load_tensors,
    save_png,
    save_tensors,
    sha256_file,
    verify_file,
)
from artifacts.manifest import read_manifest, write_manifest

__all__ = [
    "ArtifactError",
    "atomic_write_bytes",
    "load_tensors",
    "read_manifest",
    "save_png",
    "save_tensors",
    "sha256_file",
    "verify_file",
    "write_manifest",
]
