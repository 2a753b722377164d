"""Resume after a crash: `stagediff generate` on the mid-sized model, its denoise process killed
(SIGKILL) mid-run, then the same command again (it finds the embeddings and the finished latents in
the store and computes only the missing latents, then the images). Compared with the remaining work
alone: a fresh process that runs just those denoise and decode calls on a copy of the store, with no
orchestration.

    python -m bench.resume [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import median, prefect_api, print_table, timed_run, write_json
from bench.models import mid_flux
from stagediff.isolation import find_stage_process

PROMPTS = ["a red fox in a forest, photo", "a city at night", "a lantern in the rain", "a robot portrait"]
SETTINGS = ["--steps", "4", "--height", "128", "--width", "128", "--max-sequence-length", "64", "--batch-size", "2"]

REMAINING_SCRIPT = """
import json, sys
from pathlib import Path
from stagediff.artifacts import Store
from stagediff.jobs import DecodeItem, DecodeJob, DenoiseItem, DenoiseJob, ItemRef, StageContext
from stagediff.request import ImageSettings, resolve_settings
from stagediff.stages import decode, denoise
run_dir, store = Path(sys.argv[1]), sys.argv[2]
manifest = json.loads((run_dir / "manifest.json").read_text())
ctx = StageContext(manifest["model"], str(run_dir), store, manifest["dtype"], batch_size=2)
from stagediff.record import Record
items = list(Record(run_dir / "record.db", "run").items())  # the killed run's items, from its record
todo = [i for i in items if Store(store).check("latents", i["keys"]["latents"]) is None]
settings = resolve_settings(ImageSettings.model_validate(manifest["request"]["settings"]), manifest["model"])
denoise(DenoiseJob(ctx, [DenoiseItem(i["index"], ItemRef(i["index"], "embeddings", i["keys"]["embeddings"], ""),
                                     i["seed"], settings, i["keys"]["latents"]) for i in todo]))
decode(DecodeJob(ctx, [DecodeItem(i["index"], ItemRef(i["index"], "latents", i["keys"]["latents"], ""), 128, 128,
                                  i["keys"]["images"]) for i in items]))
"""


def crash_in_denoise(cli: list[str], env: dict[str, str], after: float) -> None:
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = find_stage_process("denoise")
    time.sleep(after)
    os.kill(pid, signal.SIGKILL)
    if proc.wait(timeout=300) == 0:
        raise RuntimeError("the run survived its denoise process being killed")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kill-after", type=float, default=1.0, help="seconds into the denoise stage")
    parser.add_argument("--json")
    parser.add_argument("--api-url")
    args = parser.parse_args(argv)

    model = mid_flux()
    runs: dict[str, list[float]] = {"resumed": [], "remaining_alone": []}
    skipped_encode = []
    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp, prefect_api(args.api_url) as api_url:
        env = {**os.environ, "PREFECT_API_URL": api_url}
        for r in range(args.repeats):
            out = Path(tmp)
            cli = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(model), *SETTINGS]
            cli += [arg for p in PROMPTS for arg in ("--prompt", p)] + ["--out", str(out), "--run-id", f"r{r}"]
            cli += ["--store", str(out / f"store-{r}")]  # a fresh store per repeat
            crash_in_denoise(cli, env, args.kill_after)
            alone = out / f"alone-store-{r}"  # the same work on a copy: the resumed run finds its own store as left
            shutil.copytree(out / f"store-{r}", alone)
            runs["remaining_alone"].append(
                round(timed_run([sys.executable, "-c", REMAINING_SCRIPT, str(out / f"r{r}"), str(alone)], env=env), 3)
            )
            runs["resumed"].append(round(timed_run(cli, env=env), 3))
            manifest = json.loads((out / f"r{r}" / "manifest.json").read_text())
            assert manifest["status"] == "completed"
            skipped_encode.append(manifest["stages"]["encode"].get("skipped", False))

    resumed, alone = median(runs["resumed"]), median(runs["remaining_alone"])
    rows = [["resumed run (CLI, server running)", resumed], ["remaining work alone", alone]]
    rows.append(["ratio", round(resumed / alone, 3)])
    print_table(f"Resume after denoise was killed, median of {args.repeats}", ["measure", "seconds"], rows)
    payload = {"runs": runs, "encode_skipped": skipped_encode, "ratio_median": round(resumed / alone, 3)}
    write_json(args.json, "resume", payload)
    return payload


if __name__ == "__main__":
    main()
