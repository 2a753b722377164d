"""The `batch` flow: images for every line of a prompts file that the store does not have yet.

Every line is checked before anything loads or is written. The items still to do are grouped by
their settings and cut into chunks; each chunk goes through encode -> denoise -> decode (each stage
in its own process, loading its model once for the chunk). `STORE/batch.json` lists every item and
its status, so a nightly run over a growing file only computes the new lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from flows.ui import gallery, items_table, model_tag, stage_tags, tag_flow_run
from stagediff.batch import (
    SETTINGS,
    fail_chunk,
    finish_run,
    intermediates,
    make_chunks,
    new_manifest,
    plan,
    read_batch_file,
    read_batch_manifest,
    record_chunk,
    start_run,
    store_lock,
    write_batch_manifest,
)
from stagediff.default_model import default_model_dir, ensure_default_model
from stagediff.request import Dtype, RequestError, validate_request
from stagediff.spec import StageContext
from tasks import decode_task, denoise_task, encode_task


@flow(name="batch", log_prints=True)
def batch(
    prompts_file: str,
    store: str = "outputs/batch",
    model: str | None = None,
    seed: int = 0,
    steps: int = 28,
    guidance: float = 3.5,
    height: int = 1024,
    width: int = 1024,
    max_sequence_length: int = 512,
    chunk_size: int = 8,
    batch_size: int = 1,
    dtype: Dtype = "auto",
    max_memory: str | dict[str, str] | None = None,
    offload_dir: str | None = None,
    keep_intermediates: bool = False,
    retries: int = 0,
) -> dict[str, Any]:
    """Generate an image for every item of a prompts file that is not in the store yet.

    Args:
        prompts_file: A .txt (one prompt a line), .jsonl or .csv file; columns: id, prompt, negative_prompt,
            seed, steps, guidance, height, width (only prompt is required).
        store: Folder of the batch: images/{item id}.png and batch.json, kept from run to run.
        model: Diffusers pipeline folder or Hub id; empty means the embedded tiny random model.
        seed: Base seed: an item without its own seed uses seed + its position (0-based) in the file.
        steps: Denoising steps of items without their own.
        guidance: Guidance scale of items without their own.
        height: Image height (a multiple of 16) of items without their own.
        width: Image width (a multiple of 16) of items without their own.
        max_sequence_length: T5 tokens per prompt, 1 to 512.
        chunk_size: Items per chunk: each stage loads its model once per chunk.
        batch_size: Items per forward pass in every stage.
        dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.
        max_memory: Memory per device, e.g. "0=16GiB,1=16GiB,cpu=64GiB".
        offload_dir: Folder for weights accelerate offloads to disk.
        keep_intermediates: Keep each item's embeddings and latents files after its image is written.
        retries: Retries of a failed stage.
    """
    logger = get_run_logger()
    # 1. Check the parameters, then every line of the file (before any model is built or loaded, and before
    #    anything is written)
    fields = dict(
        steps=steps, guidance=guidance, height=height, width=width, seed=seed, max_sequence_length=max_sequence_length,
        batch_size=batch_size, dtype=dtype, placement={"max_memory": max_memory, "offload_dir": offload_dir},
        prompts=["-"], run_id="batch",
    )  # fmt: skip
    validate_request(**fields, model=model or str(default_model_dir()), check_model=False)
    if chunk_size < 1:
        raise RequestError("chunk_size", chunk_size, "must be an integer >= 1")
    store_dir = Path(store)
    if store_dir.exists() and not store_dir.is_dir():
        raise RequestError("store", store, "must be a folder (or not exist yet)")
    items = read_batch_file(prompts_file, seed, {name: fields[name] for name in SETTINGS})
    request = validate_request(**fields, model=model or str(ensure_default_model()))

    # 2. Plan: skip the items already in the store; group the others by settings, in chunks. A second run on
    #    the same store waits for the first, then does what is left.
    with store_lock(store_dir, logger):
        run_fields = {"model": request.model, "max_sequence_length": max_sequence_length, "dtype": dtype}
        manifest = read_batch_manifest(store_dir) or new_manifest()
        todo = plan(manifest, items, store_dir, run_fields)
        chunks = make_chunks(todo, chunk_size)
        run = start_run(manifest, str(Path(prompts_file).resolve()), str(flow_run.id) if flow_run.id else None, todo)
        write_batch_manifest(store_dir, manifest)
        if any(item.negative_prompt for item in todo):
            logger.warning("negative_prompt is kept in batch.json but not used: the Flux stages do not take one")
        logger.info("%d items: %d done already, %d to compute in %d chunks", len(items), run["skipped"], len(todo),
                    len(chunks))  # fmt: skip
        tag_flow_run(model_tag(model))
        progress = create_progress_artifact(
            0.0 if todo else 100.0, key="batch-progress", description=f"{len(todo)} items to compute in {store_dir}"
        )

        # 3. Each chunk: encode -> denoise -> decode, each stage in a fresh process that loads its model once
        tags = stage_tags(model)
        finished = 0
        for n, chunk in enumerate(chunks, 1):
            label = f"[chunk {n}/{len(chunks)}]"
            ctx = StageContext(
                model=request.model,
                run_dir=str(store_dir),
                dtype=request.dtype,
                batch_size=request.batch_size,
                max_memory=request.placement.max_memory,
                offload_dir=request.placement.offload_dir,
                item_names={item.position: item.id for item in chunk},
            )
            steps_, guidance_, height_, width_ = chunk[0].settings
            seeds = {item.position: item.seed for item in chunk}
            try:
                encoded = encode_task.with_options(task_run_name=f"encode {label}", tags=tags, retries=retries)(
                    ctx, [(item.position, item.prompt) for item in chunk], max_sequence_length
                )
                denoised = denoise_task.with_options(task_run_name=f"denoise {label}", tags=tags, retries=retries)(
                    ctx, [(ref, seeds[ref.index]) for ref in encoded["items"]], steps_, guidance_, height_, width_,
                    max_sequence_length,
                )  # fmt: skip
                decoded = decode_task.with_options(task_run_name=f"decode {label}", tags=tags, retries=retries)(
                    ctx, denoised["items"], height_, width_
                )
            except BaseException as exc:
                error = f"{type(exc).__name__}: {exc}"
                fail_chunk(manifest, chunk, error)
                finish_run(manifest, run, error)
                write_batch_manifest(store_dir, manifest)
                raise
            stats = {stage: result["process"] for stage, result in
                     (("encode", encoded), ("denoise", denoised), ("decode", decoded))}  # fmt: skip
            record_chunk(manifest, run, chunk, decoded["items"], stats)
            write_batch_manifest(store_dir, manifest)
            if not keep_intermediates:
                for path in intermediates(store_dir, chunk):
                    path.unlink(missing_ok=True)
            finished += len(chunk)
            update_progress_artifact(progress, 100.0 * finished / len(todo))
            logger.info("%s done: %d/%d items", label, finished, len(todo))

        # 4. Finish: the manifest, the item table and the gallery of the first images
        finish_run(manifest, run)
        write_batch_manifest(store_dir, manifest)
        entries = [entry for entry in manifest["items"] if entry["status"] != "removed"]
        items_table(entries, store_dir.resolve())
        gallery(entries, store_dir.resolve(), run["run"])
        logger.info("batch completed: %d items in %s", len(entries), store_dir / "images")
    return manifest
