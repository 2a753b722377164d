"""`stagediff` command line: `generate` runs the Prefect flow, `batch` runs it over a prompts file, `resume`
finishes a run, `gc` cleans a store, `tiny-model` writes a tiny offline model.

Input is validated here before Prefect, torch or any model is imported, so bad input costs
nothing, writes nothing and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from artifacts import ArtifactError, Store, read_manifest
from stagediff.default_model import default_model_dir
from stagediff.request import GenerateRequest, RequestError, validate_request
from stagediff.runs import check_store, new_run_id, open_manifest

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def read_prompts_file(path: str) -> list[str]:
    """One prompt a line; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequestError("prompts_file", path, "must be an existing UTF-8 text file, one prompt a line") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise RequestError("prompts_file", path, "must be a UTF-8 text file, one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RequestError("prompts_file", path, "is empty: it must hold at least one prompt")
    return prompts


def expand_negative_prompts(negative_prompts: list[str] | None, prompts: list[str]) -> list[str] | None:
    """`--negative-prompt` given once applies to every prompt; otherwise it must be given once per prompt."""
    if negative_prompts is not None and len(negative_prompts) == 1:
        return negative_prompts * len(prompts)
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        allowed = f"give it once (for every prompt) or once per prompt ({len(prompts)}), not {len(negative_prompts)}"
        raise RequestError("negative_prompt", negative_prompts, allowed)
    return negative_prompts


def parse_pair(parameter: str, value: str | None) -> tuple[int, int] | None:
    """Parse "1024,1024" (or "1024x1024") into (1024, 1024)."""
    if value is None:
        return None
    parts = value.replace("x", ",").split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise RequestError(parameter, value, 'must be two integers such as "1024,1024"')
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagediff", description=__doc__.splitlines()[0])
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
    gen.add_argument("--steps", type=int, default=28)
    gen.add_argument("--guidance", type=float, default=3.5, help="CFG scale (FLUX.1-dev: its distilled guidance)")
    gen.add_argument("--true-cfg-scale", type=float, default=1.0, help="FLUX.1: > 1 runs true CFG with negatives")
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--seed", type=int, default=0, help="prompt i is seeded with SEED + i")
    gen.add_argument("--max-sequence-length", type=int, default=512)
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    gen.add_argument("--original-size", metavar="H,W", help="SDXL micro-conditioning (default: the image size)")
    gen.add_argument("--crop-top-left", metavar="TOP,LEFT", help="SDXL micro-conditioning (default: 0,0)")
    gen.add_argument("--target-size", metavar="H,W", help="SDXL micro-conditioning (default: the image size)")
    gen.add_argument("--tiled-decode", action="store_true", help="decode in VAE tiles (large images)")
    gen.add_argument("--sliced-decode", action="store_true", help="decode one image of a batch at a time")
    gen.add_argument("--max-memory", help='memory per device, e.g. "0=16GiB,1=16GiB,cpu=64GiB"')
    gen.add_argument("--offload-dir", help="folder for weights offloaded to disk")
    gen.add_argument("--out", default="outputs", help="output root (default: outputs)")
    gen.add_argument("--run-id", help="plain name of the run folder (default: a new timestamped name)")
    add_run_options(gen)

    batch = commands.add_parser("batch", help="an image for every item of a prompts file the store lacks")
    batch.add_argument("prompts_file", metavar="FILE", help=".txt (a prompt a line), .jsonl or .csv (see README)")
    batch.add_argument("--store", default="outputs/batch", help="the batch's folder, kept from run to run")
    batch.add_argument("--model", help="diffusers pipeline folder or Hub id (default: the embedded tiny Flux model)")
    batch.add_argument("--seed", type=int, default=0, help="an item without its own seed gets SEED + its position")
    batch.add_argument("--steps", type=int, default=28, help="of items without their own (likewise below)")
    batch.add_argument("--guidance", type=float, default=3.5)
    batch.add_argument("--height", type=int, default=1024)
    batch.add_argument("--width", type=int, default=1024)
    batch.add_argument("--max-sequence-length", type=int, default=512)
    batch.add_argument("--chunk-size", type=int, default=8, help="items per chunk: each model loads once a chunk")
    batch.add_argument("--batch-size", type=int, default=1)
    batch.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    batch.add_argument("--max-memory", help='memory per device, e.g. "0=16GiB,1=16GiB,cpu=64GiB"')
    batch.add_argument("--offload-dir", help="folder for weights offloaded to disk")
    batch.add_argument("--retries", type=int, default=0, help="retries of a failed stage")

    resume = commands.add_parser("resume", help="finish a run: compute only what its store lacks")
    resume.add_argument("run", metavar="OUT/RUN", help="the run folder (its manifest.json holds the request)")
    add_run_options(resume)

    clean = commands.add_parser("gc", help="remove the artifacts of a store that no kept run references")
    clean.add_argument("store", metavar="STORE", help="the store: a folder or fsspec URL")
    clean.add_argument("--older-than", default="7d", help="only artifacts at least this old: 7d, 12h, 30m, 0s")
    clean.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")

    tiny = commands.add_parser("tiny-model", help="write a tiny random pipeline of one family (offline)")
    tiny.add_argument("dir")
    tiny.add_argument("--family", default="flux", choices=["flux", "sd3", "sdxl", "sd15"])
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="artifact store shared by runs: a folder or fsspec URL (default: OUT/.store)")
    parser.add_argument("--strict", action="store_true", help="stop at a damaged artifact instead of recomputing it")
    parser.add_argument("--retries", type=int, default=0, help="retries of a failed stage")


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = args.prompts if args.prompts is not None else read_prompts_file(args.prompts_file)
    micro = dict(
        original_size=parse_pair("original_size", args.original_size),
        crops_coords_top_left=parse_pair("crop_top_left", args.crop_top_left) or (0, 0),
        target_size=parse_pair("target_size", args.target_size),
    )
    fields = dict(
        prompts=prompts, negative_prompts=expand_negative_prompts(args.negative_prompts, prompts), steps=args.steps,
        guidance=args.guidance, true_cfg_scale=args.true_cfg_scale, height=args.height, width=args.width,
        seed=args.seed, max_sequence_length=args.max_sequence_length, batch_size=args.batch_size, dtype=args.dtype,
        tiled_decode=args.tiled_decode, sliced_decode=args.sliced_decode, **micro,
        placement={"max_memory": args.max_memory, "offload_dir": args.offload_dir}, out=args.out,
        run_id=args.run_id or new_run_id(),
    )  # fmt: skip
    model = args.model or str(default_model_dir())
    request = validate_request(**fields, model=model, check_model=args.model is not None)
    return run_flow(request, args.model, args.store, args.strict, args.retries)


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    try:
        manifest = read_manifest(run_dir)
        fields = dict(manifest["request"])
        model = fields.pop("model")
    except (OSError, ValueError, KeyError, TypeError):
        raise RequestError(
            "run", args.run, "must be a run folder holding a manifest.json written by stagediff"
        ) from None
    model_arg = None if model == str(default_model_dir()) else model  # the default model is rebuilt if need be
    fields.update(out=str(run_dir.parent), run_id=run_dir.name)
    request = validate_request(**fields, model=model, check_model=model_arg is not None)
    return run_flow(request, model_arg, args.store or manifest.get("store"), args.strict, args.retries)


