"""`stagediff` command line: `generate` runs the Prefect flow, `batch` runs it over a prompts file, `resume`
finishes a run, `gc` cleans a store, `tiny-model` writes a tiny offline model.

Input is validated here before Prefect, torch or any model is imported, so bad input costs
nothing, writes nothing and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from stagediff.artifacts import ArtifactError, Store, read_manifest
from stagediff.default_model import default_model_dir
from stagediff.request import (
    MAX_SEED,
    GenerateRequest,
    Prompts,
    RequestError,
    RunOptions,
    check_new_folder,
    check_store,
    check_store_folder,
    check_writable,
    checked_prompts_file,
    new_run_id,
    validate_request,
)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def check_negative_prompts(negative_prompts: list[str] | None, count: int, from_file: bool) -> list[str] | None:
    """`--negative-prompt` given once applies to every prompt; otherwise it must be given once per prompt."""
    if negative_prompts is None or len(negative_prompts) == 1:
        return negative_prompts
    if from_file:
        raise RequestError("negative_prompt", negative_prompts, "with --prompts-file give it once (for every prompt)")
    if len(negative_prompts) != count:
        allowed = f"give it once (for every prompt) or once per prompt ({count}), not {len(negative_prompts)}"
        raise RequestError("negative_prompt", negative_prompts, allowed)
    return negative_prompts


def parse_pair(parameter: str, value: str | None) -> tuple[int, int] | None:
    """Parse "1024,1024" (or "1024x1024") into (1024, 1024)."""
    if value is None:
        return None
    parts = value.replace("x", ",").split(",")
    if len(parts) != 2 or not all(re.fullmatch(r"[0-9]+", part.strip()) for part in parts):  # ASCII digits only
        raise RequestError(parameter, value, 'must be two integers such as "1024,1024"')
    return int(parts[0]), int(parts[1])


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error, as every other refusal: the usage block is one `--help` away."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def integer(text: str) -> int:
    """An integer option's value: ASCII digits only (int() also takes "٤", "1_000" and spaces)."""
    if not re.fullmatch(r"-?[0-9]+", text):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be an integer in ASCII digits (0-9)")
    return int(text)


