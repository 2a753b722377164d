"""Runs of any size on the embedded tiny model, where the bookkeeping is what is measured: `stagediff batch`,
`stagediff generate --prompts-file` and `stagediff batch --replicas 2` over files of 1,000 to 1,000,000
prompts, as fresh commands against one Prefect server.

    python -m bench.scale [--sizes 1000 100000 1000000] [--window 45] [--complete 100000] [--json PATH]
        [--complete-folder DIR] [--reruns 1] [--rounds 0] [--modes batch generate replicas]

For each way to run: the small file runs to its end; each large one runs for the small run's time from its
first image to its end (the same window: images/s at N against images/s at the small N; a chunk's images land
in one burst, so the rates are also counted from burst to burst within the window), on for `--window` seconds
in all, then is interrupted with SIGTERM (seconds to exit) and run again (seconds from the flow's
start to its next image). The flow process' peak RSS (VmHWM of the command, which runs the flow; stage
processes are listed apart, from the summary) and the seconds from the flow's start to its first stage come
from the same runs; the file's every line is checked before the first stage. `--complete N`: a batch of N
lines run to its end, one line appended, run again (it must compute one item); `--complete-folder DIR`: that
batch was already run to its end there (DIR/prompts-N.txt, DIR/batch), by the same command; `--reruns K`:
appended and rerun K times (the first rerun after an upgrade may make every key again; see docs/benchmarks.md);
`--modes` with no mode: the rerun alone; `--rounds K`: K more rounds of the rates alone (the small file, then
each large one for its window), their ratios and medians.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import prefect_api, print_table, write_json

SETTINGS = ["--steps", "1", "--height", "64", "--width", "64", "--max-sequence-length", "8", "--batch-size", "16"]
LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| ")
MODES = ("batch", "generate", "replicas")


def prompts_file(folder: Path, n: int, suffix: str = ".txt") -> Path:
    path = folder / f"prompts-{n}{suffix}"
    if not path.exists():
        with path.open("w", encoding="utf-8") as f:
            for i in range(n):
                f.write(f"a studio photo of product {i}, white background\n")
    return path


def command(mode: str, prompts: Path, folder: Path) -> tuple[list[str], Path]:
    """The command of a mode and its artifact store (images are counted there: each is stored as it is made,
    while a run folder links a chunk's images when its decode stage ends)."""
    cli = [sys.executable, "-m", "stagediff.cli"]
    if mode == "generate":
        out = folder / "out"
        cmd = [*cli, "generate", "--prompts-file", str(prompts), "--out", str(out), "--run-id", "r", *SETTINGS]
        return cmd, out / ".store"
    extra = ["--replicas", "2"] if mode == "replicas" else []
    store = folder / "batch"
    return [*cli, "batch", str(prompts), "--store", str(store), *SETTINGS, *extra], store / ".store"


def log_time(line: str, now: float) -> float | None:
    """The epoch seconds of a Prefect log line's HH:MM:SS.mmm (today's, or yesterday's just before midnight)."""
    match = LOG_TIME.match(line)
    if not match:
        return None
    h, m, s, ms = map(int, match.groups())
    today = datetime.datetime.fromtimestamp(now).replace(hour=h, minute=m, second=s, microsecond=ms * 1000)
    t = today.timestamp()
    return t - 86400 if t > now + 3600 else t


def count(store: Path) -> int:
    """Images in a store: objects/images/<2 hex>/<key>.png (not the temporary files of writes under way)."""
    total = 0
    try:
        shards = [e.path for e in os.scandir(store / "objects" / "images") if e.is_dir()]
    except FileNotFoundError:
        return 0
    for shard in shards:
        with contextlib.suppress(FileNotFoundError):
            total += sum(1 for e in os.scandir(shard) if e.name.endswith(".png") and not e.name.startswith("."))
    return total


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) a process has spent itself, not its children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str], images: Path, env: dict[str, str], stop_after: float | None, window: float | None) -> dict:
    """Run a command, sampling its images; with `stop_after`, SIGTERM it that many seconds after its first new
    image. Returns when it ends: the samples, its log's times, its peak RSS, how long it took to exit."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 (closed below)
    start, base = time.time(), count(images)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    first = first_count = in_window = rss = at_stop = cpu_at_first = None
    stopped = exited = None
    cpu_span: tuple[int, float] | None = None  # (images, the flow process' CPU seconds) since its first images
    arrivals: list[tuple[float, int]] = []  # (seconds after the first new image, images) each time images landed
    while proc.poll() is None:
        time.sleep(0.2)
        now, n = time.time(), count(images)
        rss = peak_rss_mb(proc.pid) or rss
        if first is None and n > base:
            first, first_count = now, n
            cpu_at_first = cpu_seconds(proc.pid)
        if first is not None and stopped is None:  # the flow's CPU from its first images to its last sample
            cpu_now = cpu_seconds(proc.pid)
            cpu_span = (n - first_count, cpu_now - cpu_at_first) if cpu_now and cpu_at_first else cpu_span
        if first is not None and n > (arrivals[-1][1] if arrivals else base) and stopped is None:
            arrivals.append((round(now - first, 2), n))
        if first is not None and window is not None and in_window is None and now - first >= window:
            in_window = n
        if first is not None and stop_after is not None and stopped is None and now - first >= stop_after:
            stopped, at_stop = time.time(), n
            proc.send_signal(signal.SIGTERM)
    ended = time.time()
    if stopped is not None:
        exited = ended - stopped
    last_count = count(images)
    log.seek(0)
    lines = log.read().splitlines()
    log.close()
    os.unlink(log.name)

    def when(pattern: str) -> float | None:
        return next((t for line in lines if pattern in line and (t := log_time(line, ended)) is not None), None)

    flow_start = when("Beginning flow run")
    first_stage = when("items to compute")
    if proc.returncode not in (0, -signal.SIGTERM, 1) or flow_start is None:
        raise RuntimeError(f"{' '.join(cmd[3:6])}... failed ({proc.returncode}):\n" + "\n".join(lines[-40:]))
    return {
        "returncode": proc.returncode,
        "seconds": round(ended - start, 2),
        "flow_to_first_stage_s": None if first_stage is None else round(first_stage - flow_start, 2),
        "flow_to_first_image_s": None if first is None else round(first - flow_start, 2),
        "first_to_last_image_s": None if first is None else round(ended - first, 2),
        "images_before": base,
        "images_at_first": first_count,
        "images_in_window": in_window,
        "images_after": last_count,
        "images_at_sigterm": at_stop,
        "first_image_to_sigterm_s": None if stopped is None or first is None else round(stopped - first, 2),
        "flow_peak_rss_mb": None if rss is None else round(rss, 1),
        "seconds_to_exit_after_sigterm": None if exited is None else round(exited, 2),
        "arrivals": arrivals,
        "flow_cpu_s_per_100_images": round(100 * cpu_span[1] / cpu_span[0], 3) if cpu_span and cpu_span[0] else None,
        "output_tail": lines[-3:],
    }


def burst_rate(arrivals: list[tuple[float, int]], within: float | None = None) -> float | None:
    """Images/s from the first images' arrival to the last arrival `within` seconds of it. A chunk's images land
    together as its decode ends, so a window's end falls just after a burst or just before one by chance;
    counted from burst to burst, a window holds whole chunks of work."""
    inside = [(t, n) for t, n in arrivals if within is None or t <= within]
    if len(inside) < 2:
        return None
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return (n1 - n0) / (t1 - t0)


def small_rates(small: dict) -> tuple[float, float | None]:
    """The small run's images/s from its first images to its end, and from burst to burst."""
    rate = (small["images_after"] - small["images_at_first"]) / small["first_to_last_image_s"]
    return rate, burst_rate(small["arrivals"])


