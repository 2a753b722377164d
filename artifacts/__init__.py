"""Persisted intermediates: atomic, checksummed safetensors, PNGs and run manifests."""

from artifacts.files import (
    ArtifactError,
    atomic_write_bytes,
    load_tensors,
    png_metadata,
    safetensors_metadata,
    save_png,
    save_tensors,
    sha256_file,
    verify_file,
)
from artifacts.manifest import read_manifest, write_manifest
from artifacts.store import Claim, Record, Store

__all__ = [
    "ArtifactError",
    "Claim",
    "Record",
    "Store",
    "atomic_write_bytes",
    "load_tensors",
    "png_metadata",
    "read_manifest",
    "safetensors_metadata",
    "save_png",
    "save_tensors",
    "sha256_file",
    "verify_file",
    "write_manifest",
]
