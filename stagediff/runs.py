"""A run's bookkeeping: its id, its manifest, which items each stage has to compute, and what it did."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import stagediff
from artifacts import ArtifactError, Store, read_manifest, write_manifest
from artifacts.store import is_url
from stagediff.request import GenerateRequest, RequestError
from stagediff.spec import DenoiseSettings, ItemRef

ARTIFACT_OF_STAGE = {"encode": "embeddings", "denoise": "latents", "decode": "image"}  # manifest item fields
KIND_OF_STAGE = {"encode": "embeddings", "denoise": "latents", "decode": "images"}  # store kinds
# A stage whose every item was in the store starts no process.
NO_PROCESS = {"pid": None, "seconds": 0.0, "startup_seconds": 0.0, "peak_rss_mb": 0.0}


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


def check_store(store: str | None, out: str) -> str:
    """The store a run uses, STORE or OUT/.store by default (absolute), checked without creating anything."""
    if store is None or store == "":
        return str((Path(out) / ".store").absolute())
    if not is_url(store):
        if Path(store).exists() and not Path(store).is_dir():
            raise RequestError("store", store, "must be a folder (it is created if missing) or an fsspec URL")
        return str(Path(store).absolute())
    import fsspec

    try:
        fsspec.core.url_to_fs(store)
    except (ValueError, ImportError) as exc:
        allowed = f"must be a folder or a URL of an installed fsspec filesystem ({type(exc).__name__}: {exc})"
        raise RequestError("store", store, allowed.splitlines()[0]) from None
    return store


def denoise_settings(request: GenerateRequest) -> DenoiseSettings:
    """What `denoise` passes to the pipeline besides embeddings and noise (and what the latents key covers)."""
    return DenoiseSettings(
        steps=request.steps,
        guidance=request.guidance,
        height=request.height,
        width=request.width,
        max_sequence_length=request.max_sequence_length,
        true_cfg_scale=request.true_cfg_scale,
        original_size=request.original_size,
        crops_coords_top_left=request.crops_coords_top_left,
        target_size=request.target_size,
    )


def plan(manifest: dict[str, Any], keys: list[dict[str, str]], store: Store) -> None:
    """Start this run's bookkeeping: every item's content keys, the store, and no stage done yet."""
    for item, item_keys in zip(manifest["items"], keys, strict=True):
        item["keys"] = item_keys
    manifest.update(store=store.location, stages={})


def keys_of(manifest: dict[str, Any], stage: str, indexes: list[int]) -> dict[int, str]:
    field = ARTIFACT_OF_STAGE[stage]
    return {i: manifest["items"][i]["keys"][field] for i in indexes}


def missing(manifest: dict[str, Any], store: Store, stage: str, strict: bool) -> tuple[list[int], dict[int, str]]:
    """Indexes whose artifact of `stage` the store lacks, and which of them are there but damaged.

    A damaged artifact is recomputed (the caller warns), or with `strict` this raises its ArtifactError.
    """
    kind, field = KIND_OF_STAGE[stage], ARTIFACT_OF_STAGE[stage]
    todo, damaged = [], {}
    for item in manifest["items"]:
        try:
            if store.check(kind, item["keys"][field]) is not None:
                continue
        except ArtifactError as exc:
            if strict:
                raise
            damaged[item["index"]] = str(exc)
        todo.append(item["index"])
    return todo, damaged


def record(
    manifest: dict[str, Any],
    run_dir: Path,
    store: Store,
    stage: str,
    damaged: dict[int, str],
    result: dict[str, Any] | None,
) -> list[ItemRef]:
    """Write down what the stage did, link every item's artifact into the run folder, return their refs."""
    kind, field = KIND_OF_STAGE[stage], ARTIFACT_OF_STAGE[stage]
    computed = sorted({ref.index for ref in result["items"]}) if result else []
    refs = []
    for item in manifest["items"]:
        key = item["keys"][field]
        found = store.check(kind, key)
        if found is None:
            raise ArtifactError(f"{stage} ended without writing {store.path(store.object_name(kind, key))}")
        store.materialize(kind, key, run_dir / item[field])
        item["sha256"][field] = found.sha256
        refs.append(ItemRef(item["index"], kind, key, found.sha256))
    process = result["process"] if result else NO_PROCESS
    manifest["stages"][stage] = {
        **process,
        "device_map": result["device_map"] if result else None,
        "warnings": result.get("warnings", []) if result else [],  # e.g. a text encoder that fell back to the CPU
        "skipped": result is None,
        "computed": computed,
        "reused": [item["index"] for item in manifest["items"] if item["index"] not in computed],
        "damaged": sorted(damaged),
    }
    write_manifest(run_dir, manifest)
    return refs
