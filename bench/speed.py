"""Speed levers on the mid-sized model (bench/models.py), fresh commands side by side: plain diffusers at its
defaults (float32, eager), plain diffusers with each lever applied by hand, `stagediff generate` exact and
with each lever; the quality cost of each lever (pixel differences from the exact images, PSNR); for
`--compile`, the compile time of a first run (nothing compiled anywhere), of a second run on the same store
(this machine's compiled folder removed: the code comes from the store) and of 2 replicas doing the same.

    python -m bench.speed [--levers compile int8 ...] [--n 32] [--steps 4] [--size 128] [--batch-size 8]
                          [--repeats 1] [--json PATH]

Images per second count the whole fresh command (load, compile or load the compiled code, run). Every
compiled way has been run once before it is timed (not counted), as in production: stagediff's compiled
code is then in its store and on the machine, the by-hand way's in its own inductor cache folder.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import median, prefect_api, print_table, write_json
from bench.models import mid_flux
from bench.throughput import DIFFUSERS_SCRIPT, prompts

# stagediff's options for each lever, and the same lever applied by hand to a plain diffusers pipeline
LEVERS = {
    "compile": ["--compile"],
    "first-block": ["--cache", "first-block"],
    "taylorseer": ["--cache", "taylorseer"],
    "magcache": ["--cache", "magcache"],
    "magcache+compile": ["--cache", "magcache", "--compile"],
    "int8-weight": ["--quantize", "int8-weight"],
    "int8": ["--quantize", "int8"],
    "int8+compile": ["--quantize", "int8", "--compile"],
    "int8+compile+taylorseer": ["--quantize", "int8", "--compile", "--cache", "taylorseer"],
    "bf16": ["--dtype", "bfloat16"],
    "bf16+compile": ["--dtype", "bfloat16", "--compile"],
}

SETUP = """
import diffusers, transformers
from diffusers import PipelineQuantizationConfig
lever, prompts = sys.argv[8].split("+") if sys.argv[8] else [], sys.argv[9:]
kwargs = {"dtype": torch.bfloat16} if "bf16" in lever else {}
for mode in {"int8", "int8-weight"} & set(lever):
    from torchao import quantization as ao
    config = {"int8": ao.Int8DynamicActivationInt8WeightConfig, "int8-weight": ao.Int8WeightOnlyConfig}[mode]
    mapping = {"transformer": diffusers.TorchAoConfig(config()), "text_encoder_2": transformers.TorchAoConfig(config())}
    kwargs.update(quantization_config=PipelineQuantizationConfig(quant_mapping=mapping), dtype=torch.float32)
pipe = DiffusionPipeline.from_pretrained(model, use_safetensors=True, **kwargs)
if "first-block" in lever:
    pipe.transformer.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.05))
if "taylorseer" in lever:
    pipe.transformer.enable_cache(diffusers.TaylorSeerCacheConfig())
if "magcache" in lever:
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
    pipe.transformer.enable_cache(diffusers.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps))
if "compile" in lever:
    cached = {"first-block", "taylorseer", "magcache"} & set(lever)  # a cache's skip decisions break the graph
    pipe.transformer.compile_repeated_blocks(fullgraph=not cached)
