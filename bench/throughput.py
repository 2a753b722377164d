"""Images per second on the mid-sized model (bench/models.py): plain diffusers (a fresh process
that loads the pipeline once and loops over batches) vs. `stagediff generate` (a Prefect server
running), both as fresh commands, side by side, for N = 1, 8, 32 prompts.

    python -m bench.throughput [--n 1 8 32] [--batch-size 8] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.common import median, prefect_api, print_table, timed_run, write_json
from bench.models import mid_flux

WORDS = [
    *("fox", "city", "forest", "river", "portrait", "mountain"),
    *("night", "market", "ocean", "lantern", "garden", "robot"),
]

DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import DiffusionPipeline
model, out, n, batch, steps, size, msl = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
prompts = sys.argv[8:]
pipe = DiffusionPipeline.from_pretrained(model, use_safetensors=True)
pipe.set_progress_bar_config(disable=True)
for start in range(0, n, batch):
    chunk = prompts[start : start + batch]
    generators = [torch.Generator("cpu").manual_seed(start + i) for i in range(len(chunk))]
    images = pipe(chunk, generator=generators, num_inference_steps=steps, height=size, width=size,
                  max_sequence_length=msl, guidance_scale=3.5).images
    for i, image in enumerate(images):
        image.save(f"{out}/{start + i:05d}.png")
"""


def prompts(n: int) -> list[str]:
    return [f"a {WORDS[i % len(WORDS)]} number {i}, photo" for i in range(n)]


def marginal_cost(summary: dict[int, dict[str, float]]) -> dict[str, float] | None:
    """Seconds per extra image between the smallest and largest N (the fixed costs cancel out)."""
    if len(summary) < 2:
        return None
    lo, hi = min(summary), max(summary)
    per = {
        way: (summary[hi][f"{way}_seconds"] - summary[lo][f"{way}_seconds"]) / (hi - lo)
        for way in ("diffusers", "stagediff")
    }
    return {
        "from_n": lo,
        "to_n": hi,
        **{f"{way}_seconds_per_image": round(v, 3) for way, v in per.items()},
        "ratio": round(per["diffusers"] / per["stagediff"], 3),
    }


def parse_args(doc: str, n: list[int], argv: list[str] | None) -> argparse.Namespace:
    """The options this benchmark and bench.batch share."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=n)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-sequence-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--api-url")
    return parser.parse_args(argv)


def diffusers_command(model: Path, out: Path, n: int, args: argparse.Namespace) -> list[str]:
    """Plain diffusers in a fresh process: load the pipeline once, loop over batches."""
    common = [str(args.steps), str(args.size), str(args.max_sequence_length)]
    return [sys.executable, "-c", DIFFUSERS_SCRIPT, str(model), str(out), str(n), str(args.batch_size), *common,
            *prompts(n)]  # fmt: skip


HEADER = ["N", "diffusers s", "stagediff s", "diffusers img/s", "stagediff img/s", "ratio", "stagediff s/img"]


def summarize(runs: dict[int, dict[str, list[float]]]) -> tuple[list[list], dict[int, dict[str, float]]]:
    """Medians per N: table rows (N, seconds and images per second of both ways, ratio) and the summary."""
    rows, summary = [], {}
    for n, by_way in runs.items():
        d, s = median(by_way["diffusers"]), median(by_way["stagediff"])
        summary[n] = {
            "diffusers_seconds": d,
            "stagediff_seconds": s,
            "diffusers_images_per_s": round(n / d, 4),
            "stagediff_images_per_s": round(n / s, 4),
            "throughput_ratio": round(d / s, 3),
            "stagediff_seconds_per_image": round(s / n, 3),
        }
        rows.append([n, d, s, round(n / d, 3), round(n / s, 3), round(d / s, 3), round(s / n, 3)])
    return rows, summary


def print_marginal(marginal: dict[str, float] | None) -> None:
    if marginal:
        rows = [[way, marginal[f"{way}_seconds_per_image"]] for way in ("diffusers", "stagediff")]
        rows.append(["ratio (diffusers / stagediff)", marginal["ratio"]])
        print_table(f"Cost of one more image, N = {marginal['from_n']} -> {marginal['to_n']}", ["way", "s"], rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, [1, 8, 32], argv)

    model = mid_flux()
    common = [str(args.steps), str(args.size), str(args.max_sequence_length)]
    runs: dict[int, dict[str, list[float]]] = {n: {"diffusers": [], "stagediff": []} for n in args.n}
    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp, prefect_api(args.api_url) as api_url:
        env = {**os.environ, "PREFECT_API_URL": api_url}
        for r in range(args.repeats):
            for n in args.n:
                out = Path(tmp) / f"d-{n}-{r}"
                out.mkdir()
                runs[n]["diffusers"].append(round(timed_run(diffusers_command(model, out, n, args), env=env), 3))
                cli = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(model)]
                cli += ["--steps", common[0], "--height", common[1], "--width", common[1]]
                cli += ["--max-sequence-length", common[2], "--batch-size", str(args.batch_size), "--seed", "0"]
                cli += ["--out", str(Path(tmp) / "s"), "--run-id", f"n{n}-{r}"]
                cli += ["--store", str(Path(tmp) / f"store-n{n}-{r}")]  # a fresh store: nothing to reuse
                cli += [arg for p in prompts(n) for arg in ("--prompt", p)]
                runs[n]["stagediff"].append(round(timed_run(cli, env=env), 3))

    rows, summary = summarize(runs)
    title = (
        f"Throughput, median of {args.repeats}: {args.size}x{args.size}, {args.steps} steps, "
        f"batch {args.batch_size}, fresh commands (load + run)"
    )
    print_table(title, HEADER, rows)
    marginal = marginal_cost(summary)
    print_marginal(marginal)
    payload = {
        "settings": vars(args),
        "runs": {str(n): v for n, v in runs.items()},
        "summary": summary,
        "marginal": marginal,
    }
    write_json(args.json, "throughput", payload)
    return payload


if __name__ == "__main__":
    main()
