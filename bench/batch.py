"""Batch throughput on the mid-sized model (bench/models.py): `stagediff batch` over a prompts file, with
its default settings and chunking, against plain diffusers loading the pipeline once and looping in
batches, both as fresh commands, alternating, for N = 16 and 64 prompts (a Prefect server running).

    python -m bench.batch [--n 16 64] [--batch-size 8] [--repeats 3] [--json PATH]

The ratio is diffusers seconds / stagediff seconds at the largest N (target >= 0.97); the cost of one
more image is the slope between the smallest and the largest N (the fixed costs cancel out).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench.common import prefect_api, print_table, timed_run, write_json
from bench.models import mid_flux
from bench.throughput import HEADER, diffusers_command, marginal_cost, parse_args, print_marginal, prompts, summarize


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, [16, 64], argv)
    model = mid_flux()
    runs: dict[int, dict[str, list[float]]] = {n: {"diffusers": [], "stagediff": []} for n in args.n}
    loads: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp, prefect_api(args.api_url) as api_url:
        env = {**os.environ, "PREFECT_API_URL": api_url}
        for r in range(args.repeats):
            for n in args.n:
                out = Path(tmp) / f"d-{n}-{r}"
                out.mkdir()
                runs[n]["diffusers"].append(round(timed_run(diffusers_command(model, out, n, args), env=env), 3))
                prompts_file = Path(tmp) / f"p-{n}-{r}.txt"
                prompts_file.write_text("".join(f"{p}\n" for p in prompts(n)))
                folder = Path(tmp) / f"batch-{n}-{r}"  # a fresh folder and store: nothing to reuse
                cli = [sys.executable, "-m", "stagediff.cli", "batch", str(prompts_file), "--store", str(folder)]
                cli += ["--model", str(model), "--steps", str(args.steps), "--height", str(args.size)]
                cli += ["--width", str(args.size), "--max-sequence-length", str(args.max_sequence_length)]
                cli += ["--batch-size", str(args.batch_size), "--seed", "0", "--guidance", "3.5"]
                runs[n]["stagediff"].append(round(timed_run(cli, env=env), 3))
                stages = json.loads((folder / "batch.json").read_text())["stages"]
                loads.append({"n": n, **{stage: info["loads"] for stage, info in stages.items()}})

    rows, summary = summarize(runs)
    title = (
        f"Batch throughput, median of {args.repeats}: {args.size}x{args.size}, {args.steps} steps, "
        f"batch {args.batch_size}, fresh commands (load + run)"
    )
    print_table(title, HEADER, rows)
    marginal = marginal_cost(summary)
    print_marginal(marginal)
    print(f"\nmodel loads per stage and run: {loads}")
    payload = {"settings": vars(args), "runs": {str(n): v for n, v in runs.items()}, "summary": summary,
               "marginal": marginal, "loads": loads}  # fmt: skip
    write_json(args.json, "batch", payload)
    return payload


if __name__ == "__main__":
    main()
