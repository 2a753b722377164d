"""What the flows do around the engine: start the stage processes' imports early, name and tag the
flow run, resolve the model's identity and dtype, build the engine, send heartbeats, and never retry
bad input."""

from __future__ import annotations

import contextvars
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prefect
from prefect import get_client, get_run_logger
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from stagediff.artifacts import Store
from stagediff.default_model import default_model_dir, ensure_default_model
from stagediff.engine import Engine, build_engine
from stagediff.flows.ui import label_flow_run, model_tag, stage_tags
from stagediff.isolation import warm_up
from stagediff.record import Record
from stagediff.request import (
    GenerateRequest,
    ImageSettings,
    Output,
    Placement,
    Prompts,
    RequestError,
    RunOptions,
    check_store,
    new_run_id,
    validate_request,
)
from stagediff.sources import Source, store_inline, store_prompts_file


def start_engine(
    model: str,
    model_arg: str | None,
    placement: Placement,
    store: str,
    work_dir: str,
    options: RunOptions,
    name: str | None = None,
    store_options: dict[str, Any] | None = None,
    cpu_replicas: bool = False,
) -> Engine:
    """The engine of a flow run over `model` (`model_arg`: what the user named, None for the default model);
    `name`: a new name for the flow run (when its first one could not know its run id); `cpu_replicas`: local
    CPU replicas will fork from the stage forkserver (`isolation.warm_up`)."""
    # the stage forkserver imports torch and the model's classes meanwhile
    warm_up(model, placement.compile, cpu_replicas, placement.spinning)
    label_flow_run(name, model_tag(model_arg))
    with refusals_are_final():  # a model whose weights do not fit its config is bad input, never retried
        return build_engine(
            model,
            placement,
            store,
            work_dir,
            options,
            store_options,
            tags=stage_tags(model_arg),
            logger=get_run_logger(),
        )  # fmt: skip (stage tasks carry only the tags a concurrency limit exists for)


def checked_request(
    prompts: Prompts,
    settings: ImageSettings,
    model: str | None,
    placement: Placement,
    output: Output,
    storage_options: dict[str, Any] | None = None,
) -> tuple[GenerateRequest, str]:
    """A generate-style flow's request and store, checked before any model is built or loaded and before
    anything is written (the embedded default model is built only once the rest has passed)."""
    fields = dict(
        **prompts.source(), negative_prompts=prompts.negative_prompts, seed=prompts.seed,
        settings=settings, placement=placement, out=output.out, run_id=output.run_id or new_run_id(),
    )  # fmt: skip
    validate_request(**fields, model=model or str(default_model_dir()), check_model=model is not None)
    store = check_store(output.store, output.out, storage_options)
    return validate_request(**fields, model=model or str(ensure_default_model())), store


def store_request(request: GenerateRequest, store: Store) -> Source:
    """The request's prompts stored once in the store (a prompts file checked again as it is copied: it must
    still be the file the request was checked against)."""
    if request.prompts is not None:
        return store_inline(store, request.prompts)
    source = store_prompts_file(store, request.prompts_file.path)
    if source.sha256 != request.prompts_file.sha256:
        allowed = "changed while the run was starting: run the command again"
        raise RequestError("prompts_file", request.prompts_file.path, allowed)
    return source


def register_root(
    store: Store,
    summary: Path,
    engine: Engine,
    source: Source,
    request: GenerateRequest | None = None,
    batch: dict[str, Any] | None = None,
) -> None:
    """Make the run a root of the store's gc before it reads or writes any artifact: what its items are made of
    (the stored prompts, the request or the batch's settings, the key inputs), so gc keeps what it will use."""
    from stagediff.run_manifest import request_fields

    root = {
        "kind": "batch" if batch is not None else "generate",
        "model": engine.ctx.model,
        "variant": engine.ctx.variant,
        "dtype": engine.ctx.dtype,
        "tiled_decode": engine.tiled_decode,
        "sliced_decode": engine.sliced_decode,
        "metadata": engine.metadata,
        "levers": engine.ctx.levers,
        "encode_levers": engine.ctx.encode_levers,
        "source": source.model_dump(),
        "record": str((summary.parent / ("batch.db" if batch is not None else "record.db")).absolute()),
    }
    if request is not None:
        root["request"] = request_fields(request)
    if batch is not None:
        root["batch"] = batch
    # the record exists before the registration: gc forgets a registration whose folder holds neither file
    Record(root["record"], "batch" if batch is not None else "run").close()
    store.register_run(summary, root)


