"""The `generate` flow: images for a list of prompts through the run engine (encode -> denoise -> decode,
each stage in its own OS process, handing the next one checksummed safetensors files through a
content-addressed store shared by runs). The run is described by `OUT/RUN/manifest.json`, whose files
are links to the store's objects."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from stagediff.artifacts import Store, write_manifest
from stagediff.engine import request_items
from stagediff.flows.running import checked_request, heartbeats, refusals_are_final, run_name, start_engine
from stagediff.flows.ui import caption, gallery, items_table
from stagediff.progress import Progress
from stagediff.request import (
    ImageSettings,
    Output,
    Placement,
    Prompts,
    RunOptions,
)
from stagediff.run_manifest import open_manifest, plan, record


@flow(name="generate", flow_run_name=run_name, log_prints=True)
def generate(
    prompts: Prompts,
    settings: ImageSettings = ImageSettings(),  # noqa: B008 (pydantic models are immutable here)
    model: str | None = None,
    placement: Placement = Placement(),  # noqa: B008
    output: Output = Output(),  # noqa: B008
    options: RunOptions = RunOptions(),  # noqa: B008
) -> dict[str, Any]:
    """Generate one image per prompt through three process-isolated stages.

    Args:
        prompts: The prompts (one image each), their negative prompts and the base seed (prompt i: seed + i).
        settings: Steps, guidance, size, sequence length, true CFG, SDXL micro-conditioning; empty fields take
            the model family's pipeline defaults.
        model: Diffusers pipeline folder or Hub id (FLUX.1, SD3, SDXL or SD 1.5); empty means the embedded tiny
            random Flux model (it makes noise images).
        placement: dtype, batch size, memory per device, offload folder, VAE tiling and slicing.
        output: Output root, run id (the run writes under OUT/RUN_ID/) and artifact store (empty: OUT/.store).
        options: Strict (stop at a damaged artifact), retries of a failed stage, chunk size (empty: automatic).
    """
    logger = get_run_logger()
    # 1. Check inputs (before any model is built or loaded, and before anything is written; never retried)
    with refusals_are_final():
        request, store_location = checked_request(prompts, settings, model, placement, output)
        run_dir = request.run_dir
        manifest = open_manifest(request)

    with heartbeats():
        # 2. The engine; every artifact named by its content key (the store may hold some already)
        engine = start_engine(
            request.model,
            model,
            request.placement,
            store_location,
            str(run_dir),
            options,
            name=None if output.run_id else f"generate {request.run_id}",  # else named so at its creation
        )
        items = request_items(request)
        resolved = items[0].settings
        keys = {item.index: engine.keys(item) for item in items}
        if options.strict:
            engine.verify(items, keys)  # a damaged artifact stops the run here, before its record is touched
        store = Store(store_location)
        plan(manifest, keys, store, resolved, engine)
        manifest.update(status="running", flow_run_id=str(flow_run.id) if flow_run.id else None)
        write_manifest(run_dir, manifest)
        store.register_run(run_dir / "manifest.json")
        logger.info("run %s: %d prompts -> %s (store %s)", request.run_id, len(items), run_dir, store_location)

        # 3. encode -> denoise -> decode, persisting each stage's record as soon as it is done
        progress = Progress(len(items))
        progress.start()
        try:
            engine.run(items, keys, lambda stage, refs: record(manifest, run_dir, store, engine, stage, refs), progress)
        except BaseException as exc:
            # what every stage did, an interrupted one included; cancelled (Prefect's SIGTERM, Ctrl-C) or failed
            cancelled = isinstance(exc, TerminationSignal | KeyboardInterrupt)
            manifest["stages"] = {name: info.to_dict() for name, info in engine.stages.items()}
            manifest.update(status="cancelled" if cancelled else "failed", error=f"{type(exc).__name__}: {exc}")
            write_manifest(run_dir, manifest)
            raise
        progress.finish()
        manifest["status"] = "completed"
        manifest.pop("error", None)
        write_manifest(run_dir, manifest)

        # 4. What the UI shows: the items and the first images
        computed = set(manifest["stages"]["decode"]["computed"])
        rows = [
            {"index": e["index"], "prompt": e["prompt"], "seed": e["seed"], "steps": resolved.steps,
             "size": f"{resolved.width}x{resolved.height}", "made": "computed" if e["index"] in computed else "reused",
             "image": str((run_dir / e["image"]).resolve())}
            for e in manifest["items"]
        ]  # fmt: skip
        items_table(rows, key="generate-items", what=str(run_dir / "manifest.json"))
        images = [(run_dir / e["image"], caption(e["prompt"], e["seed"])) for e in manifest["items"]]
        gallery(images, key="generate-gallery", title=f"Run {request.run_id}: {len(items)} images", where=str(run_dir))
        logger.info("run %s completed: %d images in %s", request.run_id, len(items), run_dir / "images")
        return manifest
