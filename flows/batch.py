"""The `batch` flow: images for every line of a prompts file that the batch folder does not have yet.

Every line is checked in one streaming pass before anything loads or is written, and the file is stored
once in the folder's artifact store as it is checked. The items are then made chunk by chunk from that
copy and go through the run engine as `generate`'s do; `STORE/batch.db` records every item and its status
(`STORE/batch.json` sums it up, `STORE/items.jsonl` lists every item), so a nightly run over a growing file
only computes the new lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from stagediff.artifacts import Store
from stagediff.batch import check_batch, check_batch_file, file_format, run_items, store_lock
from stagediff.default_model import default_model_dir, ensure_default_model
from stagediff.engine import Item
from stagediff.flows.fanout import ReplicaFailed, failure, run_replicas, share_jobs
from stagediff.flows.running import ended_status, heartbeats, refusals_are_final, register_root, run_name, start_engine
from stagediff.flows.ui import run_artifacts
from stagediff.isolation import warm_up
from stagediff.progress import Progress
from stagediff.record import is_old_format, read_summary
from stagediff.replica import cpu_replicas, plan_replicas
from stagediff.request import ImageSettings, Placement, RunOptions, check_store, validate_request
from stagediff.run_manifest import RunFolder
from stagediff.sources import Source, commit, open_source, staging


@flow(name="batch", flow_run_name=run_name, log_prints=True)
def batch(
    prompts_file: str,
    store: str = "outputs/batch",
    settings: ImageSettings = ImageSettings(),  # noqa: B008 (pydantic models are immutable here)
    model: str | None = None,
    seed: int = 0,
    placement: Placement = Placement(),  # noqa: B008
    options: RunOptions = RunOptions(),  # noqa: B008
    replicas: int | None = None,
    device_groups: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Generate an image for every item of a prompts file that is not in the batch folder yet.

    Args:
        prompts_file: A .txt (one prompt a line), .jsonl or .csv file; columns: id, prompt, negative_prompt,
            seed, steps, guidance, height, width (only prompt is required).
        store: Folder of the batch: images/{item id}.png, batch.json and batch.db, kept from run to run.
        settings: The settings of items without their own; empty fields take the model's pipeline defaults.
        model: Diffusers pipeline folder or Hub id; empty means the embedded tiny random model.
        seed: Base seed: an item without its own seed uses seed + its position (0-based) in the file.
        placement: dtype, batch size, memory per device, offload folder, VAE tiling and slicing.
        options: Strict (stop at a damaged artifact), retries of a failed stage, chunk size (empty: automatic).
        replicas: Data-parallel replicas on this machine, each over a contiguous range of the file's items.
        device_groups: Instead of replicas: one replica per group of GPU indexes, e.g. ["0,1", "2,3"].
        threads: On a machine without GPUs, torch threads per replica (default: torch's own count, as a plain
            one-process run uses, which keeps its images bit-identical to that run's).
    """
    logger = get_run_logger()
    # 1. Check the parameters, then every line of the file (before any model is built or loaded, and before
    #    anything is written; never retried)
    with refusals_are_final():
        fields = dict(prompts=["-"], run_id="batch", seed=seed, settings=settings, placement=placement)
        checked = validate_request(**fields, model=model or str(default_model_dir()), check_model=False)
        fan_out = replicas is not None or device_groups is not None or threads is not None
        groups = plan_replicas(replicas, device_groups, None, None, threads) if fan_out else None
        # the stage forkserver imports torch and the model's classes while every line is checked
        warm_up(checked.model, checked.placement.compile, cpu_replicas(groups), checked.placement.spinning)
        check_batch(prompts_file, store, seed)
        request = validate_request(**fields, model=model or str(ensure_default_model()))
    store_dir = Path(store)

    # 2. The file stored once (checked again as it is copied), the run a root of the store's gc; a second run on
    #    the same folder waits for the first, then does what is left
    with store_lock(store_dir, logger), heartbeats():
        artifact_store = check_store(None, str(store_dir))
        engine = start_engine(request.model, model, request.placement, artifact_store, str(store_dir), options,
                              cpu_replicas=cpu_replicas(groups))  # fmt: skip
        blobs = Store(artifact_store)
        with refusals_are_final(), staging(blobs) as staged:
            count, sha256 = check_batch_file(prompts_file, seed, staged)
            source = commit(blobs, staged, sha256, file_format(prompts_file), count)
        if options.strict:  # read only, before the record exists
            engine.verify(item for _, item in rows(blobs, source, seed, request.settings, request.model))
        register_root(blobs, store_dir / "batch.json", engine, source,
                      batch={"seed": seed, "settings": request.settings.model_dump(mode="json")})  # fmt: skip
        adopt_old_summary(store_dir, logger)
        flow_run_id = str(flow_run.id) if flow_run.id else None
        folder = RunFolder(store_dir, "batch", "batch.json",
                           {"kind": "stagediff-batch", "prompts_file": str(Path(prompts_file).resolve()),
                            "model": request.model, "store": artifact_store, "source": source.model_dump(),
                            "flow_run_id": flow_run_id})  # fmt: skip
        folder.start(engine if groups is None else None, blobs, count, flow_run_id=flow_run_id,
                     prompts_file=str(Path(prompts_file).resolve()), items=count)  # fmt: skip
        logger.info("%d items in %s -> %s", count, prompts_file, store_dir)

        # 3. encode -> denoise -> decode for the items the folder lacks; each image lands in it as soon as it is made
        progress = Progress(count)
        progress.start()
        try:
            if groups is None:
                items = folder_items(folder, blobs, source, seed, request.settings, request.model)
                engine.run(items, progress=progress, **folder.hooks())
            else:  # data-parallel replicas over ranges of the file's items, gathered by item index as they go
                jobs = share_jobs(
                    count, groups, request.model, source, request.placement, options, artifact_store, None,
                    store_dir / "replicas", f"fanout/batch-{folder.record.run}-{flow_run_id or 'local'}",
                    f"batch {store_dir.name} run {folder.record.run}", kind="batch", seed=seed,
                    settings=request.settings,
                )  # fmt: skip
                results, folder.extra["replicas"], failed = run_replicas(jobs, blobs, folder, progress, None, None)
                folder.extra["replica_stages"] = {r["replica"]: r["stages"] for r in results}
                if failed:
                    raise ReplicaFailed(failure(failed, jobs))
        except BaseException as exc:
            folder.finish(ended_status(exc), f"{type(exc).__name__}: {exc}")
            raise
        progress.finish()
        summary = folder.finish("completed")

        # 4. The item table (first and latest) and the gallery
        run_artifacts(folder, "batch", "Batch")
        folder.close()
        counts = summary["counts"]
        logger.info("batch completed: %d items, %d computed by this run, in %s", counts["items"],
                    counts["computed_by_this_run"], store_dir / "images")  # fmt: skip
    return summary


def rows(blobs: Store, source: Source, seed: int, settings: ImageSettings, model: str) -> Iterator[tuple[Any, Item]]:
    with open_source(blobs, source) as stream:
        yield from run_items(stream, source.format, seed, settings, model, source.name)


def folder_items(
    folder: RunFolder, blobs: Store, source: Source, seed: int, settings: ImageSettings, model: str
) -> Iterator[Item]:
    """The file's items one at a time; each item's id and line go to the folder as it is made."""
    for row, item in rows(blobs, source, seed, settings, model):
        folder.ids[item.index] = (row.id, row.line)
        yield item


def adopt_old_summary(store_dir: Path, logger: Any) -> None:
    """A batch.json written before run records (or unreadable) is kept aside; the store's artifacts are reused, so
    the next run computes nothing again."""
    path = store_dir / "batch.json"
    if not path.exists():
        return
    try:
        old = is_old_format(read_summary(path))
    except (OSError, ValueError):
        old = True
    if old:
        kept = path.with_name(f"batch.v1.json.{int(path.stat().st_mtime)}")
        path.replace(kept)
        logger.warning("%s was written by an older stagediff or is damaged: kept as %s; the items are recorded "
                       "again from the store (nothing is computed again)", path, kept.name)  # fmt: skip
