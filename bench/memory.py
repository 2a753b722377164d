"""Peak memory of every process, three ways, on the mid-sized model (bench/models.py):

1. `all-loaded`: one process of plain diffusers with the whole pipeline loaded.
2. `seed-recipe`: diffusers' low-memory recipe in one process: text encoders only, encode,
   `del` + `gc.collect()`; transformer only, denoise, `del` + `gc`; VAE only, decode.
3. `stagediff`: `stagediff generate`: each stage in its own process.

Each way runs as a fresh command; peak RSS comes from the kernel (VmHWM, reset between the
recipe's stages through /proc/self/clear_refs). On CUDA, torch.cuda.max_memory_allocated too.

    python -m bench.memory [--repeats 3] [--steps 2] [--size 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import median, prefect_api, print_table, write_json
from bench.models import component_sizes, mid_flux
from stagediff.isolation import peak_rss_mb

PROMPTS = ["a red fox in a forest, photo", "a city at night"]


def _peak_mb(reset: bool = False) -> float:
    """This process's peak RSS so far in MB; `reset` starts a new peak (Linux)."""
    peak = peak_rss_mb()
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return round(peak, 1)


def _cuda_peak_mb(torch, reset: bool = False) -> float | None:
    if not torch.cuda.is_available():
        return None
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def child(way: str, model: str, steps: int, size: int, out: str) -> dict:
    """Run one diffusers way in this (fresh) process; return its per-stage peaks."""
    import torch
    from diffusers import DiffusionPipeline, FluxPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    call = dict(num_inference_steps=steps, height=size, width=size, max_sequence_length=128, guidance_scale=3.5)
    _peak_mb(reset=True)
    if way == "all-loaded":
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True).to(device)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(PROMPTS, generator=generators, **call).images
        peaks = {"process": {"rss_mb": _peak_mb(), "cuda_mb": _cuda_peak_mb(torch)}}
    else:  # the seed recipe: one component at a time, del + gc between
        peaks = {}
        pipe = FluxPipeline.from_pretrained(model, transformer=None, vae=None, dtype=dtype, use_safetensors=True)
        pipe.to(device)
        with torch.inference_mode():
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=128)
        del pipe
        gc.collect()
        peaks["encode"] = {"rss_mb": _peak_mb(reset=True), "cuda_mb": _cuda_peak_mb(torch, reset=True)}
        pipe = FluxPipeline.from_pretrained(
            model, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, dtype=dtype
        ).to(device)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=generators, output_type="latent", **call
        ).images
        vae = pipe.vae
        vae_scale_factor = pipe.vae_scale_factor
        processor = pipe.image_processor
        del pipe.transformer, pipe
        gc.collect()
        peaks["denoise"] = {"rss_mb": _peak_mb(reset=True), "cuda_mb": _cuda_peak_mb(torch, reset=True)}
        with torch.inference_mode():
            latents = FluxPipeline._unpack_latents(latents, size, size, vae_scale_factor)
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
            images = processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")
        peaks["decode"] = {"rss_mb": _peak_mb(), "cuda_mb": _cuda_peak_mb(torch)}
        peaks["process"] = {"rss_mb": max(p["rss_mb"] for p in peaks.values()), "cuda_mb": None}
    for i, image in enumerate(images):
        image.save(Path(out) / f"{i:05d}.png")
    return peaks