"""
# the throughput benchmark's plain diffusers loop, each lever applied by hand before it
BY_HAND = DIFFUSERS_SCRIPT.replace("prompts = sys.argv[8:]\n", "").replace(
    "pipe = DiffusionPipeline.from_pretrained(model, use_safetensors=True)\n", SETUP
)
assert BY_HAND.count("lever") > 1 and "sys.argv[8:]" not in BY_HAND
COMPILED = re.compile(r"code (\w+) \(key \w+…\); first batch of each shape: \[([0-9., ]*)\] s; compiling: (\S+) s")


def folder(lever: str) -> str:
    """A lever as a run id and folder name ("int8+compile" -> "int8_compile")."""
    return lever.replace("+", "_")


def run(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds and output of a command, which must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])}... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return round(seconds, 3), proc.stdout + proc.stderr


def compile_seconds(output: str) -> list[tuple[str, float, float | None]]:
    """Each denoise process's (where its code came from, first batch of each shape in seconds, compiling or
    loading the code in seconds: those first batches less later batches of the same work; None without one)."""
    return [(m.group(1), sum(float(x) for x in m.group(2).split(",") if x.strip()),
             None if m.group(3) == "?" else float(m.group(3))) for m in COMPILED.finditer(output)]  # fmt: skip


def quality(images: Path, exact: Path) -> dict[str, float]:
    """Max and mean absolute pixel difference (0-255) and PSNR (dB) of a run's images from the exact ones."""
    from PIL import Image

    diffs = []
    for path in sorted(exact.glob("*.png")):
        a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        b = np.asarray(Image.open(images / path.name).convert("RGB"), dtype=np.float64)
        diffs.append(a - b)
    d = np.stack(diffs)
    mse = float((d**2).mean())
    return {"max_abs": float(np.abs(d).max()), "mean_abs": round(float(np.abs(d).mean()), 4),
            "psnr_db": math.inf if mse == 0 else round(10 * math.log10(255**2 / mse), 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile-times", action=argparse.BooleanOptionalAction, default=True,
                        help="the compile time of a first run, a second run and 2 replicas")  # fmt: skip
    parser.add_argument("--json")
    parser.add_argument("--api-url")
    args = parser.parse_args(argv)

    model, n = mid_flux(), args.n
    shape = [str(args.steps), str(args.size), str(args.max_sequence_length)]
    times: dict[str, list[float]] = {}
    compiled: dict[str, list] = {}
    qualities: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp, prefect_api(args.api_url) as api_url:
        root = Path(tmp)
        env = {**os.environ, "PREFECT_API_URL": api_url, "STAGEDIFF_CACHE": str(root / "machine")}

        def diffusers(lever: str, out: Path) -> float:
            out.mkdir(parents=True)
            command = [sys.executable, "-c", BY_HAND, str(model), str(out), str(n), str(args.batch_size), *shape,
                       lever, *prompts(n)]  # fmt: skip
            return run(command, {**env, "TORCHINDUCTOR_CACHE_DIR": str(root / "by-hand")})[0]

        def stagediff(run_id: str, options: list[str], store: str, seed: int = 0) -> tuple[float, str]:
            cli = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(model), "--steps", shape[0],
                   "--height", shape[1], "--width", shape[1], "--max-sequence-length", shape[2],
                   "--batch-size", str(args.batch_size), "--seed", str(seed), "--out", str(root / "s"),
                   "--run-id", run_id, "--store", str(root / store), *options]  # fmt: skip
            cli += [arg for p in prompts(n) for arg in ("--prompt", p)]
            return run(cli, env)

        # 1. --compile: the first run compiles; then, this machine's folder removed, a second run and 2 replicas
        #    take the code from the store
        if "compile" in args.levers and args.compile_times:
            _, out = stagediff("compile-first", ["--compile"], "compile-store")
            compiled["first run"] = compile_seconds(out)
            for name, extra in (("second run", []), ("2 replicas", ["--replicas", "2"])):
                shutil.rmtree(root / "machine" / "compiled")
                run_id = f"compile-{name.replace(' ', '-')}"  # never a timed run's id (compile-0, compile-1, ...)
                _, out = stagediff(run_id, ["--compile", *extra], "compile-store", seed=len(compiled))
                compiled[name] = compile_seconds(out)
        # 2. Every compiled way run once, not counted (its code then in its store and on this machine)
        for lever in (lever for lever in args.levers if "compile" in lever):
            stagediff(f"warm-{folder(lever)}", LEVERS[lever], f"store-{folder(lever)}", seed=99)
            diffusers(lever, root / f"warm-{lever}")
        # 3. Side by side, fresh commands; each stagediff run on a fresh store (its compiled code copied in)
        for r in range(args.repeats):
            times.setdefault("diffusers plain", []).append(diffusers("", root / f"d-plain-{r}"))
            times.setdefault("stagediff exact", []).append(stagediff(f"exact-{r}", [], f"exact-{r}")[0])
            for lever in args.levers:
                times.setdefault(f"diffusers {lever}", []).append(diffusers(lever, root / f"d-{lever}-{r}"))
                store = root / f"store-{folder(lever)}-{r}"
                warm = root / f"store-{folder(lever)}" / "objects" / "compiled"
                if warm.exists():
                    shutil.copytree(warm, store / "objects" / "compiled")
                seconds, out = stagediff(f"{folder(lever)}-{r}", LEVERS[lever], store.name)
                times.setdefault(f"stagediff {lever}", []).append(seconds)
                if "compile" in lever:  # where the timed run's code came from (it must not be "compiled")
                    compiled.setdefault(f"timed {lever}", []).extend(compile_seconds(out))
        exact = root / "s" / "exact-0" / "images"
        for lever in args.levers:
            qualities[lever] = {"stagediff": quality(root / "s" / f"{folder(lever)}-0" / "images", exact),
                                "diffusers by hand": quality(root / f"d-{lever}-0", root / "d-plain-0")}  # fmt: skip

    med = {way: median(values) for way, values in times.items()}
    plain = med["diffusers plain"]
    title = f"Speed levers, N = {n}, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}"
    rows = [[way, seconds, round(n / seconds, 3), round(plain / seconds, 3)] for way, seconds in med.items()]
    print_table(f"{title}, median of {args.repeats}, fresh commands", ["way", "s", "img/s", "vs plain"], rows)
    ratios = {lever: {"vs_diffusers_plain": round(plain / med[f"stagediff {lever}"], 3),
                      "vs_diffusers_by_hand": round(med[f"diffusers {lever}"] / med[f"stagediff {lever}"], 3)}
              for lever in args.levers}  # fmt: skip
    print_table("stagediff with each lever", ["lever", "vs diffusers plain", "vs diffusers by hand", "max abs",
                "mean abs", "PSNR dB", "by hand: PSNR dB"],
                [[lever, *ratios[lever].values(), *qualities[lever]["stagediff"].values(),
                  qualities[lever]["diffusers by hand"]["psnr_db"]] for lever in args.levers])  # fmt: skip
    if compiled:
        # a process's compile cost: its first batch less a later one (a replica on its share of the cores takes
        # longer over every batch: its first batch alone is no measure)
        first = sum(c or 0.0 for _, _, c in compiled.get("first run", [])) or math.nan
        rows = [[name, ", ".join(f"{b:.1f} s" for _, b, _ in found), ", ".join(f"{c} s ({src})" for src, _, c in found),
                 round(max((c for _, _, c in found if c is not None), default=math.nan) / first, 3)]
                for name, found in compiled.items() if found]  # fmt: skip
        print_table("--compile per denoise process", ["run", "first batch", "compiling or loading", "share"], rows)
    payload = {"settings": vars(args), "runs": times, "medians": med, "ratios": ratios, "quality": qualities,
               "compile": compiled}  # fmt: skip
    write_json(args.json, "speed", payload)
    return payload


if __name__ == "__main__":
    main()
