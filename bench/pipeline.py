"""Pipeline stages on this machine: the mid-sized model's transformer (bench/models.py) split in 2 parts, each
in its own process with one thread, micro-batches streamed through both (`--pipeline-stages 2`), against the
same 2 parts run one after the other (one micro-batch in flight: what `device_map="auto"` does, one part busy
at a time) and against the unsplit transformer in one process with one thread. The denoise stage only (the
prompts are encoded once, untimed); alternating, medians; each part's busy fraction and where its time went.

    python -m bench.pipeline [--n 8] [--steps 4] [--size 128] [--batch-size 1] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import median, print_table, write_json
from bench.models import mid_flux
from bench.throughput import prompts
from stagediff.isolation import run_isolated, run_stage_process
from stagediff.jobs import DenoiseItem, DenoiseJob, DenoiseSettings, EncodeItem, EncodeJob, StageContext

WAYS = ("streamed", "one after the other", "unsplit")


def key(kind: str, *parts: Any) -> str:
    return hashlib.sha256(f"{kind}{parts}".encode()).hexdigest()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-sequence-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = mid_flux()
    settings = DenoiseSettings(args.steps, 3.5, args.size, args.size, args.max_sequence_length)
    runs: dict[str, list[float]] = {way: [] for way in WAYS}
    parts: dict[str, list[list[dict]]] = {way: [] for way in WAYS[:2]}
    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp:
        base = StageContext(str(model), tmp, str(Path(tmp) / "store"), "float32", args.batch_size)
        encode = [EncodeItem(i, p, None, args.max_sequence_length, key("e", i)) for i, p in enumerate(prompts(args.n))]
        embeddings = {ref.index: ref for ref in run_stage_process("encode", EncodeJob(base, encode)).items}
        for r in range(args.repeats):
            for way in WAYS:
                ctx = StageContext(**{**base.__dict__, "pipeline_stages": 1 if way == "unsplit" else 2})
                items = [DenoiseItem(i, embeddings[i], i, settings, key("l", way, r, i)) for i in range(args.n)]
                job = DenoiseJob(ctx, items)
                os.environ["STAGEDIFF_TORCH_THREADS"] = "1"  # 1 thread per process: the parts take the stage's
                t0 = time.perf_counter()
                if way == "unsplit":
                    run_stage_process("denoise", job)
                else:
                    in_flight = 1 if way == "one after the other" else None
                    target = "stagediff.stages.parts:denoise_in_parts"
                    result, _ = run_isolated(target, job, in_flight, name="denoise")
                    parts[way].append(result.pipeline["parts"])
                runs[way].append(round(time.perf_counter() - t0, 3))
                print(f"  repeat {r + 1}, {way}: {runs[way][-1]:.2f} s", flush=True)
    os.environ.pop("STAGEDIFF_TORCH_THREADS", None)

    seconds = {way: median(runs[way]) for way in WAYS}
    summary: dict[str, Any] = {
        "seconds": seconds,
        "streamed_vs_one_after_the_other": round(seconds["one after the other"] / seconds["streamed"], 3),
        "streamed_vs_unsplit": round(seconds["unsplit"] / seconds["streamed"], 3),
        "parts": {way: breakdown(parts[way]) for way in parts},
    }
    title = (f"Pipeline stages, median of {args.repeats}: denoise {args.n} prompts, {args.size}x{args.size}, "
             f"{args.steps} steps, micro-batches of {args.batch_size}, {os.cpu_count()} cores")  # fmt: skip
    rows = [[f"2 parts, {way}" if way != "unsplit" else "unsplit, one process", seconds[way],
             round(args.n / seconds[way], 3)] for way in WAYS]  # fmt: skip
    print_table(title, ["way (1 thread per process)", "seconds", "images/s"], rows)
    print("\nper part (median over repeats): busy = compute / the stage's streaming time")
    part_rows = [[way, p["part"], p["blocks"], p["busy_fraction"], p["compute_seconds"], p["wait_seconds"],
                  p["send_seconds"]] for way, entries in summary["parts"].items() for p in entries]  # fmt: skip
    print_table("", ["way", "part", "blocks", "busy", "compute s", "waiting s", "sending s"], part_rows)
    print(f"\nstreamed vs one after the other: {summary['streamed_vs_one_after_the_other']}x (target >= 1.4)")
    print(f"streamed vs unsplit (one process, one thread): {summary['streamed_vs_unsplit']}x")
    payload = {"settings": vars(args), "runs": runs, "summary": summary}
    write_json(args.json, "pipeline", payload)
    return payload


def breakdown(repeats: list[list[dict]]) -> list[dict[str, Any]]:
    """Per part, the median over repeats of its busy fraction and compute, waiting and sending seconds."""
    out = []
    for k, first in enumerate(repeats[0]):
        entry = {"part": k, "blocks": f"{first['blocks'][0]} .. {first['blocks'][-1]} ({len(first['blocks'])})"}
        for field in ("busy_fraction", "compute_seconds", "wait_seconds", "send_seconds"):
            entry[field] = median([r[k][field] for r in repeats])
        out.append(entry)
    return out


if __name__ == "__main__":
    main()
