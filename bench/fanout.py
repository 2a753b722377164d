"""Fan-out scaling on this machine, mid-sized model (bench/models.py): `stagediff generate --replicas 2
--threads 1` against `--replicas 1 --threads 1` (scaling; target >= 1.8x) and against plain diffusers in
one process with every core (the number a user compares), fresh commands, alternating, medians.

    python -m bench.fanout [--n 32] [--batch-size 4] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench.common import median, prefect_api, print_table, timed_run, write_json
from bench.models import mid_flux
from bench.throughput import diffusers_command, parse_args, prompts


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, [32], argv)
    args.batch_size = args.batch_size if "--batch-size" in (argv or sys.argv) else 4
    n = args.n[0]
    model = mid_flux()
    runs: dict[str, list[float]] = {"replicas=1": [], "replicas=2": [], "diffusers": []}
    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp, prefect_api(args.api_url) as api_url:
        env = {**os.environ, "PREFECT_API_URL": api_url}
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("".join(f"{p}\n" for p in prompts(n)))
        for r in range(args.repeats):
            for replicas in (1, 2):
                cli = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(model)]
                cli += ["--prompts-file", str(prompt_file), "--steps", str(args.steps), "--height", str(args.size)]
                cli += ["--width", str(args.size), "--max-sequence-length", str(args.max_sequence_length)]
                cli += ["--batch-size", str(args.batch_size), "--replicas", str(replicas), "--threads", "1"]
                cli += ["--out", str(Path(tmp) / "out"), "--run-id", f"r{replicas}-{r}"]
                cli += ["--store", str(Path(tmp) / f"store-{replicas}-{r}")]  # a fresh store: nothing to reuse
                runs[f"replicas={replicas}"].append(round(timed_run(cli, env=env), 3))
            out = Path(tmp) / f"d-{r}"
            out.mkdir()
            runs["diffusers"].append(round(timed_run(diffusers_command(model, out, n, args), env=env), 3))

    one, two, plain = (median(runs[k]) for k in ("replicas=1", "replicas=2", "diffusers"))
    summary = {
        "seconds": {"replicas=1": one, "replicas=2": two, "diffusers": plain},
        "scaling_2_vs_1": round(one / two, 3),
        "diffusers_vs_2_replicas": round(plain / two, 3),
    }
    title = (f"Fan-out, median of {args.repeats}: {n} prompts, {args.size}x{args.size}, {args.steps} steps, "
             f"batch {args.batch_size}, fresh commands, {os.cpu_count()} cores")  # fmt: skip
    rows = [["1 replica, 1 thread", one, round(n / one, 3)], ["2 replicas, 1 thread each", two, round(n / two, 3)],
            [f"plain diffusers, one process, {os.cpu_count()} threads", plain, round(n / plain, 3)]]  # fmt: skip
    print_table(title, ["way", "seconds", "images/s"], rows)
    print(f"\nscaling 2 vs 1 replica: {summary['scaling_2_vs_1']}x (target >= 1.8)")
    print(f"2 replicas against plain diffusers (its seconds / ours): {summary['diffusers_vs_2_replicas']}")
    payload = {"settings": vars(args), "runs": runs, "summary": summary}
    write_json(args.json, "fanout", payload)
    return payload


if __name__ == "__main__":
    main()
