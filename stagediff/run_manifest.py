"""A `generate` run's record, `OUT/RUN/manifest.json`: the request, every item with its keys, files and
sha256, and what each stage did (`Engine.stages`). Rewritten atomically after every stage of every chunk."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import stagediff
from stagediff.artifacts import Store, read_manifest, write_manifest
from stagediff.engine import Engine
from stagediff.jobs import KIND_OF_STAGE, DenoiseSettings, ItemRef
from stagediff.keys import model_hash
from stagediff.request import GenerateRequest, RequestError, check_writable

# Each item lists its files by these fields (`image`, as in batch.json); `keys` and `sha256` go by store kind.
FILE_FIELD = {"embeddings": "embeddings", "latents": "latents", "images": "image"}
SUFFIX = {"embeddings": "safetensors", "latents": "safetensors", "images": "png"}


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
                "seed": request.seed + i,
                **{FILE_FIELD[kind]: f"{kind}/{i:05d}.{suffix}" for kind, suffix in SUFFIX.items()},
                "sha256": dict.fromkeys(SUFFIX),
            }
            for i, prompt in enumerate(request.prompts)
        ],
        "stages": {},
    }


def open_manifest(request: GenerateRequest) -> dict[str, Any]:
    """The run's manifest: a new one, or the existing one if it describes this very request (a rerun)."""
    run_dir = request.run_dir
    check_writable("out", request.out)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        allowed = f"{run_dir} is a symbolic link or a file: a run writes only into a folder of its own"
        raise RequestError("run_id", request.run_id, allowed)
    if not (run_dir / "manifest.json").exists():
        return new_manifest(request)
    manifest = read_manifest(run_dir)
    if manifest.get("request") != request_fields(request):
        raise RequestError("run_id", request.run_id, f"{run_dir} already holds a different run; choose another run id")
    return manifest


def plan(
    manifest: dict[str, Any], keys: dict[int, dict[str, str]], store: Store, settings: DenoiseSettings, engine: Engine
) -> None:
    """Start this run's bookkeeping: the resolved settings, the model's fingerprint (`model_hash`, checked by
    `stagediff resume`), every item's content keys, the store, no stage yet."""
    for item in manifest["items"]:
        item["keys"] = keys[item["index"]]
    manifest.update(settings=asdict(settings), dtype=engine.ctx.dtype, model_hash=model_hash(engine.identity),
                    store=store.location, stages={})  # fmt: skip


def record(
    manifest: dict[str, Any], run_dir: Path, store: Store, engine: Engine, stage: str, refs: dict[int, ItemRef]
) -> None:
    """Link the stage's artifacts into the run folder, note their sha256 and what each stage did; save."""
    kind = KIND_OF_STAGE[stage]
    for index, ref in refs.items():
        item = manifest["items"][index]
        store.materialize(kind, ref.key, run_dir / item[FILE_FIELD[kind]])
        item["sha256"][kind] = ref.sha256
    manifest["stages"] = {name: info.to_dict() for name, info in engine.stages.items()}
    write_manifest(run_dir, manifest)


def gather(manifest: dict[str, Any], run_dir: Path, store: Store, results: list[dict[str, Any]]) -> None:
    """Link every item the replicas computed into the run folder (in request order, by item index) and note
    its keys and sha256; `results` are the replicas' (`replica.run_replica`)."""
    for result in results:
        for index, found in result["items"].items():
            item = manifest["items"][int(index)]
            item["keys"] = found["keys"]
            for kind, key in found["keys"].items():
                store.materialize(kind, key, run_dir / item[FILE_FIELD[kind]])
                item["sha256"][kind] = found["sha256"][kind]
