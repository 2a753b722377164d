"""Speed levers on the mid-sized model (bench/models.py), fresh commands side by side: plain diffusers at its
defaults (float32, eager), plain diffusers with the lever applied by hand, `stagediff generate` exact and
with the lever; the quality cost of the lever (pixel differences from the exact images, PSNR); for
`--compile`, the compile time of a first run (nothing compiled anywhere), of a second run on the same store
(this machine's compiled folder removed: the code comes from the store) and of a second replica.

    python -m bench.speed [--n 32] [--steps 4] [--size 128] [--batch-size 8] [--repeats 1] [--json PATH]

Images per second count the whole fresh command (load, compile or load the compiled code, run). The
diffusers-by-hand way keeps its own inductor cache folder, warmed by a first run that is not counted, as
stagediff's machine folder is after its first run: both compile once per machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import median, prefect_api, print_table, timed_run, write_json
from bench.models import mid_flux
from bench.throughput import DIFFUSERS_SCRIPT, prompts

COMPILE = "pipe.transformer.compile_repeated_blocks(fullgraph=True)\n"  # as diffusers' docs show
BY_HAND = {
    "compile": DIFFUSERS_SCRIPT.replace("pipe.set_progress_bar_config", COMPILE + "pipe.set_progress_bar_config")
}


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


def compile_seconds(run_dir: Path) -> float:
    """The first batch of each shape in the run's denoise processes (compiling, or loading the compiled code)."""
    summary = json.loads((run_dir / "manifest.json").read_text())
    processes = summary["stages"]["denoise"].get("processes", [])
    return round(sum(sum(p.get("compiled", {}).get("first_batch_seconds", [])) for p in processes), 3)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--api-url")
    args = parser.parse_args(argv)

    model, n = mid_flux(), args.n
    shape = [str(args.steps), str(args.size), str(args.max_sequence_length)]
    times: dict[str, list[float]] = {}
    extra: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp, prefect_api(args.api_url) as api_url:
        root = Path(tmp)
        env = {**os.environ, "PREFECT_API_URL": api_url, "STAGEDIFF_CACHE": str(root / "machine")}

        def diffusers(way: str, out: Path) -> float:
            out.mkdir(parents=True)
            script = BY_HAND.get(way, DIFFUSERS_SCRIPT)
            command = [sys.executable, "-c", script, str(model), str(out), str(n), str(args.batch_size), *shape,
                       *prompts(n)]  # fmt: skip
            return round(timed_run(command, env={**env, "TORCHINDUCTOR_CACHE_DIR": str(root / "by-hand")}), 3)

        def stagediff(run: str, *options: str, store: str = "store") -> float:
            cli = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(model), "--steps", shape[0],
                   "--height", shape[1], "--width", shape[1], "--max-sequence-length", shape[2],
                   "--batch-size", str(args.batch_size), "--seed", "0", "--out", str(root / "s"), "--run-id", run,
                   "--store", str(root / store), *options]  # fmt: skip
            cli += [arg for p in prompts(n) for arg in ("--prompt", p)]
            return round(timed_run(cli, env=env), 3)

        # compile: the first run compiles (nothing anywhere), the second takes the code from the store
        times["stagediff --compile (first run, compiles)"] = [stagediff("compile-first", "--compile", store="c0")]
        extra["first_compile_s"] = compile_seconds(root / "s" / "compile-first")
        shutil.rmtree(root / "machine" / "compiled")
        stagediff("compile-second", "--compile", "--seed", "1", store="c0")
        extra["second_compile_s"] = compile_seconds(root / "s" / "compile-second")
        diffusers("compile", root / "warm-up")  # the by-hand way's inductor cache warmed, not counted
        for r in range(args.repeats):
            for way in ("plain", "compile"):
                times.setdefault(f"diffusers {way}", []).append(diffusers(way, root / f"d-{way}-{r}"))
            times.setdefault("stagediff exact", []).append(stagediff(f"exact-{r}", store=f"e{r}"))
            times.setdefault("stagediff --compile", []).append(
                stagediff(f"compile-{r}", "--compile", store=f"c{r + 1}")
            )
        exact_images, compiled_images = root / "s" / "exact-0" / "images", root / "s" / "compile-0" / "images"
        measured = quality(compiled_images, exact_images)
        by_hand = quality(root / "d-compile-0", root / "d-plain-0")

    med = {way: median(values) for way, values in times.items()}
    plain, by_hand_s = med["diffusers plain"], med["diffusers compile"]
    rows = [[way, seconds, round(n / seconds, 3), round(plain / seconds, 3)] for way, seconds in med.items()]
    title = f"Speed levers, N = {n}, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}"
    print_table(f"{title}, median of {args.repeats}, fresh commands", ["way", "s", "img/s", "vs plain"], rows)
    ratios = {
        "compile_vs_diffusers_plain": round(plain / med["stagediff --compile"], 3),
        "compile_vs_diffusers_compiled_by_hand": round(by_hand_s / med["stagediff --compile"], 3),
        "exact_vs_diffusers_plain": round(plain / med["stagediff exact"], 3),
        "second_run_compile_share": round(extra["second_compile_s"] / max(extra["first_compile_s"], 1e-9), 3),
    }
    print_table("Ratios and compile time", ["figure", "value"], [[k, v] for k, v in {**ratios, **extra}.items()])
    print_table("Quality of --compile (pixels 0-255, from the exact images)", ["images", "max abs", "mean abs",
                "PSNR dB"], [["stagediff --compile vs exact", *measured.values()],
                             ["diffusers compiled vs plain", *by_hand.values()]])  # fmt: skip
    payload = {"settings": vars(args), "runs": times, "medians": med, "ratios": ratios, "compile": extra,
               "quality": {"stagediff_compile": measured, "diffusers_compile": by_hand}}  # fmt: skip
    write_json(args.json, "speed", payload)
    return payload


if __name__ == "__main__":
    main()
