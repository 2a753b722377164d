"""The `generate` flow: images for a list of prompts through the run engine (encode -> denoise -> decode,
each stage in its own OS process, handing the next one checksummed safetensors files through a
content-addressed store shared by runs). The run is described by `OUT/RUN/manifest.json`, whose files
are links to the store's objects."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from stagediff.artifacts import Store
from stagediff.engine import request_items
from stagediff.flows.running import (
    checked_request,
    ended_status,
    heartbeats,
    refusals_are_final,
    register_root,
    run_name,
    start_engine,
    store_request,
)
from stagediff.flows.ui import run_artifacts
from stagediff.progress import Progress
from stagediff.request import (
    ImageSettings,
    Output,
    Placement,
    Prompts,
    RunOptions,
)
from stagediff.run_manifest import RunFolder, adopt_old_manifest, open_run, run_summary_base


@flow(name="generate", flow_run_name=run_name, log_prints=True)
def generate(
    prompts: Prompts,
    settings: ImageSettings = ImageSettings(),  # noqa: B008 (pydantic models are immutable here)
    model: str | None = None,
    placement: Placement = Placement(),  # noqa: B008
    output: Output = Output(),  # noqa: B008
    options: RunOptions = RunOptions(),  # noqa: B008
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate one image per prompt through three process-isolated stages.

    Args:
        prompts: The prompts (one image each) or a prompts file, their negative prompts and the base seed
            (prompt i: seed + i).
        settings: Steps, guidance, size, sequence length, true CFG, SDXL micro-conditioning; empty fields take
            the model family's pipeline defaults.
        model: Diffusers pipeline folder or Hub id (FLUX.1, SD3, SDXL or SD 1.5); empty means the embedded tiny
            random Flux model (it makes noise images).
        placement: dtype, batch size, memory per device, offload folder, VAE tiling and slicing.
        output: Output root, run id (the run writes under OUT/RUN_ID/) and artifact store (empty: OUT/.store).
        options: Strict (stop at a damaged artifact), retries of a failed stage, chunk size (empty: automatic).
        storage_options: fsspec options of a URL store, e.g. {"endpoint_url": "http://127.0.0.1:9000"}.
    """
    logger = get_run_logger()
    # 1. Check inputs (before any model is built or loaded, and before anything is written; never retried)
    with refusals_are_final():
        request, store_location = checked_request(prompts, settings, model, placement, output, storage_options)
        run_dir = request.run_dir
        previous = open_run(request)

    with heartbeats():
        # 2. The engine, the prompts stored once, the run a root of the store's gc before it touches an artifact
        engine = start_engine(
            request.model,
            model,
            request.placement,
            store_location,
            str(run_dir),
            options,
            name=None if output.run_id else f"generate {request.run_id}",  # else named so at its creation
            store_options=storage_options,
        )
        store = Store(store_location, storage_options)
        source = store_request(request, store)
        if options.strict:  # read only, before the run's folder and record exist: a refusal leaves nothing
            engine.verify(request_items(request, source, store))
        register_root(store, run_dir / "manifest.json", engine, source, request=request)
        adopt_old_manifest(run_dir, previous)
        folder = RunFolder(run_dir, "run", "manifest.json", run_summary_base(request, source, store_location, engine))
        folder.summary_base["flow_run_id"] = str(flow_run.id) if flow_run.id else None
        folder.start(engine, store, request.count, flow_run_id=folder.summary_base["flow_run_id"])
        logger.info("run %s: %d prompts -> %s (store %s)", request.run_id, request.count, run_dir, store_location)

        # 3. encode -> denoise -> decode, chunk by chunk as the items are read, each stage's record kept at once
        progress = Progress(request.count)
        progress.start()
        try:
            engine.run(request_items(request, source, store), progress=progress, **folder.hooks())
        except BaseException as exc:
            # what every stage did, an interrupted one included; cancelled (Prefect's SIGTERM, Ctrl-C) or failed
            folder.finish(ended_status(exc), f"{type(exc).__name__}: {exc}")
            raise
        progress.finish()
        summary = folder.finish("completed")

        # 4. What the UI shows: the first and latest items, the first images
        run_artifacts(folder, "generate", f"Run {request.run_id}")
        folder.close()
        logger.info("run %s completed: %d images in %s", request.run_id, request.count, run_dir / "images")
        return summary
