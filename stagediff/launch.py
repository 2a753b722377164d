"""The seeds' launchers, for users who already run them: every rank takes its share of the prompts.

    torchrun --standalone --nproc_per_node N -m stagediff.launch [stagediff generate's options]
    accelerate launch --num_processes N -m stagediff.launch [stagediff generate's options]

Each rank takes a contiguous share with accelerate's `split_between_processes` (no padded copies), runs
it as a replica (its own stage processes, on its own GPU, or with its share of the cores) into the same
store, and rank 0 gathers every rank's store keys by global item index (not `gather_object(...)[:n]`,
which scrambles the order when shares are padded: accelerate issue 3483) and writes the run folder
and its manifest. No Prefect here: the launcher is the orchestrator.
"""

from __future__ import annotations

import json
import os
import sys
import time

from stagediff.cli import EXIT_BAD_INPUT, build_parser, request_of, run_options_of
from stagediff.replica import run_replica
from stagediff.request import RequestError, check_store


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(["generate", *(sys.argv[1:] if argv is None else argv)])
    try:
        request = request_of(args)
        options = run_options_of(args)
        store_location = check_store(args.store, request.out)
    except RequestError as exc:
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from accelerate import PartialState
    from accelerate.utils import gather_object

    from stagediff.artifacts import Store
    from stagediff.default_model import ensure_default_model
    from stagediff.engine import build_engine
    from stagediff.replica import ReplicaJob, cpu_shares, default_torch_threads, split
    from stagediff.request import visible_gpus
    from stagediff.run_manifest import RunFolder, adopt_old_manifest, open_run, run_summary_base

    gpus = visible_gpus()
    state = PartialState(cpu=not gpus)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    if args.model is None:
        if state.is_local_main_process:
            ensure_default_model()
        state.wait_for_everyone()
        request = request.model_copy(update={"model": str(ensure_default_model())})
    try:  # every rank refuses a run id that holds another run, before computing anything
        previous = open_run(request)
    except RequestError as exc:
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    store = Store(store_location)
    from stagediff.flows.running import register_root, store_request

    # the request stored once (by rank 0), the run a root of gc, before any rank touches an artifact
    if state.is_main_process:
        source = store_request(request, store)
        engine = build_engine(request.model, request.placement, store_location, str(request.run_dir), options)
        register_root(store, request.run_dir / "manifest.json", engine, source, request=request)
    source = gather_object([source if state.is_main_process else None])[0]  # rank 0's, to every rank
    share = split(request.count, state.num_processes)[state.process_index]
    rank = state.process_index
    job = ReplicaJob(
        replica=rank, model=request.model, source=source, start=share.start, stop=share.stop, seed=request.seed,
        negative_prompts=request.negative_prompts, settings=request.settings, placement=request.placement,
        options=options, store=store_location,
        devices=gpus[state.local_process_index % len(gpus)] if gpus else None,
        # without GPUs: this machine's cores shared out by local rank, and the threads of a plain run (not the
        # launcher's OMP_NUM_THREADS=1), so the images are the plain pipeline's bit for bit
        cpus=None if gpus else cpu_shares(local_world)[state.local_process_index],
        threads=None if gpus else args.threads or default_torch_threads(),
        work_dir=str(request.run_dir / "replicas" / str(rank)), result=f"launch/{request.run_id}/{rank}.json",
    )  # fmt: skip
    started = time.time()
    empty = {"replica": rank, "items": [share.start, share.stop], "segments": 0, "stages": {}, "pid": os.getpid()}
    result = run_replica(job) if len(share) else empty
    result["seconds"] = round(time.time() - started, 3)
    results = gather_object([result])  # every rank's, in rank order
    if state.is_main_process:
        adopt_old_manifest(request.run_dir, previous)
        base = run_summary_base(request, source, store_location, engine)
        folder = RunFolder(request.run_dir, "run", "manifest.json", base)
        folder.start(None, store, request.count, launcher=True)
        for r in results:  # each rank's journal, in order, into the run's record
            prefix = f"launch/{request.run_id}/{r['replica']}"
            for seq in range(r["segments"]):
                name = f"{prefix}/{seq:08d}.json"
                folder.replay(json.loads(store.read(name)))
                store.remove(name)
        folder.extra.update(
            replica_stages={r["replica"]: r["stages"] for r in results},
            replicas=[{"replica": r["replica"], "pid": r["pid"], "devices": r.get("devices"), "cpus": r.get("cpus"),
                       "threads": r.get("threads"), "items": r["items"], "seconds": r["seconds"],
                       "status": "completed"} for r in results],
        )  # fmt: skip
        folder.finish("completed")
        print(f"{request.count} images over {state.num_processes} ranks in {request.run_dir / 'images'}")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
