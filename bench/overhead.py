"""What process isolation and orchestration cost, on the tiny model.

1. Stage start-up: each real stage run in a fresh process forked from the preloaded forkserver
   vs. spawned as a fresh interpreter (`STAGEDIFF_START_METHOD=spawn`).
2. Orchestration: the `generate` flow's wall time minus the time spent inside its stage processes.
3. End to end, side by side: `stagediff generate` (a Prefect server already running) vs. one
   process of plain diffusers doing the same work, both as fresh commands.

    python -m bench.overhead [--repeats 5] [--quick] [--json PATH] [--api-url URL]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import median, prefect_api, print_table, timed_run, write_json

SETTINGS = dict(steps=2, guidance=3.5, height=64, width=64, max_sequence_length=32, seed=7, batch_size=2)
PROMPTS = ["a dog", "a cat"]

DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import DiffusionPipeline
model, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(model, use_safetensors=True)
pipe.set_progress_bar_config(disable=True)
prompts = {prompts!r}
images = pipe(prompts, generator=[torch.Generator("cpu").manual_seed({seed} + i) for i in range(len(prompts))],
              num_inference_steps={steps}, guidance_scale={guidance}, height={height}, width={width},
              max_sequence_length={max_sequence_length}).images
for i, image in enumerate(images):
    image.save(f"{{out}}/{{i:05d}}.png")
"""


