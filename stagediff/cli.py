"""`stagediff` command line: `generate` runs the Prefect flow, `tiny-model` writes a tiny offline model.

Input is validated here before Prefect, torch or any model is imported, so bad input costs
nothing, writes nothing and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stagediff.default_model import default_model_dir
from stagediff.request import RequestError, validate_request
from stagediff.runs import new_run_id, open_manifest

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
    gen.add_argument("--retries", type=int, default=0, help="retries of a failed stage")

    tiny = commands.add_parser("tiny-model", help="write a tiny random pipeline of one family (offline)")
    tiny.add_argument("dir")
    tiny.add_argument("--family", default="flux", choices=["flux", "sd3", "sdxl", "sd15"])
    tiny.add_argument("--seed", type=int, default=0)
    return parser


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
    open_manifest(request)  # refuses a run id that holds a different run, before any work

    from stagediff.isolation import warm_up
    from stagediff.prefect_api import choose_api

    warm_up()  # the stage forkserver imports torch while Prefect starts
    choose_api()
    from flows.generate import generate

    manifest = generate(
        prompts=request.prompts, model=args.model, negative_prompts=request.negative_prompts, steps=request.steps,
        guidance=request.guidance, true_cfg_scale=request.true_cfg_scale, height=request.height, width=request.width,
        seed=request.seed, max_sequence_length=request.max_sequence_length, batch_size=request.batch_size,
        dtype=request.dtype, original_size=request.original_size,
        crops_coords_top_left=request.crops_coords_top_left, target_size=request.target_size,
        tiled_decode=request.tiled_decode, sliced_decode=request.sliced_decode,
        max_memory=request.placement.max_memory, offload_dir=request.placement.offload_dir, out=request.out,
        run_id=request.run_id, retries=args.retries,
    )  # fmt: skip
    run_dir = request.run_dir
    print(f"\n{len(manifest['items'])} images in {run_dir / 'images'}; manifest: {run_dir / 'manifest.json'}")
    for stage, info in manifest["stages"].items():
        seconds, rss = info.get("seconds", 0), info.get("peak_rss_mb", 0)
        print(f"  {stage:8s} pid {info.get('pid')}  {seconds:7.2f} s  peak RSS {rss:7.0f} MB")
        print(f"           device map: {info.get('device_map')}")
        for warning in info.get("warnings", []):
            print(f"           warning: {warning}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from stagediff.tiny_model import build_tiny_family

    path = build_tiny_family(args.dir, args.family, seed=args.seed)
    print(json.dumps({"model": str(path), "family": args.family}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_tiny_model(args)
    except RequestError as exc:
        print(f"stagediff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
