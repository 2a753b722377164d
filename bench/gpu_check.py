"""The GPU check, ready for the day a device is lent: one command, under 8 minutes on one H200.

    python -m bench.gpu_check            # on a CUDA machine: writes bench/results/gpu.json
    python -m bench.gpu_check --dry-run  # anywhere: the same steps on the CPU and the tiny model (gpu-dryrun.json)

1. The `gpu` tests (tests/test_placement_gpu.py: balanced text encoders, the CPU fallback, a denoiser over
   GPU, CPU and disk).
2. On the mid-sized model in bfloat16 (dry run: the tiny model in float32): each stage's peak memory in its
   own process (`torch.cuda.max_memory_allocated`; peak RSS on the CPU), and images per second of the three
   stage processes against plain diffusers in one process, alternating, medians.
3. The stage forkserver never initialised CUDA.
4. The speed levers together (float8 denoiser + `--compile` + first-block cache; dry run: compile and the
   cache, no float8 on the CPU), after one run that compiles (not counted): images per second against plain
   diffusers in bfloat16 and against the same recipe written by hand with diffusers.

Needs torch, diffusers, transformers, accelerate, safetensors, pydantic and pytest (not Prefect):
`bash bench/gpu_wheels.sh` downloads the wheels a bare machine lacks, for the device's Python.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import median, print_table, write_json

PROMPTS = [f"a lighthouse number {i}, photo" for i in range(8)]


def stages_once(
    model: str, work: Path, dtype: str, size: int, steps: int, **levers: Any
) -> tuple[float, dict[str, dict]]:
    """encode -> denoise -> decode of PROMPTS, each stage in its own process; wall seconds and per-stage stats.
    `levers`: StageContext's speed levers (compile, cache, quantize and quantized)."""
    from stagediff.isolation import run_stage_process
    from stagediff.jobs import (
        DecodeItem,
        DecodeJob,
        DenoiseItem,
        DenoiseJob,
        DenoiseSettings,
        EncodeItem,
        EncodeJob,
        StageContext,
    )

    ctx = StageContext(model, str(work), str(work / "store"), dtype, batch_size=len(PROMPTS), **levers)
    settings = DenoiseSettings(steps=steps, guidance=3.5, height=size, width=size, max_sequence_length=128)
    n = range(len(PROMPTS))
    t0 = time.perf_counter()
    enc = run_stage_process("encode", EncodeJob(ctx, [EncodeItem(i, PROMPTS[i], None, 128, f"{i:064x}") for i in n]))
    refs = {r.index: r for r in enc.items}
    den = run_stage_process(
        "denoise", DenoiseJob(ctx, [DenoiseItem(i, refs[i], i, settings, f"{i + 100:064x}") for i in n])
    )
    refs = {r.index: r for r in den.items}
    dec = run_stage_process(
        "decode", DecodeJob(ctx, [DecodeItem(i, refs[i], size, size, f"{i + 200:064x}") for i in n])
    )
    seconds = time.perf_counter() - t0
    return seconds, {name: r.process for name, r in (("encode", enc), ("denoise", den), ("decode", dec))}


