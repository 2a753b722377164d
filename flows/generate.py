"""The `generate` flow: encode -> denoise -> decode, each stage in its own OS process, handing
the next one checksummed safetensors files through a content-addressed store shared by runs.
A stage computes only what the store lacks, and starts no process when it lacks nothing; the run
is described by `OUT/RUN/manifest.json`, whose files are links to the store's objects."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger

from artifacts import Store, write_manifest
from flows.ui import model_tag, stage_tags, tag_flow_run
from stagediff.default_model import default_model_dir, ensure_default_model
from stagediff.isolation import warm_up
from stagediff.keys import item_keys, model_identity, resolve_dtype
from stagediff.request import Dtype, validate_request
from stagediff.runs import (
    check_store,
    denoise_settings,
    keys_of,
    missing,
    new_run_id,
    open_manifest,
    plan,
    record,
)
from stagediff.spec import StageContext
from tasks import decode_task, denoise_task, encode_task


def stage_todo(manifest: dict[str, Any], store: Store, stage: str, strict: bool) -> tuple[list[int], dict[int, str]]:
    """The items the stage has to compute; damaged artifacts are logged (or stop the run with `strict`)."""
    todo, damaged = missing(manifest, store, stage, strict)
    for problem in damaged.values():
        get_run_logger().warning("%s; computing it again", problem)
    if todo:
        get_run_logger().info("%s: %d of %d items to compute", stage, len(todo), len(manifest["items"]))
    else:
        get_run_logger().info("%s: all %d items in the store, no process started", stage, len(manifest["items"]))
    return todo, damaged


@flow(name="generate", log_prints=True)
def generate(
    prompts: list[str],
    model: str | None = None,
    negative_prompts: list[str] | None = None,
    steps: int = 28,
    guidance: float = 3.5,
    true_cfg_scale: float = 1.0,
    height: int = 1024,
    width: int = 1024,
    seed: int = 0,
    max_sequence_length: int = 512,
    batch_size: int = 1,
    dtype: Dtype = "auto",
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    tiled_decode: bool = False,
    sliced_decode: bool = False,
    max_memory: str | dict[str, str] | None = None,
    offload_dir: str | None = None,
    out: str = "outputs",
    run_id: str | None = None,
    retries: int = 0,
    store: str | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Generate one image per prompt through three process-isolated stages.

    Args:
        prompts: Prompts, one image each; prompt i is seeded with `seed + i`.
        model: Diffusers pipeline folder or Hub id (FLUX.1, SD3, SDXL or SD 1.5); empty means the embedded tiny
            random Flux model.
        negative_prompts: One negative prompt per prompt. Without them SD3 and SD 1.5 use "", SDXL zeros (when the
            model forces zeros for empty prompts); FLUX.1 needs them for true_cfg_scale > 1.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale (FLUX.1-dev: its distilled guidance).
        true_cfg_scale: FLUX.1 only: > 1 runs true classifier-free guidance with the negative prompts.
        height: Image height in pixels, a multiple of 16.
        width: Image width in pixels, a multiple of 16.
        seed: Base seed: prompt i uses torch.Generator("cpu").manual_seed(seed + i).
        max_sequence_length: T5 tokens per prompt, 1 to 512.
        batch_size: Prompts per forward pass in every stage.
        dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.
        original_size: SDXL micro-conditioning (height, width); empty: the image size.
        crops_coords_top_left: SDXL micro-conditioning (top, left).
        target_size: SDXL micro-conditioning (height, width); empty: the image size.
        tiled_decode: Decode in VAE tiles (bounded memory for large images).
        sliced_decode: Decode one image of a batch at a time.
        max_memory: Memory per device, e.g. "0=16GiB,1=16GiB,cpu=64GiB".
        offload_dir: Folder for weights accelerate offloads to disk.
        out: Output root; this run writes under OUT/RUN_ID/.
        run_id: Plain name of the run folder; a new one is made when empty.
        retries: Retries of a failed stage.
        store: Artifact store shared by runs, a folder or fsspec URL; empty means OUT/.store.
        strict: Stop at a damaged artifact in the store instead of recomputing it with a warning.
    """
    logger = get_run_logger()
    # 1. Check inputs (before any model is built or loaded, and before anything is written)
    fields = dict(
        prompts=prompts, negative_prompts=negative_prompts, steps=steps, guidance=guidance,
        true_cfg_scale=true_cfg_scale, height=height, width=width, seed=seed,
        max_sequence_length=max_sequence_length, batch_size=batch_size, dtype=dtype, original_size=original_size,
        crops_coords_top_left=crops_coords_top_left, target_size=target_size, tiled_decode=tiled_decode,
        sliced_decode=sliced_decode, placement={"max_memory": max_memory, "offload_dir": offload_dir}, out=out,
        run_id=run_id or new_run_id(),
    )  # fmt: skip
    validate_request(**fields, model=model or str(default_model_dir()), check_model=model is not None)
    store_location = check_store(store, out)
    warm_up(model or str(default_model_dir()))  # under a worker: the stages' imports start now
    request = validate_request(**fields, model=model or str(ensure_default_model()))
    run_dir = request.run_dir
    manifest = open_manifest(request)
    artifact_store = Store(store_location)
    # 2. While the stage forkserver is still importing torch: hash the model (cached), tag the run
    identity = model_identity(request.model)
    tag_flow_run(model_tag(model))
    options = {"retries": retries, "tags": stage_tags(model)}  # tags a concurrency limit exists for
    # 3. Name every artifact by its content key ("auto" dtype is asked of a stage process); the store may hold some
    settings = denoise_settings(request)
    dtype = resolve_dtype(request.dtype)
    plan(manifest, item_keys(request, settings, dtype, identity), artifact_store)
    manifest.update(status="running", flow_pid=os.getpid())
    write_manifest(run_dir, manifest)
    artifact_store.register_run(run_dir / "manifest.json")
    logger.info("run %s: %d prompts -> %s (store %s)", request.run_id, len(request.prompts), run_dir, store_location)

    ctx = StageContext(
        model=request.model,
        run_dir=str(request.run_dir),
        dtype=dtype,
        batch_size=request.batch_size,
        max_memory=request.placement.max_memory,
        offload_dir=request.placement.offload_dir,
        store=store_location,
        pause_after_batch=float(os.environ.get("STAGEDIFF_TEST_BATCH_DELAY", 0)),
    )
    try:
        # 4. Encode prompts (and negative prompts) -> embeddings
        todo, damaged = stage_todo(manifest, artifact_store, "encode", strict)
        result = None
        if todo:
            prompts_ = [(i, request.prompts[i]) for i in todo]
            negatives = [request.negative_prompts[i] for i in todo] if request.negative_prompts is not None else None
            result = encode_task.with_options(**options)(
                ctx, prompts_, request.max_sequence_length, keys_of(manifest, "encode", todo), negatives
            )
        embeddings = record(manifest, run_dir, artifact_store, "encode", damaged, result)
        # 5. Denoise embeddings + seeded noise -> latents
        todo, damaged = stage_todo(manifest, artifact_store, "denoise", strict)
        result = None
        if todo:
            items = [(embeddings[i], request.seed_of(i)) for i in todo]
            result = denoise_task.with_options(**options)(ctx, items, settings, keys_of(manifest, "denoise", todo))
        latents = record(manifest, run_dir, artifact_store, "denoise", damaged, result)
        # 6. Decode latents -> PNG images
        todo, damaged = stage_todo(manifest, artifact_store, "decode", strict)
        result = None
        if todo:
            items = [latents[i] for i in todo]
            result = decode_task.with_options(**options)(
                ctx, items, request.height, request.width, keys_of(manifest, "decode", todo),
                request.tiled_decode, request.sliced_decode,
            )  # fmt: skip
        record(manifest, run_dir, artifact_store, "decode", damaged, result)
    except BaseException as exc:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(exc).__name__}: {exc}"
        write_manifest(run_dir, manifest)
        raise
    manifest["status"] = "completed"
    manifest.pop("error", None)
    write_manifest(run_dir, manifest)
    logger.info("run %s completed: %d images in %s", request.run_id, len(request.prompts), run_dir / "images")
    return manifest
