"""What both flows do around the engine: start the stage processes' imports early, name and tag the
flow run, resolve the model's identity and dtype, and build the engine."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from prefect.runtime import flow_run

from stagediff.engine import Engine
from stagediff.flows.ui import label_flow_run, model_tag, stage_tags
from stagediff.isolation import warm_up
from stagediff.jobs import StageContext
from stagediff.keys import model_identity, resolve_dtype
from stagediff.request import Placement, RunOptions


def start_engine(
    model: str,
    model_arg: str | None,
    placement: Placement,
    store: str,
    work_dir: str,
    options: RunOptions,
    name: str | None = None,
) -> Engine:
    """The engine of a flow run over `model` (`model_arg`: what the user named, None for the default model);
    `name`: a new name for the flow run (when its first one could not know its run id)."""
    warm_up(model)  # the stage forkserver imports torch and the model's classes while the run is planned
    label_flow_run(name, model_tag(model_arg))
    ctx = StageContext(
        model=model,
        work_dir=work_dir,
        store=store,
        dtype=resolve_dtype(placement.dtype),  # "auto" is asked of a stage process: never torch here
        batch_size=placement.batch_size,
        max_memory=placement.max_memory,
        offload_dir=placement.offload_dir,
    )
    return Engine(
        ctx=ctx,
        identity=model_identity(model),
        tiled_decode=placement.tiled_decode,
        sliced_decode=placement.sliced_decode,
        strict=options.strict,
        retries=options.retries,
        chunk_size=options.chunk_size,
        tags=stage_tags(model_arg),  # only tags a concurrency limit exists for
        logger=get_run_logger(),
    )


def run_name() -> str:
    """A flow run's name: `generate RUN_ID` or `batch FILE` (a run id made inside the flow renames it later)."""
    params = flow_run.parameters or {}
    if "prompts_file" in params:
        return f"batch {Path(str(params['prompts_file'])).name}"
    output = params.get("output")
    run_id = output.get("run_id") if isinstance(output, dict) else getattr(output, "run_id", None)
    return f"generate {run_id}" if run_id else "generate"