def number(text: str) -> float:
    """A number option's value: ASCII only (float() also takes "٤.٥")."""
    try:
        if text.isascii():
            return float(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a number in ASCII digits, such as 3.5")


THREADS_HELP = (
    "without GPUs: torch threads per replica, each on its share of the cores (default: torch's own count, as "
    "one process uses: the same images bit for bit; fewer can be faster but may change the last bit)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="stagediff", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images through the staged Prefect flow")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", help="a prompt (repeatable)")
    source.add_argument("--prompts-file", metavar="FILE", help="a UTF-8 text file, one prompt a line")
    gen.add_argument(
        "--negative-prompt",
        action="append",
        dest="negative_prompts",
        metavar="TEXT",
        help="a negative prompt: once for every prompt, or repeated once per prompt in order",
    )
    gen.add_argument(
        "--model",
        help="diffusers pipeline folder or Hub id: FLUX.1, SD3, SDXL or SD 1.5 (default: the embedded tiny Flux model)",
    )
    gen.add_argument("--seed", type=integer, default=0, help="prompt i is seeded with SEED + i")
    add_settings(gen)
    gen.add_argument("--true-cfg-scale", type=number, default=1.0, help="FLUX.1: > 1 runs true CFG with negatives")
    gen.add_argument("--original-size", metavar="H,W", help="SDXL micro-conditioning (default: the image size)")
    gen.add_argument("--crop-top-left", metavar="TOP,LEFT", help="SDXL micro-conditioning (default: 0,0)")
    gen.add_argument("--target-size", metavar="H,W", help="SDXL micro-conditioning (default: the image size)")
    add_placement(gen)
    gen.add_argument("--out", default="outputs", help="output root (default: outputs)")
    gen.add_argument("--run-id", help="plain name of the run folder (default: a new timestamped name)")
    gen.add_argument("--store", help="artifact store shared by runs: a folder or fsspec URL (default: OUT/.store)")
    add_run_options(gen)
    fan = gen.add_argument_group("fan-out (data-parallel replicas; see README)")
    fan.add_argument("--replicas", type=integer, help="replicas, each over a contiguous share of the prompts")
    fan.add_argument("--device-groups", metavar='"0,1;2,3"', help="one replica per group of GPU indexes")
    fan.add_argument("--pool", help="a work pool: each share runs as a flow run of its replica/POOL deployment")
    fan.add_argument("--threads", type=integer, help=THREADS_HELP)
    fan.add_argument(
        "--storage-options", metavar="JSON", help='fsspec options of a URL store, e.g. {"endpoint_url": ...}'
    )

    batch = commands.add_parser("batch", help="an image for every item of a prompts file the store lacks")
    batch.add_argument("prompts_file", metavar="FILE", help=".txt (a prompt a line), .jsonl or .csv (see README)")
    batch.add_argument("--store", default="outputs/batch", help="the batch's folder, kept from run to run")
    batch.add_argument("--model", help="diffusers pipeline folder or Hub id (default: the embedded tiny Flux model)")
    batch.add_argument("--seed", type=integer, default=0, help="an item without its own seed gets SEED + its position")
    add_settings(batch, " (of items without their own)")
    add_placement(batch)
    add_run_options(batch)
    fan = batch.add_argument_group("fan-out (data-parallel replicas on this machine; see README)")
    fan.add_argument("--replicas", type=integer, help="replicas, each over a contiguous share of the items to do")
    fan.add_argument("--device-groups", metavar='"0,1;2,3"', help="one replica per group of GPU indexes")
    fan.add_argument("--threads", type=integer, help=THREADS_HELP)

    resume = commands.add_parser("resume", help="finish a run: compute only what its store lacks")
    resume.add_argument("run", metavar="OUT/RUN", help="the run folder (its manifest.json holds the request)")
    resume.add_argument("--store", help="artifact store (default: the one the run used)")
    resume.add_argument(
        "--storage-options", metavar="JSON", help='fsspec options of a URL store, e.g. {"endpoint_url": ...}'
    )
    add_run_options(resume)

    items = commands.add_parser("items", help="every item of a run or batch folder, one JSON object a line")
    items.add_argument("folder", metavar="FOLDER", help="a run folder (OUT/RUN) or a batch folder (its --store)")
    items.add_argument("--status", choices=["done", "pending", "failed", "removed"], help="only items in this state")

    clean = commands.add_parser("gc", help="remove the artifacts of a store that no kept run references")
    clean.add_argument("store", metavar="STORE", help="the store: a folder or fsspec URL")
    clean.add_argument("--older-than", default="7d", help="only artifacts at least this old: 7d, 12h, 30m, 0s")
    clean.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    clean.add_argument(
        "--storage-options", metavar="JSON", help='fsspec options of a URL store, e.g. {"endpoint_url": ...}'
    )

    tiny = commands.add_parser("tiny-model", help="write a tiny random pipeline of one family (offline)")
    tiny.add_argument("dir")
    tiny.add_argument("--family", default="flux", choices=["flux", "sd3", "sdxl", "sd15"])
    tiny.add_argument("--seed", type=integer, default=0)
    return parser


MODEL_DEFAULT = "default: the model's pipeline default"


def add_settings(parser: argparse.ArgumentParser, whose: str = "") -> None:
    """ImageSettings' fields; an option left out takes the model family's pipeline default."""
    parser.add_argument("--steps", type=integer, help=f"denoising steps{whose} ({MODEL_DEFAULT})")
    parser.add_argument("--guidance", type=number, help=f"guidance scale, FLUX.1: distilled{whose} ({MODEL_DEFAULT})")
    parser.add_argument("--height", type=integer, help=f"pixels, a multiple of 16{whose} ({MODEL_DEFAULT})")
    parser.add_argument("--width", type=integer, help=f"pixels, a multiple of 16{whose} ({MODEL_DEFAULT})")
    parser.add_argument("--max-sequence-length", type=integer, help=f"T5 tokens, 1 to 512 ({MODEL_DEFAULT})")


def add_placement(parser: argparse.ArgumentParser) -> None:
    """Placement's fields."""
    parser.add_argument("--batch-size", type=integer, default=1, help="items per forward pass in every stage")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--max-memory", help='memory per device, e.g. "0=16GiB,1=16GiB,cpu=64GiB"')
    parser.add_argument("--offload-dir", help="folder for weights offloaded to disk")
    parser.add_argument("--tiled-decode", action="store_true", help="decode in VAE tiles (large images)")
    parser.add_argument("--sliced-decode", action="store_true", help="decode one image of a batch at a time")
    parser.add_argument("--variant", help="weights variant to load, e.g. fp16 (files *.fp16.safetensors)")
    parser.add_argument("--revision", help="with a Hub id: the branch, tag or commit to load (default: main)")
    parser.add_argument("--pipeline-stages", type=integer, default=1, help="split the denoiser into N parts, one "
                        "process (GPU) each, and stream micro-batches (--batch-size items) through them")  # fmt: skip
    parser.add_argument("--pipeline-split", help="blocks where parts 2..N start, comma-separated, e.g. "
                        "single_transformer_blocks.4 (default: equal estimated compute)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="compile the denoiser's repeated blocks (faster after "
                        "the first run; compiled code kept in the store; images differ in the last bits)")  # fmt: skip
    parser.add_argument("--cache", help="reuse the denoiser's block outputs across steps (Flux): first-block"
                        "[:THRESHOLD] (each item alone), taylorseer or magcache; approximate (own keys)")  # fmt: skip
    parser.add_argument("--quantize", help="quantize components as they load: int8 (torchao, weights and activations), "
                        "int8-weight, float8 (CUDA 8.9+) or nf4 (CUDA); approximate (own keys)")  # fmt: skip
    parser.add_argument("--quantize-components", help="comma-separated, e.g. transformer,text_encoder_2 (default: the "
                        "denoiser and the largest text encoder)")  # fmt: skip
    parser.add_argument("--group-offload", help="block or leaf: the denoiser in CPU memory, each group moved to the "
                        "GPU as it runs (a denoiser that does not fit; GPU only)")  # fmt: skip
    parser.add_argument("--offload-stream", action="store_true", help="with --group-offload: overlap transfers")
    parser.add_argument(
        "--micro-batch-size",
        type=integer,
        help="with --pipeline-stages: items per micro-batch "
        "(batches are cut into micro-batches that stream through the parts; default: a batch)",
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """RunOptions' fields."""
    parser.add_argument("--strict", action="store_true", help="stop at a damaged artifact instead of recomputing it")
    parser.add_argument("--retries", type=integer, default=0, help="retries of a failed stage (0 to 10)")
    parser.add_argument(
        "--no-metadata", action="store_true", help="PNGs without what made them (A1111 parameters, JSON)"
    )
    parser.add_argument("--chunk-size", type=integer, help="items per chunk; each stage loads its model once a chunk "
                        "(default: 64, then sized so that loading costs at most 3%% of a chunk)")  # fmt: skip


def settings_of(args: argparse.Namespace) -> dict:
    fields = {name: getattr(args, name) for name in ("steps", "guidance", "height", "width", "max_sequence_length")}
    return {name: value for name, value in fields.items() if value is not None}


def placement_of(args: argparse.Namespace) -> dict:
    names = ("batch_size", "dtype", "max_memory", "offload_dir", "tiled_decode", "sliced_decode", "variant", "revision",
             "pipeline_stages", "compile", "cache", "group_offload", "offload_stream", "quantize")  # fmt: skip
    fields = {name: getattr(args, name) for name in names}  # flags left out carry Placement's defaults
    for name in ("quantize_components", "pipeline_split"):  # comma-separated on the command line
        if getattr(args, name) is not None:
            fields[name] = [part.strip() for part in getattr(args, name).split(",")]
    if args.micro_batch_size is not None:
        fields["micro_batch_size"] = args.micro_batch_size
    return fields


def run_options_of(args: argparse.Namespace) -> RunOptions:
    from pydantic import ValidationError

    from stagediff.request import one_line

    try:
        return RunOptions(
            strict=args.strict, retries=args.retries, chunk_size=args.chunk_size, metadata=not args.no_metadata
        )
    except ValidationError as exc:
        raise one_line(exc) from None


def cmd_generate(args: argparse.Namespace) -> int:
    request = request_of(args)
    if any(getattr(args, name) is not None for name in ("replicas", "device_groups", "pool", "threads")):
        return run_fanout(request, args, run_options_of(args))
    storage_options = parse_json_object("storage_options", args.storage_options)
    return run_flow(request, args.model, args.store, run_options_of(args), storage_options)


def request_of(args: argparse.Namespace) -> GenerateRequest:
    """The checked request of `stagediff generate`'s options (also `stagediff.launch`'s)."""
    source = {"prompts": args.prompts} if args.prompts is not None else {
        "prompts_file": checked_prompts_file(args.prompts_file)}  # fmt: skip
    count = len(args.prompts) if args.prompts is not None else source["prompts_file"].count
    settings = settings_of(args) | dict(
        true_cfg_scale=args.true_cfg_scale,
        original_size=parse_pair("original_size", args.original_size),
        crops_coords_top_left=parse_pair("crop_top_left", args.crop_top_left) or (0, 0),
        target_size=parse_pair("target_size", args.target_size),
    )
    fields = dict(
        **source, negative_prompts=check_negative_prompts(args.negative_prompts, count, args.prompts is None),
        seed=args.seed,
        settings=settings, placement=placement_of(args), out=args.out, run_id=args.run_id or new_run_id(),
    )  # fmt: skip
    model = args.model or str(default_model_dir())
    request = validate_request(**fields, model=model, check_model=args.model is not None)
    if getattr(args, "pool", None) is None:  # a pool's replicas offload on their own machines
        check_offload_dir(request)
    return request


def check_offload_dir(request: GenerateRequest) -> None:
    """`--offload-dir` is, or can become, a folder this process may write into (the stages write it late)."""
    if request.placement.offload_dir is not None:
        check_writable("offload_dir", request.placement.offload_dir)


def cmd_resume(args: argparse.Namespace) -> int:
    from stagediff.record import is_old_format

    run_dir = Path(args.run)
    try:
        manifest = read_manifest(run_dir)
        fields = dict(manifest["request"])
        model = fields.pop("model")
    except (OSError, ValueError, KeyError, TypeError):
        raise RequestError(
            "run", args.run, "must be a run folder holding a manifest.json written by stagediff"
        ) from None
    storage_options = parse_json_object("storage_options", args.storage_options)
    store = args.store or manifest.get("store")
    model_arg = None if model == str(default_model_dir()) else model  # the default model is rebuilt if need be
    fields.update(out=str(run_dir.parent), run_id=run_dir.name)
    if not is_old_format(manifest) and "prompts_file" in fields:  # its prompts as the run stored them
        fields["prompts_file"] = recorded_prompts(args.run, fields["prompts_file"], manifest, store)
    request = validate_request(**fields, model=model, check_model=model_arg is not None)
    check_offload_dir(request)
    if model_arg is not None and manifest.get("model_hash"):
        from stagediff.keys import model_hash, model_identity

        found = model_hash(model_identity(request.model, request.placement.variant))
        if found != manifest["model_hash"]:
            allowed = (f"its model {request.model} is no longer the one the run used (fingerprint {found} != "
                       f"{manifest['model_hash']}): nothing was changed; start a new run for this model")  # fmt: skip
            raise RequestError("run", args.run, allowed)
    return run_flow(request, model_arg, store, run_options_of(args), storage_options)


def recorded_prompts(run: str, recorded: dict, manifest: dict, store: str | None) -> dict:
    """A resumed run's prompts file: the copy the run stored (requests/<sha256>.txt), or the original file if it
    is unchanged; RequestError if neither is there."""
    from stagediff.sources import snapshot_name

    candidates = []
    if store and "://" not in store:
        candidates.append(Path(store) / snapshot_name(recorded["sha256"], "txt"))
    candidates.append(Path(recorded["path"]))
    for path in candidates:
        if path.is_file():
            found = checked_prompts_file(str(path))
            if found.sha256 == recorded["sha256"]:
                return found.model_dump()
    allowed = f"its prompts file {recorded['path']} changed and the store holds no copy of it: start a new run"
    raise RequestError("run", run, allowed)


def run_flow(
    request: GenerateRequest,
    model: str | None,
    store: str | None,
    options: RunOptions,
    storage_options: dict | None = None,
) -> int:
    """Run the generate flow for a checked request and print where its images are and what each stage did."""
    from stagediff.run_manifest import open_run

    prompts = prompts_of(request)  # inline prompts too large for flow parameters are refused before any import
    check_store(store, request.out, storage_options)
    open_run(request)  # refuses a run id that holds a different run, before any work

    from stagediff.isolation import warm_up
    from stagediff.prefect_api import choose_api

    choose_api()  # an unreachable configured server is one line, before anything starts
    warm_up(
        request.model, request.placement.compile, spin=request.placement.spinning
    )  # the stage forkserver imports torch while Prefect starts
    from stagediff.flows.generate import generate
    from stagediff.flows.running import without_prefect_heartbeats
    from stagediff.request import Output

    output = Output(out=request.out, run_id=request.run_id, store=store)
    with progress_bars(), without_prefect_heartbeats(), tracebacks_in_the_ui_only():
        manifest = generate(prompts, request.settings, model, request.placement, output, options, storage_options)
    run_dir = request.run_dir
    counts = manifest["counts"]
    print(f"\n{counts['done']} images in {run_dir / 'images'} ({counts['computed_by_this_run']} computed); "
          f"manifest: {run_dir / 'manifest.json'}, every item: {run_dir / 'items.jsonl'}")  # fmt: skip
    print(f"store: {manifest['store']}")
    for stage, info in manifest["stages"].items():
        if info["skipped"]:
            print(f"  {stage:8s} no process: all {info['reused']} items in the store")
            continue
        done = f"computed {info['computed']}, reused {info['reused']}"
        seconds, rss, loads = info["seconds"], info["peak_rss_mb"], info["loads"]
        processes = info["process_count"]
        print(f"  {stage:8s} pid {info['pid']}  {seconds:7.2f} s  peak RSS {rss:7.0f} MB  {done}  loads {loads}"
              + (f"  ({processes} processes)" if processes > 1 else ""))  # fmt: skip
        pipeline = next((p["pipeline"] for p in info.get("processes", []) if "pipeline" in p), None)
        if pipeline:
            for part in pipeline["parts"]:
                blocks = f"{part['blocks'][0]} .. {part['blocks'][-1]}"
                print(f"           part {part['part']} on {part['device']}: {blocks}, busy {part['busy_fraction']:.0%}")
        else:
            print(f"           device map: {info.get('device_map')}")
        for warning in info.get("warnings", []):
            print(f"           warning: {warning}")
    return 0


def prompts_of(request: GenerateRequest) -> Prompts:
    """The flow's prompts: a prompts file travels by reference (its path), so any size reaches the flow."""
    from pydantic import ValidationError

    from stagediff.request import one_line

    source = {"prompts": request.prompts} if request.prompts is not None else {"file": request.prompts_file.path}
    try:
        return Prompts(**source, negative_prompts=request.negative_prompts, seed=request.seed)
    except ValidationError as exc:
        raise one_line(exc) from None


def run_fanout(request: GenerateRequest, args: argparse.Namespace, options: RunOptions) -> int:
    """The fan-out flow for a checked request: every fan-out option is checked first, nothing written."""
    from stagediff.replica import cpu_replicas, plan_replicas
    from stagediff.run_manifest import open_run

    groups = plan_replicas(args.replicas, args.device_groups, args.pool, args.store, args.threads)
    prompts = prompts_of(request)
    storage_options = parse_json_object("storage_options", args.storage_options)
    check_store(args.store, request.out, storage_options)
    open_run(request)

    from stagediff.isolation import warm_up
    from stagediff.prefect_api import choose_api

    choose_api()
    if args.pool is None:
        # local replicas fork from it, importing as Prefect starts
        warm_up(request.model, request.placement.compile, cpu_replicas(groups), request.placement.spinning)
    from stagediff.flows.fanout import fanout
    from stagediff.flows.running import without_prefect_heartbeats
    from stagediff.request import Output

    output = Output(out=request.out, run_id=request.run_id, store=args.store)
    device_groups = [g["devices"] for g in groups] if args.device_groups is not None else None
    with without_prefect_heartbeats(), tracebacks_in_the_ui_only():
        manifest = fanout(prompts, request.settings, args.model, request.placement, output, options,
                          replicas=None if device_groups else len(groups), device_groups=device_groups,
                          pool=args.pool, threads=args.threads, storage_options=storage_options)  # fmt: skip
    run_dir = request.run_dir
    print(f"\n{manifest['counts']['done']} images in {run_dir / 'images'}; manifest: {run_dir / 'manifest.json'}")
    for replica in manifest["replicas"]:
        where = replica.get("flow_run_id") or f"pid {replica.get('pid')}"
        seen = replica.get("seen") or {}
        on = f"devices {replica['devices']}" if replica["devices"] else f"cpus {seen.get('cpus', replica['cpus'])}"
        threads = seen.get("torch_threads", replica["threads"])
        start, stop = replica["items"]
        print(f"  replica {replica['replica']}  {replica['status']:9s} {stop - start:4d} items  {where}"
              f"  {on}  torch threads {threads}")  # fmt: skip
    return 0


def parse_json_object(parameter: str, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise RequestError(parameter, value, 'must be a JSON object, e.g. {"endpoint_url": "http://127.0.0.1:9000"}')
    return parsed


def cmd_batch(args: argparse.Namespace) -> int:
    """The batch flow over a prompts file; every line is checked here, before Prefect or torch is imported."""
    from stagediff.batch import BatchFileError, check_batch

    fields = dict(prompts=["-"], run_id="batch", seed=args.seed, settings=settings_of(args),
                  placement=placement_of(args))  # fmt: skip
    request = validate_request(
        **fields, model=args.model or str(default_model_dir()), check_model=args.model is not None
    )
    check_offload_dir(request)
    options = run_options_of(args)
    device_groups, groups = None, None
    if any(getattr(args, name) is not None for name in ("replicas", "device_groups", "threads")):
        from stagediff.replica import plan_replicas

        groups = plan_replicas(args.replicas, args.device_groups, None, None, args.threads)
        device_groups = [group["devices"] for group in groups] if args.device_groups is not None else None
    from stagediff.isolation import stop_warm_up, warm_up
    from stagediff.replica import cpu_replicas

    # the stage forkserver imports torch while every line is checked and Prefect starts
    warm_up(request.model, request.placement.compile, cpu_replicas(groups), request.placement.spinning)
    try:
        count = check_batch(args.prompts_file, args.store, args.seed)
    except BatchFileError as exc:
        stop_warm_up()
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    check_writable("store", args.store)
    check_store_folder(Path(args.store) / ".store")  # the artifacts of the batch folder
    from stagediff.prefect_api import choose_api

    choose_api()
    from stagediff.flows.batch import batch
    from stagediff.flows.running import without_prefect_heartbeats

    with progress_bars(), without_prefect_heartbeats(), tracebacks_in_the_ui_only():
        summary = batch(args.prompts_file, args.store, request.settings, args.model, args.seed, request.placement,
                        options, args.replicas, device_groups, args.threads)  # fmt: skip
    counts, store = summary["counts"], Path(args.store)
    computed = counts["computed_by_this_run"]
    print(f"\n{count} items in {args.prompts_file}: {computed} computed, {counts['done'] - computed} done before")
    print(f"{counts['done']} images in {store / 'images'}; summary: {store / 'batch.json'}, every item: "
          f"{store / 'items.jsonl'}")  # fmt: skip
    return 0


@contextlib.contextmanager
def tracebacks_in_the_ui_only() -> Iterator[None]:
    """A failed flow or task run logs its traceback: the Prefect UI keeps it, the terminal shows the error's line
    and the command ends with one line of its own (STAGEDIFF_DEBUG=1: the tracebacks everywhere)."""

    def line_only(record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            record.exc_info = record.exc_text = None  # the run's API handler, which runs first, has sent it
        return True

    handlers = [] if os.environ.get("STAGEDIFF_DEBUG") else logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(line_only)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(line_only)


def progress_bars():
    """Live progress of the run in this process: a bar per stage on a terminal, plain lines otherwise."""
    from stagediff.progress_view import progress_view

    return progress_view(sys.stderr)


def cmd_gc(args: argparse.Namespace) -> int:
    from stagediff.collect import collect_garbage, parse_age

    older_than = parse_age(args.older_than)
    storage_options = parse_json_object("storage_options", args.storage_options)
    location = check_store(args.store, ".", storage_options)
    if Store(location).local and not (Path(location) / "objects").is_dir():
        raise RequestError("store", args.store, "must be an existing store (a folder holding objects/)")
    report = collect_garbage(Store(location, storage_options), older_than, dry_run=args.dry_run)
    if args.dry_run:
        for name in report.removed:
            print(f"  would remove {name}")
    print(report.summary())
    return 0


def cmd_items(args: argparse.Namespace) -> int:
    """Stream a folder's items from its record (also while its run goes on)."""
    from stagediff.record import Record

    folder = Path(args.folder)
    found = [(folder / name, layout) for name, layout in (("record.db", "run"), ("batch.db", "batch"))]
    found = [(path, layout) for path, layout in found if path.is_file()]
    if not found:
        allowed = "must be a run folder or a batch folder holding a record.db or batch.db written by stagediff"
        raise RequestError("folder", args.folder, allowed)
    record = Record(*found[0])
    try:
        where, arguments = ("WHERE status = ?", (args.status,)) if args.status else ("", ())
        for entry in record.items(where, arguments):
            sys.stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")
    except BrokenPipeError:  # `stagediff items ... | head`
        pass
    finally:
        record.close()
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    check_new_folder("dir", args.dir)
    if not 0 <= args.seed <= MAX_SEED:
        raise RequestError("seed", args.seed, f"must be an integer from 0 to {MAX_SEED}")
    from stagediff.tiny_model import build_tiny_family

    path = build_tiny_family(args.dir, args.family, seed=args.seed)
    print(json.dumps({"model": str(path), "family": args.family}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "generate": cmd_generate, "batch": cmd_batch, "resume": cmd_resume, "gc": cmd_gc, "items": cmd_items,
        "tiny-model": cmd_tiny_model,
    }  # fmt: skip
    try:
        return commands[args.command](args)
    except RequestError as exc:
        stop_stage_processes()
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ArtifactError as exc:  # a damaged artifact under --strict
        stop_stage_processes()
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if os.environ.get("STAGEDIFF_DEBUG"):
            raise
        stop_stage_processes()
        if (where := disk_full(exc)) is not None:
            print(f"stagediff: error: no space left on device writing {where}: free some space and run the same "
                  "command again (everything stored so far is kept and reused)", file=sys.stderr)  # fmt: skip
        else:
            line = " ".join(str(exc).split()) or "(no message)"
            print(f"stagediff: error: {type(exc).__name__}: {line} (everything stored so far is kept: the same "
                  "command computes only what is missing; STAGEDIFF_DEBUG=1 shows the traceback)",
                  file=sys.stderr)  # fmt: skip
        return EXIT_FAILED


def stop_stage_processes() -> None:
    """Before a one-line error: the stage forkserver a flow started is stopped and Prefect's event and log
    workers drained, so nothing prints after the error."""
    if "stagediff.isolation" in sys.modules:
        from stagediff.isolation import stop_warm_up

        stop_warm_up()
    for module, name in (("prefect.events.worker", "EventsWorker"), ("prefect.logging.handlers", "APILogWorker")):
        if module in sys.modules:
            with contextlib.suppress(Exception):
                getattr(sys.modules[module], name).drain_all(timeout=10)


def disk_full(exc: BaseException) -> str | None:
    """The file being written when the disk filled up, if that is what `exc` (or its cause) is; a stage's error
    arrives as text: "OSError: [Errno 28] No space left on device: '/path'"."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return str(exc.filename or "a file")
        if found := re.search(r"\[Errno 28\] [^:]*: '([^']*)'", str(exc)):
            return found.group(1)
        exc = exc.__cause__ or exc.__context__
    return None


def run() -> None:
    """The `stagediff` command: `main`, then exit without the interpreter's last garbage collection.

    With Prefect imported that collection walks hundreds of thousands of objects the OS is about to
    free anyway (~0.5 s of every run here); `gc.freeze()` skips it. Prefect's log and event drains,
    atexit handlers and finalizers still run. Not in `main`: in a long-lived caller (tests) the
    frozen objects would never be collected.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
