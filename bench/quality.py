"""The cost in quality of each speed lever on the tiny families: `stagediff generate` exact and with each lever
(fresh commands, one store per family), and the difference of each lever's images from the exact ones: max and
mean absolute pixel difference (0-255) and PSNR (dB). Levers that do not apply to a family (the block caches
outside Flux) are left out. The tiny models are random: the figures say how far each lever moves the bits,
not how a trained model's pictures look.

    python -m bench.quality [--families flux sd3 sdxl sd15] [--levers compile int8 ...] [--n 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import speed
from bench.common import prefect_api, print_table, write_json
from bench.throughput import prompts
from stagediff.default_model import cache_dir
from stagediff.tiny_model import build_tiny_family

FAMILIES = ("flux", "sd3", "sdxl", "sd15")
# bench.speed's single levers, and magcache
SINGLE = ("compile", "int8", "int8-weight", "bf16", "first-block", "taylorseer")
LEVERS = {lever: speed.LEVERS[lever] for lever in SINGLE}
LEVERS["magcache"] = ["--cache", "magcache"]
FLUX_ONLY = {"first-block", "taylorseer", "magcache"}
SETTINGS = ["--steps", "4", "--height", "64", "--width", "64", "--max-sequence-length", "8", "--seed", "0"]


def tiny(family: str) -> Path:
    """The tiny model of a family, built once into the stagediff cache."""
    path = cache_dir() / "bench" / f"tiny-{family}-v1"
    if not (path / "model_index.json").exists():
        build_tiny_family(path, family)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--json")
    parser.add_argument("--api-url")
    args = parser.parse_args(argv)

    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="stagediff-quality-") as tmp, prefect_api(args.api_url) as api_url:
        root = Path(tmp)
        env = {**os.environ, "PREFECT_API_URL": api_url, "STAGEDIFF_CACHE": str(root / "machine")}
        for family in args.families:
            model, out = tiny(family), root / family
            cli = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(model), *SETTINGS,
                   "--out", str(out), "--store", str(root / f"store-{family}")]  # fmt: skip
            cli += [arg for p in prompts(args.n) for arg in ("--prompt", p)]
            for lever in ["exact", *(lever for lever in args.levers if family == "flux" or lever not in FLUX_ONLY)]:
                command = [*cli, "--run-id", lever, *LEVERS.get(lever, [])]
                proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(f"{family} {lever} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                if lever != "exact":
                    found = speed.quality(out / lever / "images", out / "exact" / "images")
                    results.setdefault(family, {})[lever] = found
                    print(f"{family:5} {lever:12} {found}", flush=True)

    rows = [[family, lever, *found.values()] for family, levers in results.items() for lever, found in levers.items()]
    print_table(f"Each lever's images against the exact ones, tiny families, N = {args.n}, 64x64, 4 steps",
                ["family", "lever", "max abs", "mean abs", "PSNR dB"], rows)  # fmt: skip
    payload = {"settings": vars(args), "quality": results}
    write_json(args.json, "quality", payload)
    return payload


if __name__ == "__main__":
    main()
