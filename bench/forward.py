"""One forward of the mid-sized model's transformer (bench/models.py), per lever, each mode in a fresh process:
eager float32, --compile's static regional compile, torchao int8 (dynamic) with and without compile, bfloat16
with and without compile. Prints each forward's seconds (the first includes compiling).

    python -m bench.forward [--batch 8] [--modes eager compile int8 int8+compile bf16 bf16+compile] [--calls 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import print_table
from bench.models import mid_flux

SCRIPT = """
import sys, time, torch
from diffusers import FluxTransformer2DModel
model, batch, mode, calls = sys.argv[1], int(sys.argv[2]), sys.argv[3].split("+"), int(sys.argv[4])
m = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
cfg, g = m.config, torch.Generator().manual_seed(0)
kw = dict(hidden_states=torch.randn(batch, 64, cfg.in_channels, generator=g),
          encoder_hidden_states=torch.randn(batch, 64, cfg.joint_attention_dim, generator=g),
          pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
          timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(64, 3), return_dict=False)
if cfg.guidance_embeds:
    kw["guidance"] = torch.full((batch,), 3.5)
if "int8" in mode:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
if "bf16" in mode:
    m = m.to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
if "compile" in mode:
    from stagediff.stages.compiled import compile_blocks
    compile_blocks(m)
with torch.no_grad():
    for _ in range(calls):
        t0 = time.perf_counter(); m(**kw); print(round(time.perf_counter() - t0, 3), flush=True)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "int8", "int8+compile", "bf16",
                                                        "bf16+compile"])  # fmt: skip
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args(argv)
    model, rows = mid_flux(), []
    for mode in args.modes:
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(args.batch), mode, str(args.calls)],
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        rows.append([mode, *out])
    print_table(f"One forward, batch {args.batch}, seconds per call", ["mode", *map(str, range(args.calls))], rows)


if __name__ == "__main__":
    main()