def window_rates(large: dict, small: dict) -> tuple[float, float | None]:
    """A large run's images/s over the small run's window (its first images to its end), and from burst to
    burst within the small run's first and last bursts' span."""
    images = (large["images_in_window"] or large["images_after"]) - large["images_at_first"]
    return images / small["first_to_last_image_s"], burst_rate(large["arrivals"], small["arrivals"][-1][0])


def stage_rss(summary_path: Path) -> dict[str, float]:
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return {}
    stages = summary.get("stages") or next(iter((summary.get("replica_stages") or {}).values()), {})
    return {stage: info.get("peak_rss_mb") for stage, info in stages.items()}


def bench_mode(mode: str, sizes: list[int], window: float, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    small, rows = sizes[0], {}
    folder = tmp / f"{mode}-{small}"
    folder.mkdir()
    cmd, images = command(mode, prompts_file(tmp, small), folder)
    done = run(cmd, images, env, None, None)
    span, (small_rate, small_bursts) = done["first_to_last_image_s"], small_rates(done)
    rows[small] = {"run": done, "images_per_s": round(small_rate, 2), "window_s": span,
                   "images_per_s_between_bursts": small_bursts and round(small_bursts, 2),
                   "window_between_bursts_s": done["arrivals"][-1][0]}  # fmt: skip
    for n in sizes[1:]:
        folder = tmp / f"{mode}-{n}"
        folder.mkdir()
        cmd, images = command(mode, prompts_file(tmp, n), folder)
        try:
            first = run(cmd, images, env, stop_after=max(window, span), window=span)
            resumed = run(cmd, images, env, stop_after=5.0, window=None)
        except RuntimeError as exc:  # reported in the results, the other runs go on
            rows[n] = {"error": str(exc)[-2000:]}
            continue
        rate, in_window = window_rates(first, done)
        summary = folder / ("out/r/manifest.json" if mode == "generate" else "batch/batch.json")
        # and over the whole time it ran (--window): chunks deliver their images in bursts, which a short window
        # catches or misses
        whole = (first["images_at_sigterm"] - first["images_at_first"]) / first["first_image_to_sigterm_s"]
        rows[n] = {"run": first, "resumed": resumed, "images_per_s": round(rate, 2),
                   "ratio_to_small": round(rate / small_rate, 3), "images_per_s_whole_window": round(whole, 2),
                   "ratio_to_small_whole_window": round(whole / small_rate, 3),
                   "stage_peak_rss_mb": stage_rss(summary)}  # fmt: skip
        whole_run = burst_rate(first["arrivals"])
        if small_bursts and in_window and whole_run:
            rows[n].update({"images_per_s_between_bursts": round(in_window, 2),
                            "ratio_between_bursts": round(in_window / small_bursts, 3),
                            "ratio_between_bursts_whole_window": round(whole_run / small_bursts, 3)})  # fmt: skip
    return rows


def rate_rounds(mode: str, sizes: list[int], rounds: int, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """`rounds` more times, in turn: the small file to its end, then each large one (a fresh folder each) for the
    small run's window; each round's ratios, and their medians. The host's speed drifts over minutes, which a
    ratio of runs taken side by side, round after round, cancels."""
    ratios: dict[int, dict[str, list[float]]] = {n: {"window": [], "bursts": [], "flow_cpu": []} for n in sizes}
    for r in range(rounds):
        folder = tmp / f"{mode}-round{r}-{sizes[0]}"
        folder.mkdir()
        done = run(*command(mode, prompts_file(tmp, sizes[0]), folder), env, None, None)
        span, (small_rate, small_bursts) = done["first_to_last_image_s"], small_rates(done)
        ratios[sizes[0]]["flow_cpu"].append(done["flow_cpu_s_per_100_images"])
        for n in sizes[1:]:
            folder = tmp / f"{mode}-round{r}-{n}"
            folder.mkdir()
            large = run(*command(mode, prompts_file(tmp, n), folder), env, stop_after=span, window=span)
            rate, bursts = window_rates(large, done)
            ratios[n]["window"].append(round(rate / small_rate, 3))
            ratios[n]["flow_cpu"].append(large["flow_cpu_s_per_100_images"])
            if bursts and small_bursts:
                ratios[n]["bursts"].append(round(bursts / small_bursts, 3))
    return {
        n: {**r, **{f"median_{k}": statistics.median(x for x in v if x is not None) for k, v in r.items() if any(v)}}
        for n, r in ratios.items()
    }


def bench_rerun(n: int, tmp: Path, env: dict[str, str], built: Path | None = None, times: int = 1) -> dict[str, Any]:
    """A batch of `n` lines run to its end (or `built`, a folder holding prompts-N.txt and the completed batch
    of `command`), then `times` times: one line appended, run again."""
    folder = built or tmp / f"complete-{n}"
    folder.mkdir(exist_ok=True)
    path = prompts_file(folder, n)
    cmd, images = command("batch", path, folder)
    completed = run(cmd, images, env, None, None) if built is None else {"seconds": None}
    reruns = []
    for _ in range(times):
        with path.open("a", encoding="utf-8") as f:
            f.write("one more line\n")
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        ended = time.time()
        lines = proc.stdout.splitlines() + proc.stderr.splitlines()
        start = next(t for line in lines if "Beginning flow run" in line and (t := log_time(line, ended)))
        finish = next(t for line in lines if "Finished in state Completed" in line and (t := log_time(line, ended)))
        summary = json.loads((folder / "batch" / "batch.json").read_text())
        reruns.append({"command_seconds": round(ended - t0, 2), "flow_seconds": round(finish - start, 2),
                       "computed": summary["counts"]["computed_by_this_run"], "done": summary["counts"]["done"],
                       "returncode": proc.returncode})  # fmt: skip
    return {"items": n, "first_run_seconds": completed["seconds"], "reruns": reruns}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--window", type=float, default=45.0, help="seconds each large run runs before SIGTERM")
    parser.add_argument("--complete", type=int, default=100_000, help="a batch run to its end, then rerun (0: skip)")
    parser.add_argument("--complete-folder", type=Path, help="a folder whose --complete batch has run to its end")
    parser.add_argument("--reruns", type=int, default=1, help="times the --complete batch is rerun, a line more each")
    parser.add_argument("--rounds", type=int, default=0, help="more rounds of the rates alone, side by side")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES, help="none: the rerun alone")
    parser.add_argument("--json", help="where to write the results (default: bench/results/scale.json)")
    parser.add_argument("--api-url", help="a Prefect API (default: $PREFECT_API_URL or a temporary server)")
    args = parser.parse_args(argv)
    settings = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    results: dict[str, Any] = {"settings": settings, "stagediff_settings": SETTINGS}
    with tempfile.TemporaryDirectory(prefix="stagediff-scale-") as tmp, prefect_api(args.api_url) as api_url:
        env = {**os.environ, "PREFECT_API_URL": api_url}
        for mode in args.modes:
            results[mode] = bench_mode(mode, args.sizes, args.window, Path(tmp), env)
            if args.rounds:
                results[f"{mode}_rounds"] = rate_rounds(mode, args.sizes, args.rounds, Path(tmp), env)
        if args.complete:
            results["rerun"] = bench_rerun(args.complete, Path(tmp), env, args.complete_folder, args.reruns)
    rows = []
    for mode in args.modes:
        for n, row in results[mode].items():
            if "error" in row:
                rows.append([mode, n, "failed", *["-"] * 9])
                continue
            resumed = row.get("resumed") or {}
            rows.append([mode, n, row["images_per_s"], row.get("ratio_to_small", 1.0),
                         row.get("ratio_to_small_whole_window", "-"), row.get("ratio_between_bursts", "-"),
                         row.get("ratio_between_bursts_whole_window", "-"), row["run"]["flow_cpu_s_per_100_images"],
                         row["run"]["flow_peak_rss_mb"],
                         row["run"]["flow_to_first_stage_s"], row["run"]["seconds_to_exit_after_sigterm"] or "-",
                         resumed.get("flow_to_first_image_s") or "-"])  # fmt: skip
    if rows:
        print_table("Runs of any size (tiny model, 64x64, 1 step, batch 16)",
                    ["mode", "prompts", "images/s", "ratio", "ratio (whole run)", "ratio, burst to burst",
                     "(whole run)", "flow CPU s/100 images", "flow RSS MB", "flow->1st stage s",
                     "exit after TERM s", "resume: flow->next image s"], rows)  # fmt: skip
    for mode in args.modes if args.rounds else []:
        for n, r in results[f"{mode}_rounds"].items():
            print(f"{mode} at {n}, {args.rounds} rounds: images/s ratio to {args.sizes[0]} over its window "
                  f"{r['window']} (median {r.get('median_window')}), burst to burst {r['bursts']} "
                  f"(median {r.get('median_bursts')}); flow CPU s per 100 images {r['flow_cpu']}")  # fmt: skip
    for r in results.get("rerun", {}).get("reruns", []):
        print(f"rerun of a completed {results['rerun']['items']}-item batch with one line appended: computed "
              f"{r['computed']}, flow {r['flow_seconds']} s (command {r['command_seconds']} s)")  # fmt: skip
    write_json(args.json, "scale", results)
    return results


if __name__ == "__main__":
    main()