def run_name() -> str:
    """A flow run's name: `generate RUN_ID`, `fanout RUN_ID` or `batch FILE` (a run id made inside the flow
    renames it later)."""
    params, name = flow_run.parameters or {}, flow_run.flow_name or "run"
    if "prompts_file" in params:
        return f"{name} {Path(str(params['prompts_file'])).name}"
    output = params.get("output")
    run_id = output.get("run_id") if isinstance(output, dict) else getattr(output, "run_id", None)
    return f"{name} {run_id}" if run_id else name


@contextmanager
def refusals_are_final() -> Iterator[None]:
    """Bad input raised inside fails the flow run at once, whatever its retries.

    Deployments retry a failed flow run (prefect.yaml), but Prefect 3.8's flows, unlike its tasks, take no
    `retry_condition_fn`: so a refusal sets this run's retries to 0 (the server then lets it fail)."""
    try:
        yield
    except ValueError:  # RequestError, BatchFileError, pydantic's ValidationError: bad input, never transient
        context = FlowRunContext.get()
        if context is not None and context.flow_run is not None and context.flow_run.empirical_policy.retries:
            policy = context.flow_run.empirical_policy.model_copy(update={"retries": 0})
            with get_client(sync_client=True) as client:
                client.update_flow_run(context.flow_run.id, empirical_policy=policy)
        raise


# deploy/crash-zombie-flow-runs.json marks a flow run Crashed after 90 s without a heartbeat
HEARTBEAT_SECONDS = 30
CANCEL_POLL_SECONDS = 2.0  # how often a run no worker watches asks whether it was cancelled


def ended_status(exc: BaseException) -> str:
    """How a run that raised `exc` ended: `cancelled` when a SIGTERM (a worker's or Prefect's cancel) or Ctrl-C
    stopped it, even where the stop then raised something else (a stage process killed under a hook, a record
    written while the run was being stopped), else `failed`."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TerminationSignal | KeyboardInterrupt):
            return "cancelled"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return "failed"


@contextmanager
def heartbeats() -> Iterator[None]:
    """This flow run's heartbeat events, every 30 s while the block runs, unless Prefect sends them as often;
    and, for a run that no worker or runner started (the command line), its cancel.

    Prefect sends one every 180 s by default: with the automation of `make deploy`, a run of two minutes
    would be marked Crashed while it runs. Deployments' runs beat every 30 s (prefect.yaml); the command
    line turns Prefect's own heartbeats off (`without_prefect_heartbeats`), because the end of a flow run
    waits for their thread's current 1 s sleep (0.5 s a run on average). This thread waits on an event
    instead, so it stops the moment the block ends.

    A worker stops the process of a run cancelled in the UI or with `prefect flow-run cancel`; nothing stops
    a command's own process. Here the thread asks for the run's state every CANCEL_POLL_SECONDS, and on a
    cancel sends this process the SIGTERM a worker would: the flow stops its stages and replicas and
    records `cancelled`.
    """
    from prefect.events import emit_event
    from prefect.settings import get_current_settings

    frequency = get_current_settings().flows.heartbeat_frequency
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        yield
        return
    run = context.flow_run
    beat = frequency is None or frequency > HEARTBEAT_SECONDS
    started_by_worker = os.environ.get("PREFECT__FLOW_RUN_ID") == str(run.id)
    watch = not started_by_worker and threading.current_thread() is threading.main_thread()  # signals go there
    if not beat and not watch:
        yield
        return
    resource = {"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name,
                "prefect.version": prefect.__version__}  # fmt: skip
    related = [{"prefect.resource.id": f"prefect.flow.{run.flow_id}", "prefect.resource.role": "flow"}]
    logger = get_run_logger()
    stop = threading.Event()

    def cancelled(client: Any) -> bool:
        try:
            state = client.read_flow_run(run.id).state
        except Exception:  # the server may be restarting: ask again next time
            return False
        return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)

    def loop() -> None:
        next_beat = 0.0
        with get_client(sync_client=True) as client:
            while True:
                if beat and time.monotonic() >= next_beat:
                    emit_event(event="prefect.flow-run.heartbeat", resource=resource, related=related)
                    next_beat = time.monotonic() + HEARTBEAT_SECONDS
                if watch and cancelled(client):
                    logger.warning("flow run %s was cancelled: stopping its work", run.name)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                until_beat = max(0.0, next_beat - time.monotonic()) if beat else CANCEL_POLL_SECONDS
                if stop.wait(min(CANCEL_POLL_SECONDS, until_beat) if watch else until_beat):
                    return

    # the thread sees this one's Prefect settings (its API URL), as Prefect's own heartbeat thread does
    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def without_prefect_heartbeats() -> Iterator[None]:
    """Flows called inside send their heartbeats from `heartbeats()` alone (for a flow run in this process)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