def stage_startup(model: str, work: Path, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per start method and stage: start-up and total seconds of each run of the real stages."""
    from stagediff.isolation import run_isolated, warm_up
    from stagediff.jobs import DecodeItem, DecodeJob, DenoiseItem, DenoiseJob, EncodeItem, EncodeJob, StageContext
    from stagediff.keys import item_keys, model_identity, resolve_dtype
    from stagediff.request import resolve_settings, validate_request

    results: dict[str, dict[str, list[float]]] = {}
    for method in ("forkserver", "spawn"):
        os.environ["STAGEDIFF_START_METHOD"] = method
        if method == "forkserver":
            t0 = time.perf_counter()
            warm_up()
            run_isolated("stagediff.stages.devices:accelerator_count", name="warm-up")  # waits for the preload
            results["forkserver_boot_seconds"] = {"all": [round(time.perf_counter() - t0, 3)]}
        request = validate_request(prompts=PROMPTS, model=model, run_id="bench", **SETTINGS)
        settings, dtype, identity = (
            resolve_settings(request.settings, model),
            resolve_dtype("auto"),
            model_identity(model),
        )
        keys = [item_keys(identity, p, None, 7 + i, settings, dtype) for i, p in enumerate(PROMPTS)]
        n = range(len(PROMPTS))
        for r in range(repeats):
            run_dir = work / f"{method}-{r}"  # and a fresh store in it: every stage computes everything
            ctx = StageContext(model, str(run_dir), str(run_dir / "store"), dtype, batch_size=2)
            job = EncodeJob(ctx, [EncodeItem(i, PROMPTS[i], None, 32, keys[i]["embeddings"]) for i in n])
            enc, s_enc = run_isolated("stagediff.stages.encode:encode", job, name="encode")
            refs = {ref.index: ref for ref in enc.items}
            job = DenoiseJob(ctx, [DenoiseItem(i, refs[i], 7 + i, settings, keys[i]["latents"]) for i in n])
            den, s_den = run_isolated("stagediff.stages.denoise:denoise", job, name="denoise")
            refs = {ref.index: ref for ref in den.items}
            job = DecodeJob(ctx, [DecodeItem(i, refs[i], 64, 64, keys[i]["images"]) for i in n])
            _, s_dec = run_isolated("stagediff.stages.decode:decode", job, name="decode")
            for stage, stats in (("encode", s_enc), ("denoise", s_den), ("decode", s_dec)):
                row = results.setdefault(f"{method}/{stage}", {"startup": [], "seconds": []})
                row["startup"].append(stats.startup_seconds)
                row["seconds"].append(stats.seconds)
    os.environ.pop("STAGEDIFF_START_METHOD")
    return results


def orchestration(model: str, work: Path, repeats: int) -> dict[str, list[float]]:
    """Wall time of the flow called in-process, and the part of it spent outside stage processes."""
    from tests.reference import run_generate as generate

    walls, overheads = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        store = str(work / "flow" / f"store-{r}")  # a fresh store: the run computes everything
        manifest = generate(
            prompts=PROMPTS, model=model, out=str(work / "flow"), run_id=f"r{r}", store=store, **SETTINGS
        )
        wall = time.perf_counter() - t0
        walls.append(round(wall, 3))
        overheads.append(round(wall - sum(s["seconds"] for s in manifest["stages"].values()), 3))
    return {"flow_wall": walls, "outside_stages": overheads}


def end_to_end(model: str, work: Path, repeats: int, api_url: str) -> dict[str, list[float]]:
    """Fresh commands side by side, alternating: the CLI against a running server vs. plain diffusers."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    script = DIFFUSERS_SCRIPT.format(prompts=PROMPTS, **SETTINGS)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    runs: dict[str, list[float]] = {"stagediff": [], "diffusers": []}
    for r in range(repeats):
        out = work / f"e2e-{r}"
        out.mkdir(parents=True)
        runs["diffusers"].append(round(timed_run([sys.executable, "-c", script, model, str(out)], env=env), 3))
        cli = [sys.executable, "-m", "stagediff.cli", "generate", "--model", model, *args]
        cli += [arg for p in PROMPTS for arg in ("--prompt", p)] + ["--out", str(out), "--run-id", "cli"]
        runs["stagediff"].append(round(timed_run(cli, env=env), 3))
    return runs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat of everything (CI)")
    parser.add_argument("--json", help="output path (default: bench/results/overhead.json)")
    parser.add_argument("--api-url", help="a running Prefect server (default: $PREFECT_API_URL or a temporary one)")
    parser.add_argument("--model", help="default: a fresh tiny model")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats

    from stagediff.tiny_model import build_tiny_flux

    with tempfile.TemporaryDirectory(prefix="stagediff-bench-") as tmp:
        work = Path(tmp)
        model = args.model or str(build_tiny_flux(work / "model"))
        startup = stage_startup(model, work, repeats)
        with prefect_api(args.api_url) as api_url:
            flow = orchestration(model, work, repeats)
            e2e = end_to_end(model, work, repeats, api_url)

    boot = startup.pop("forkserver_boot_seconds")["all"][0]
    stages = {
        key: {"startup_median": median(v["startup"]), "seconds_median": median(v["seconds"]), **v}
        for key, v in startup.items()
    }
    flow_wall, outside = median(flow["flow_wall"]), median(flow["outside_stages"])
    ratio = round(median(e2e["stagediff"]) / median(e2e["diffusers"]), 3)

    title = f"Stage start-up, median of {repeats} (forkserver boot, once per flow process: {boot:.2f} s)"
    rows = [[key, v["startup_median"], v["seconds_median"]] for key, v in stages.items()]
    print_table(title, ["method/stage", "start-up s", "stage wall s"], rows)
    rows = [["flow wall", flow_wall], ["outside stage processes", outside]]
    print_table(f"Orchestration (generate flow, server running), median of {repeats}", ["measure", "seconds"], rows)
    rows = [
        ["one-process diffusers", median(e2e["diffusers"])],
        ["stagediff generate", median(e2e["stagediff"])],
        ["ratio", ratio],
    ]
    print_table(f"End to end, fresh commands side by side, median of {repeats}", ["command", "seconds"], rows)
    payload = {
        "repeats": repeats,
        "settings": SETTINGS,
        "forkserver_boot_seconds": boot,
        "stages": stages,
        "orchestration": {**flow, "flow_wall_median": flow_wall, "outside_stages_median": outside},
        "end_to_end": {**e2e, "ratio_median": ratio},
    }
    write_json(args.json, "overhead", payload)
    return payload


if __name__ == "__main__":
    main()
