"""The artifact store (`stagediff.artifacts`): content-addressed, checksummed objects shared by runs, the
atomic file writes under it, and the run manifests. Everything a stage persists goes through `Store`."""

from stagediff.artifacts.files import ArtifactError, atomic_write_bytes, sha256_file, verify_file
from stagediff.artifacts.manifest import read_manifest, write_manifest
from stagediff.artifacts.store import Claim, Record, Store

__all__ = [
    "ArtifactError",
    "Claim",
    "Record",
    "Store",
    "atomic_write_bytes",
    "read_manifest",
    "sha256_file",
    "verify_file",
    "write_manifest",
]
