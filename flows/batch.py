"""The `batch` flow: images for every line of a prompts file that the batch folder does not have yet.

Every line is checked before anything loads or is written. The items still to do go through the run
engine, as `generate`'s do; `STORE/batch.json` lists every item and its status, so a nightly run over
a growing file only computes the new lines.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from stagediff.artifacts import Store
from stagediff.batch import (
    check_batch,
    finish_run,
    item_entry,
    new_manifest,
    plan,
    read_batch_manifest,
    record_images,
    start_run,
    store_lock,
    write_batch_manifest,
)
from stagediff.default_model import default_model_dir, ensure_default_model
from stagediff.engine import Item
from stagediff.family import family_for
from stagediff.flows.fanout import ReplicaFailed, failure, run_replicas, share_jobs
from stagediff.flows.running import heartbeats, refusals_are_final, run_name, start_engine
from stagediff.flows.ui import caption, gallery, items_table
from stagediff.jobs import ItemRef
from stagediff.progress import Progress
from stagediff.replica import plan_replicas
from stagediff.request import ImageSettings, Placement, RunOptions, check_store, resolve_settings, validate_request


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
        store: Folder of the batch: images/{item id}.png and batch.json, kept from run to run.
        settings: The settings of items without their own; empty fields take the model's pipeline defaults.
        model: Diffusers pipeline folder or Hub id; empty means the embedded tiny random model.
        seed: Base seed: an item without its own seed uses seed + its position (0-based) in the file.
        placement: dtype, batch size, memory per device, offload folder, VAE tiling and slicing.
        options: Strict (stop at a damaged artifact), retries of a failed stage, chunk size (empty: automatic).
        replicas: Data-parallel replicas on this machine, each over a contiguous share of the items to do.
        device_groups: Instead of replicas: one replica per group of GPU indexes, e.g. ["0,1", "2,3"].
        threads: On a machine without GPUs, torch threads per replica (default: torch's own count, as a plain
            one-process run uses, which keeps its images bit-identical to that run's).
    """
    logger = get_run_logger()
    # 1. Check the parameters, then every line of the file (before any model is built or loaded, and before
    #    anything is written; never retried)
    with refusals_are_final():
        fields = dict(prompts=["-"], run_id="batch", seed=seed, settings=settings, placement=placement)
        validate_request(**fields, model=model or str(default_model_dir()), check_model=False)
        rows = check_batch(prompts_file, store, seed)
        fan_out = replicas is not None or device_groups is not None or threads is not None
        groups = plan_replicas(replicas, device_groups, None, None, threads) if fan_out else None
        request = validate_request(**fields, model=model or str(ensure_default_model()))
    store_dir = Path(store)

    # 2. Plan: name every item's artifacts; skip the items whose image is already in the folder. A second run
    #    on the same folder waits for the first, then does what is left.
    with store_lock(store_dir, logger), heartbeats():
        artifact_store = check_store(None, str(store_dir))
        engine = start_engine(request.model, model, request.placement, artifact_store, str(store_dir), options)
        true_cfg = family_for(request.model).true_cfg
        items, entries = [], []
        for row in rows:
            row_settings = row.settings(request.settings)
            # FLUX.1's guidance is distilled: a negative prompt is used only with true CFG
            negative = row.negative_prompt if not true_cfg or row_settings.true_cfg_scale > 1 else None
            item = Item(row.position, row.prompt, negative, row.seed, resolve_settings(row_settings, request.model))
            items.append(item)
            entries.append(item_entry(row, {**asdict(item.settings), "dtype": engine.ctx.dtype,
                                            "model": request.model}, engine.keys(item)))  # fmt: skip
        if true_cfg and any(
            row.negative_prompt and item.negative_prompt is None for row, item in zip(rows, items, strict=True)
        ):
            logger.warning("negative_prompt is kept in batch.json but not used: FLUX.1 needs true CFG for it")
        keys = {item.index: entry["keys"] for item, entry in zip(items, entries, strict=True)}
        if options.strict:
            engine.verify(items, keys)
        manifest = read_batch_manifest(store_dir, logger) or new_manifest()
        todo_ids = set(plan(manifest, entries, store_dir))
        todo = [item for row, item in zip(rows, items, strict=True) if row.id in todo_ids]
        run = start_run(manifest, str(Path(prompts_file).resolve()), str(flow_run.id) if flow_run.id else None,
                        sorted(todo_ids))  # fmt: skip
        write_batch_manifest(store_dir, manifest)
        logger.info("%d items: %d done already, %d to compute", len(rows), run["skipped"], len(todo))

        # 3. encode -> denoise -> decode for the items to do; each image lands in the folder as soon as it is made
        by_position = {row.position: row for row in rows}
        blobs = Store(artifact_store)

        def on_stored(stage: str, refs: dict[int, ItemRef]) -> None:
            if stage == "decode":
                for index, ref in refs.items():
                    blobs.materialize("images", ref.key, store_dir / by_position[index].image)
                record_images(manifest, run, {by_position[i].id: ref.sha256 for i, ref in refs.items()})
            if groups is None:
                run["stages"] = {name: info.to_dict() for name, info in engine.stages.items()}
            write_batch_manifest(store_dir, manifest)

        try:
            if groups is None:
                progress = Progress(len(todo))
                progress.start()
                engine.run(todo, keys, on_stored, progress)
                progress.finish()
            else:  # data-parallel replicas over the items to do, gathered by item index
                jobs = share_jobs(
                    todo, groups, request.model, request.placement, options, artifact_store, None,
                    store_dir / "replicas", f"fanout/batch-{run['run']}-{flow_run.id or os.getpid()}",
                )  # fmt: skip
                results, run["replicas"], failed = run_replicas(jobs, blobs, store_dir, None, None)
                for result in results:
                    found = {int(i): ItemRef(int(i), "images", f["keys"]["images"], f["sha256"]["images"])
                             for i, f in result["items"].items()}  # fmt: skip
                    on_stored("decode", found)
                run["stages"] = {r["replica"]: r["stages"] for r in results}
                if failed:
                    raise ReplicaFailed(failure(failed, jobs))
        except BaseException as exc:
            finish_run(manifest, run, f"{type(exc).__name__}: {exc}")
            write_batch_manifest(store_dir, manifest)
            raise

        # 4. Finish: the manifest, the item table and the gallery of the first new images
        finish_run(manifest, run)
        write_batch_manifest(store_dir, manifest)
        listed = [entry for entry in manifest["items"] if entry["status"] != "removed"]
        folder = store_dir.resolve()
        rows_ = [
            {"id": e["id"], "line": e["line"], "status": e["status"], "prompt": e["prompt"], "seed": e["seed"],
             "steps": e["steps"], "size": f"{e['width']}x{e['height']}",
             "image": str(folder / e["image"]), "made": "computed" if e["run"] == run["run"] else "reused"}
            for e in listed
        ]  # fmt: skip
        items_table(rows_, key="batch-items", what=str(store_dir / "batch.json"))
        done = [e for e in listed if e["status"] == "done"]
        new = [e for e in done if e["run"] == run["run"]]
        shown = new or done
        title = f"first {min(len(shown), 8)} of the {len(new)} new images" if new else "first images"
        gallery([(folder / e["image"], caption(e["prompt"], e["seed"])) for e in shown], key="batch-gallery",
                title=f"Batch gallery: {title}", where=str(folder))  # fmt: skip
        logger.info("batch completed: %d items in %s", len(listed), store_dir / "images")
    return manifest