def run_flow(request: GenerateRequest, model: str | None, store: str | None, strict: bool, retries: int) -> int:
    """Run the generate flow for a checked request and print where its images are and what each stage did."""
    check_store(store, request.out)
    open_manifest(request)  # refuses a run id that holds a different run, before any work

    from stagediff.isolation import warm_up
    from stagediff.prefect_api import choose_api

    warm_up(request.model)  # the stage forkserver imports torch while Prefect starts
    choose_api()
    from flows.generate import generate

    manifest = generate(
        prompts=request.prompts, model=model, negative_prompts=request.negative_prompts, steps=request.steps,
        guidance=request.guidance, true_cfg_scale=request.true_cfg_scale, height=request.height, width=request.width,
        seed=request.seed, max_sequence_length=request.max_sequence_length, batch_size=request.batch_size,
        dtype=request.dtype, original_size=request.original_size,
        crops_coords_top_left=request.crops_coords_top_left, target_size=request.target_size,
        tiled_decode=request.tiled_decode, sliced_decode=request.sliced_decode,
        max_memory=request.placement.max_memory, offload_dir=request.placement.offload_dir, out=request.out,
        run_id=request.run_id, retries=retries, store=store, strict=strict,
    )  # fmt: skip
    run_dir = request.run_dir
    print(f"\n{len(manifest['items'])} images in {run_dir / 'images'}; manifest: {run_dir / 'manifest.json'}")
    print(f"store: {manifest['store']}")
    for stage, info in manifest["stages"].items():
        if info["skipped"]:
            print(f"  {stage:8s} no process: all {len(info['reused'])} items in the store")
            continue
        done = f"computed {len(info['computed'])}, reused {len(info['reused'])}"
        seconds, rss = info["seconds"], info["peak_rss_mb"]
        print(f"  {stage:8s} pid {info['pid']}  {seconds:7.2f} s  peak RSS {rss:7.0f} MB  {done}")
        print(f"           device map: {info.get('device_map')}")
        for warning in info.get("warnings", []):
            print(f"           warning: {warning}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """The batch flow over a prompts file; every line is checked here, before Prefect or torch is imported."""
    from stagediff.batch import BatchFileError, check_batch

    settings = dict(
        steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
        max_sequence_length=args.max_sequence_length, batch_size=args.batch_size, dtype=args.dtype,
    )  # fmt: skip
    placement = {"max_memory": args.max_memory, "offload_dir": args.offload_dir}
    try:
        _, items = check_batch(
            args.prompts_file, args.store, args.model, args.seed, args.chunk_size,
            check_model=True, placement=placement, **settings,
        )  # fmt: skip
    except BatchFileError as exc:
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from stagediff.prefect_api import choose_api

    choose_api()  # the flow starts the stage forkserver itself, once it knows there is something to compute
    from flows.batch import batch

    manifest = batch(
        prompts_file=args.prompts_file, store=args.store, model=args.model, seed=args.seed, chunk_size=args.chunk_size,
        retries=args.retries, **placement, **settings,
    )  # fmt: skip
    run = manifest["runs"][-1]
    done = sum(entry["status"] == "done" for entry in manifest["items"])
    print(f"\n{len(items)} items in {args.prompts_file}: {run['computed']} computed, {run['skipped']} done before")
    print(f"{done} images in {Path(args.store) / 'images'}; manifest: {Path(args.store) / 'batch.json'}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from stagediff.gc import collect_garbage, parse_age

    older_than = parse_age(args.older_than)
    location = check_store(args.store, ".")
    if Store(location).local and not (Path(location) / "objects").is_dir():
        raise RequestError("store", args.store, "must be an existing store (a folder holding objects/)")
    report = collect_garbage(Store(location), older_than, dry_run=args.dry_run)
    if args.dry_run:
        for name in report.removed:
            print(f"  would remove {name}")
    print(report.summary())
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from stagediff.tiny_model import build_tiny_family

    path = build_tiny_family(args.dir, args.family, seed=args.seed)
    print(json.dumps({"model": str(path), "family": args.family}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "generate": cmd_generate, "batch": cmd_batch, "resume": cmd_resume, "gc": cmd_gc, "tiny-model": cmd_tiny_model
    }  # fmt: skip
    try:
        return commands[args.command](args)
    except RequestError as exc:
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ArtifactError as exc:  # a damaged artifact under --strict
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


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
