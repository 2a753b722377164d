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

from artifacts import ArtifactError, Store
from flows.ui import gallery, items_table, model_tag, stage_tags, tag_flow_run
from stagediff.batch import (
    BatchItem,
    check_batch,
    chunk_keys,
    fail_chunk,
    finish_run,
    make_chunks,
    new_manifest,
    plan,
    read_batch_manifest,
    record_chunk,
    start_run,
    store_lock,
    write_batch_manifest,
)
from stagediff.default_model import ensure_default_model
from stagediff.family import family_for
from stagediff.isolation import warm_up
from stagediff.keys import model_identity, resolve_dtype
from stagediff.request import Dtype, validate_request
from stagediff.runs import check_store
from stagediff.spec import DenoiseSettings, ItemRef, StageContext
from tasks import decode_task, denoise_task, encode_task


def run_chunk(
    chunk: list[BatchItem],
    label: str,
    ctx: StageContext,
    store: Store,
    keys: dict[int, dict[str, str]],
    settings: DenoiseSettings,
    use_negatives: bool,
    options: dict[str, Any],
) -> tuple[list[ItemRef], dict[str, Any]]:
    """encode -> denoise -> decode for the chunk's items the store lacks (a stage with nothing to do starts
    no process); return every item's image ref and the stats of the processes that ran."""
    by_position = {item.position: item for item in chunk}
    stats: dict[str, Any] = {}

    def missing(kind: str) -> list[int]:
        return [p for p in by_position if store.check(kind, keys[p][kind]) is None]

    def refs(kind: str) -> dict[int, ItemRef]:
        found = {p: store.check(kind, keys[p][kind]) for p in by_position}
        if any(record is None for record in found.values()):
            raise ArtifactError(f"{kind} of chunk {label} missing from the store after its stage ran")
        return {p: ItemRef(p, kind, keys[p][kind], record.sha256) for p, record in found.items()}

    def run(stage: str, task: Any, kind: str, todo: list[int], *args: Any, **kwargs: Any) -> None:
        named = task.with_options(task_run_name=f"{stage} {label}", **options)
        stats[stage] = named(ctx, *args, {p: keys[p][kind] for p in todo}, **kwargs)["process"]

    if todo := missing("embeddings"):
        negatives = [by_position[p].negative_prompt for p in todo] if use_negatives else None
        prompts = [(p, by_position[p].prompt) for p in todo]
        run(
            "encode", encode_task, "embeddings", todo, prompts, settings.max_sequence_length, negative_prompts=negatives
        )
    embeddings = refs("embeddings")
    if todo := missing("latents"):
        run("denoise", denoise_task, "latents", todo, [(embeddings[p], by_position[p].seed) for p in todo], settings)
    latents = refs("latents")
    if todo := missing("images"):
        run("decode", decode_task, "images", todo, [latents[p] for p in todo], settings.height, settings.width)
    return list(refs("images").values()), stats


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
        retries: Retries of a failed stage.
    """
    logger = get_run_logger()
    # 1. Check the parameters, then every line of the file (before any model is built or loaded, and before
    #    anything is written)
    fields, items = check_batch(
        prompts_file, store, model, seed, chunk_size, steps=steps, guidance=guidance, height=height, width=width,
        max_sequence_length=max_sequence_length, batch_size=batch_size, dtype=dtype,
        placement={"max_memory": max_memory, "offload_dir": offload_dir},
    )  # fmt: skip
    store_dir = Path(store)
    request = validate_request(**fields, model=model or str(ensure_default_model()))

    # 2. Plan: skip the items already in the store; group the others by settings, in chunks. A second run on
    #    the same store waits for the first, then does what is left.
    with store_lock(store_dir, logger):
        run_fields = {"model": request.model, "max_sequence_length": max_sequence_length, "dtype": dtype}
        manifest = read_batch_manifest(store_dir) or new_manifest()
        todo = plan(manifest, items, store_dir, run_fields)
        chunks = make_chunks(todo, chunk_size)
        if todo:
            warm_up(request.model)  # the stages' imports start while the run is planned and tagged
        run = start_run(manifest, str(Path(prompts_file).resolve()), str(flow_run.id) if flow_run.id else None, todo)
        write_batch_manifest(store_dir, manifest)
        logger.info("%d items: %d done already, %d to compute in %d chunks", len(items), run["skipped"], len(todo),
                    len(chunks))  # fmt: skip
        tag_flow_run(model_tag(model))
        progress = create_progress_artifact(
            0.0 if todo else 100.0, key="batch-progress", description=f"{len(todo)} items to compute in {store_dir}"
        )

        # 3. Each chunk: encode -> denoise -> decode, each stage in a fresh process that loads its model once,
        #    computing only what the artifact store does not have yet
        tags = stage_tags(model)
        artifact_store = Store(check_store(None, str(store_dir)))
        identity, dtype_ = model_identity(request.model), resolve_dtype(request.dtype)
        true_cfg_family = family_for(request.model).true_cfg
        if true_cfg_family and any(item.negative_prompt for item in todo):
            logger.warning("negative_prompt is kept in batch.json but not used: FLUX.1 needs true CFG for it")
        options = {"tags": tags, "retries": retries}
        finished = 0
        for n, chunk in enumerate(chunks, 1):
            label = f"[chunk {n}/{len(chunks)}]"
            ctx = StageContext(
                model=request.model,
                run_dir=str(store_dir),
                dtype=dtype_,
                batch_size=request.batch_size,
                max_memory=request.placement.max_memory,
                offload_dir=request.placement.offload_dir,
                store=artifact_store.location,
            )
            steps_, guidance_, height_, width_ = chunk[0].settings
            settings = DenoiseSettings(steps_, guidance_, height_, width_, max_sequence_length)
            by_position = {item.position: item for item in chunk}
            keys = dict(zip(by_position, chunk_keys(chunk, identity, settings, dtype_), strict=True))

            use_negatives = not true_cfg_family and chunk[0].negative_prompt is not None
            try:
                images, stats = run_chunk(chunk, label, ctx, artifact_store, keys, settings, use_negatives, options)
            except BaseException as exc:
                error = f"{type(exc).__name__}: {exc}"
                fail_chunk(manifest, chunk, error)
                finish_run(manifest, run, error)
                write_batch_manifest(store_dir, manifest)
                raise
            for ref in images:
                artifact_store.materialize("images", ref.key, store_dir / by_position[ref.index].image)
            record_chunk(manifest, run, chunk, images, stats)
            write_batch_manifest(store_dir, manifest)
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