DIFFUSERS = """
import sys, time, torch
from diffusers import DiffusionPipeline
model, dtype, size, steps, n = sys.argv[1], getattr(torch, sys.argv[2]), *map(int, sys.argv[3:6])
device = "cuda" if torch.cuda.is_available() else "cpu"
t0 = time.perf_counter()
recipe = sys.argv[6] if len(sys.argv) > 6 else ""
kwargs = {}
if "float8" in recipe:
    import diffusers
    from diffusers import PipelineQuantizationConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
    config = {"transformer": diffusers.TorchAoConfig(Float8DynamicActivationFloat8WeightConfig())}
    kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=config)
pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True, **kwargs).to(device)
if "first-block" in recipe:
    from diffusers import FirstBlockCacheConfig
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.08))
if "compile" in recipe:
    pipe.transformer.compile_repeated_blocks(fullgraph="first-block" not in recipe)
pipe.set_progress_bar_config(disable=True)
prompts = [f"a lighthouse number {i}, photo" for i in range(n)]
generators = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
pipe(prompts, generator=generators, num_inference_steps=steps, height=size, width=size, max_sequence_length=128)
print(time.perf_counter() - t0)
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with the tiny model (checks the script)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the script on the CPU")
    from bench.models import mid_flux
    from stagediff.default_model import ensure_default_model
    from stagediff.isolation import run_isolated

    model = str(ensure_default_model() if args.dry_run else mid_flux())
    dtype, size, steps = ("float32", 64, 2) if args.dry_run else ("bfloat16", 1024, 28)
    report: dict = {"dry_run": args.dry_run, "model": model, "dtype": dtype, "size": size, "steps": steps}

    # 1. The gpu tests (they skip without CUDA)
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_placement_gpu.py"],
                           capture_output=True, text=True)  # fmt: skip
    report["gpu_tests"] = {"exit": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1:],
                           "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip

    # 2. Per-stage peak memory and images per second, against plain diffusers, alternating
    runs: dict[str, list[float]] = {"stagediff": [], "diffusers": []}
    peaks: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="stagediff-gpu-") as tmp:
        for r in range(args.repeats):
            seconds, stats = stages_once(model, Path(tmp) / str(r), dtype, size, steps)
            runs["stagediff"].append(round(seconds, 3))
            for stage, s in stats.items():
                peaks.setdefault(stage, []).append(s["cuda_max_memory_allocated_mb"] or s["peak_rss_mb"])
            out = subprocess.run([sys.executable, "-c", DIFFUSERS, model, dtype, str(size), str(steps),
                                  str(len(PROMPTS))], capture_output=True, text=True, check=True)  # fmt: skip
            runs["diffusers"].append(round(float(out.stdout.strip().splitlines()[-1]), 3))
    s, d = median(runs["stagediff"]), median(runs["diffusers"])
    report["images_per_second"] = {"stagediff": round(len(PROMPTS) / s, 4), "diffusers": round(len(PROMPTS) / d, 4),
                                   "ratio": round(d / s, 3), "runs": runs}  # fmt: skip
    report["stage_peak_mb"] = {stage: max(values) for stage, values in peaks.items()}
    report["peak_kind"] = "cuda_max_memory_allocated" if not args.dry_run else "peak RSS (no CUDA)"

    # 4. The levers together, stagediff and the same recipe by hand, each run once first (compiling)
    recipe = "compile+first-block" + ("" if args.dry_run else "+float8")
    levers: dict[str, Any] = {"compile": True, "cache": "first-block:0.08"}
    if not args.dry_run:
        levers.update(quantize="float8", quantized=("transformer",))
    fast: dict[str, list[float]] = {"stagediff": [], "by hand": []}
    with tempfile.TemporaryDirectory(prefix="stagediff-gpu-levers-") as tmp:
        for r in range(args.repeats + 1):
            seconds, _ = stages_once(model, Path(tmp) / f"s{r}", dtype, size, steps, **levers)
            out = subprocess.run([sys.executable, "-c", DIFFUSERS, model, dtype, str(size), str(steps),
                                  str(len(PROMPTS)), recipe], capture_output=True, text=True, check=True)  # fmt: skip
            if r:  # the first run compiles: not counted
                fast["stagediff"].append(round(seconds, 3))
                fast["by hand"].append(round(float(out.stdout.strip().splitlines()[-1]), 3))
    f, h = median(fast["stagediff"]), median(fast["by hand"])
    report["levers"] = {"recipe": recipe, "images_per_second": round(len(PROMPTS) / f, 4),
                        "vs_diffusers_bfloat16": round(d / f, 3), "vs_same_recipe_by_hand": round(h / f, 3),
                        "runs": fast}  # fmt: skip

    # 3. The forkserver never initialised CUDA (a stage forked from it could not use the GPU otherwise)
    report["forkserver_cuda_initialised"] = run_isolated("torch.cuda:is_initialized", name="cuda")[0]

    rows = [[stage, mb] for stage, mb in report["stage_peak_mb"].items()]
    print_table(f"Stage peak memory (MB, {report['peak_kind']})", ["stage", "MB"], rows)
    print(f"\nimages/s: stagediff {report['images_per_second']['stagediff']}, diffusers "
          f"{report['images_per_second']['diffusers']} (ratio {report['images_per_second']['ratio']})")  # fmt: skip
    print(f"levers ({recipe}): {report['levers']['images_per_second']} images/s, "
          f"{report['levers']['vs_diffusers_bfloat16']}x plain diffusers, "
          f"{report['levers']['vs_same_recipe_by_hand']}x the recipe by hand")  # fmt: skip
    print(f"gpu tests: {report['gpu_tests']['summary']}; forkserver CUDA initialised: "
          f"{report['forkserver_cuda_initialised']}")  # fmt: skip
    write_json(args.json, "gpu-dryrun" if args.dry_run else "gpu", report)
    ok = tests.returncode in (0, 5) and report["forkserver_cuda_initialised"] is False
    return report if ok else sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