def run_diffusers(way: str, model: Path, steps: int, size: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.memory", "--child", way, "--model", str(model)]
    cmd += ["--steps", str(steps), "--size", str(size), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_stagediff(model: Path, steps: int, size: int, out: Path, api_url: str) -> dict:
    """The CLI in a fresh process; its own peak and the largest of its descendants' peaks."""
    code = (
        "import json, sys; from multiprocessing import forkserver; from stagediff.cli import main; "
        "from stagediff.isolation import peak_rss_mb; "
        "rc = main(sys.argv[1:]); pid = forkserver._forkserver._forkserver_pid; "
        "hwm = [l for l in open(f'/proc/{pid}/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(json.dumps({'rc': rc, 'self': peak_rss_mb(), "
        "'forkserver': int(hwm) / 1024}))"
    )
    args = ["generate", "--model", str(model), "--steps", str(steps), "--height", str(size), "--width", str(size)]
    args += ["--max-sequence-length", "128", "--seed", "0", "--out", str(out), "--run-id", "run"]
    args += [arg for p in PROMPTS for arg in ("--prompt", p)]
    env = {**os.environ, "PREFECT_API_URL": api_url}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    totals = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    peaks = {
        stage: {"rss_mb": info["peak_rss_mb"], "cuda_mb": info.get("cuda_max_memory_allocated_mb")}
        for stage, info in manifest["stages"].items()
    }
    peaks["flow process"] = {"rss_mb": round(totals["self"], 1), "cuda_mb": None}
    peaks["forkserver"] = {"rss_mb": round(totals["forkserver"], 1), "cuda_mb": None}
    largest = max(p["rss_mb"] for p in peaks.values())
    peaks["largest process"] = {"rss_mb": largest, "cuda_mb": None}
    return peaks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json")
    parser.add_argument("--api-url")
    parser.add_argument("--child", choices=["all-loaded", "seed-recipe"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.size, args.out)))
        return {}

    model = mid_flux()
    runs: dict[str, list[dict]] = {"all-loaded": [], "seed-recipe": [], "stagediff": []}
    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp, prefect_api(args.api_url) as api_url:
        for r in range(args.repeats):
            for way in ("all-loaded", "seed-recipe"):
                runs[way].append(run_diffusers(way, model, args.steps, args.size, Path(tmp) / f"{way}-{r}"))
            runs["stagediff"].append(run_stagediff(model, args.steps, args.size, Path(tmp) / f"sd-{r}", api_url))

    def med(way: str, key: str, field: str = "rss_mb") -> float:
        return median([run[key][field] for run in runs[way] if run[key][field] is not None])

    rows = [["all-loaded diffusers", "process", med("all-loaded", "process")]]
    rows += [["seed recipe (1 process)", s, med("seed-recipe", s)] for s in ("encode", "denoise", "decode", "process")]
    keys = ("encode", "denoise", "decode", "flow process", "forkserver", "largest process")
    rows += [["stagediff", s, med("stagediff", s)] for s in keys]
    print(f"model: {model} {component_sizes(model)} MB; {args.size}x{args.size}, {args.steps} steps, 2 prompts")
    header = ["way", "process / stage", "peak RSS MB"]
    if any(run["process"]["cuda_mb"] is not None for run in runs["all-loaded"]):  # on CUDA: device peaks too
        ways = ["all-loaded"] + ["seed-recipe"] * 4 + ["stagediff"] * len(keys)
        for row, way in zip(rows, ways, strict=True):
            row.append(med(way, row[1], "cuda_mb") if row[1] in runs[way][0] else "")
        header.append("cuda max allocated MB")
    print_table(f"Peak RSS (MB), median of {args.repeats}", header, rows)
    largest_stage = max(med("stagediff", s) for s in ("encode", "denoise", "decode"))
    ratios = {
        "largest_process_over_largest_stage": round(med("stagediff", "largest process") / largest_stage, 3),
        "largest_process_over_all_loaded": round(med("stagediff", "largest process") / med("all-loaded", "process"), 3),
        "largest_process_over_seed_recipe": round(
            med("stagediff", "largest process") / med("seed-recipe", "process"), 3
        ),
    }
    print_table("Ratios", ["ratio", "value"], [[k, v] for k, v in ratios.items()])
    payload = {"model_mb": component_sizes(model), "steps": args.steps, "size": args.size, "runs": runs, **ratios}
    return write_json(args.json, "memory", payload) and payload


if __name__ == "__main__":
    main()
