"""A run's bookkeeping: its id, its manifest, and which stages' outputs are already on disk."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import stagediff
from artifacts import ArtifactError, read_manifest, verify_file, write_manifest
from stagediff.request import GenerateRequest, RequestError
from stagediff.spec import ItemRef

STAGES = ("encode", "denoise", "decode")
ARTIFACT_OF_STAGE = {"encode": "embeddings", "denoise": "latents", "decode": "image"}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def request_fields(request: GenerateRequest) -> dict[str, Any]:
    """What determines the run's outputs (the output location does not)."""
    return request.model_dump(mode="json", exclude={"out", "run_id"})


def new_manifest(request: GenerateRequest) -> dict[str, Any]:
    return {
        "run_id": request.run_id,
        "model": request.model,
        "stagediff_version": stagediff.__version__,
        "status": "running",
        "request": request_fields(request),
        "items": [
            {
                "index": i,
                "prompt": prompt,
                "negative_prompt": request.negative_prompts[i] if request.negative_prompts is not None else None,
                "seed": request.seed_of(i),
                "embeddings": f"embeddings/{i:05d}.safetensors",
                "latents": f"latents/{i:05d}.safetensors",
                "image": f"images/{i:05d}.png",
                "sha256": {"embeddings": None, "latents": None, "image": None},
            }
            for i, prompt in enumerate(request.prompts)
        ],
        "stages": {},
    }


def open_manifest(request: GenerateRequest) -> dict[str, Any]:
    """The run's manifest: a new one, or the existing one if it describes this very request (a rerun)."""
    run_dir = request.run_dir
    if not (run_dir / "manifest.json").exists():
        return new_manifest(request)
    manifest = read_manifest(run_dir)
    if manifest.get("request") != request_fields(request):
        raise RequestError("run_id", request.run_id, f"{run_dir} already holds a different run; choose another run id")
    return manifest


def finished_refs(manifest: dict[str, Any], run_dir: Path, stage: str) -> list[ItemRef] | None:
    """The stage's outputs if every item has one on disk with its recorded sha256, else None."""
    field = ARTIFACT_OF_STAGE[stage]
    refs = []
    for item in manifest["items"]:
        sha256 = item["sha256"][field]
        if sha256 is None:
            return None
        try:
            verify_file(run_dir / item[field], sha256)
        except ArtifactError:
            return None
        refs.append(ItemRef(item["index"], item[field], sha256))
    return refs


def record(manifest: dict[str, Any], run_dir: Path, stage: str, result: dict[str, Any]) -> list[ItemRef]:
    """Put a stage's outputs and process stats into the manifest and write it."""
    field = ARTIFACT_OF_STAGE[stage]
    by_index = {item["index"]: item for item in manifest["items"]}
    for ref in result["items"]:
        by_index[ref.index]["sha256"][field] = ref.sha256
    manifest["stages"][stage] = {
        **result["process"],
        "device_map": result["device_map"],
        "warnings": result.get("warnings", []),  # e.g. a text encoder that fell back to the CPU
        "skipped": False,
    }
    write_manifest(run_dir, manifest)
    return result["items"]


def reuse(manifest: dict[str, Any], run_dir: Path, stage: str, upstream_ran: bool) -> list[ItemRef] | None:
    """A finished stage's outputs, unless an earlier stage ran again in this run (then redo it)."""
    refs = None if upstream_ran else finished_refs(manifest, run_dir, stage)
    if refs is not None:
        manifest["stages"].setdefault(stage, {})["skipped"] = True
    return refs
