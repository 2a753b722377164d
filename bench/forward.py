"""One forward of the mid-sized model's transformer (bench/models.py), per lever, each mode in a fresh process:
eager float32, --compile's static regional compile, torchao int8 (dynamic) with and without compile, bfloat16
with and without compile, and `autotune`: the regional compile with inductor's max-autotune and freezing (its
own C++ GEMM kernels tried against MKL's); `vae` and `vae+compile`: one decode of its VAE, eager and with the
whole decoder compiled. Prints each forward's seconds (the first includes compiling).

With --profile, one more forward of each mode runs under torch's profiler and its self CPU time is split into
matrix products and convolutions, attention and the rest. What compiling can save is at most the rest, when it
leaves the matmuls, convolutions and attention to the same kernels: `ceiling` is the speed-up if the rest took no
time at all. The profiled forward's seconds (self CPU time, its share) are printed per kind.

    python -m bench.forward [--batch 8] [--size 128] [--modes eager compile int8 ... vae vae+compile] [--calls 4]
                            [--profile] [--json PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import median, print_table, write_json
from bench.models import mid_flux

SCRIPT = """
import sys, time, torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
model, batch, mode, calls = sys.argv[1], int(sys.argv[2]), sys.argv[3].split("+"), int(sys.argv[4])
profile, size = sys.argv[5] == "1", int(sys.argv[6])
MATMULS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "mkldnn::_linear_pointwise"}
g = torch.Generator().manual_seed(0)
if "vae" in mode:
    m = AutoencoderKL.from_pretrained(model, subfolder="vae")
    z = torch.randn(batch, m.config.latent_channels, size // 8, size // 8, generator=g)
    if "compile" in mode:
        m.decoder.compile(fullgraph=True, dynamic=False)
    step = lambda: m.decode(z)
else:
    m = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    cfg, tokens = m.config, (size // 16) ** 2
    kw = dict(hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=g),
              encoder_hidden_states=torch.randn(batch, 64, cfg.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
              timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(64, 3),
              return_dict=False)
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((batch,), 3.5)
    if "int8" in mode:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        quantize_(m, Int8DynamicActivationInt8WeightConfig())
    if "bf16" in mode:
        m = m.to(torch.bfloat16)
        kw = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    if "autotune" in mode:
        import torch._inductor.config as inductor
        inductor.freezing, inductor.max_autotune, inductor.max_autotune_gemm_backends = True, True, "CPP,ATEN"
    if "compile" in mode or "autotune" in mode:
        from stagediff.stages.compiled import compile_blocks
        compile_blocks(m)
    step = lambda: m(**kw)
with torch.no_grad():
    for _ in range(calls):
        t0 = time.perf_counter(); step(); print(round(time.perf_counter() - t0, 3), flush=True)
    if profile:
        from torch.profiler import profile as torch_profile
        with torch_profile() as p:
            step()
        ops = {e.key: e.self_cpu_time_total for e in p.key_averages()}
        matmul = sum(t for k, t in ops.items() if k in MATMULS or "_linear" in k or "qlinear" in k or "conv" in k)
        attention = sum(t for k, t in ops.items() if "attention" in k)
        total = sum(ops.values())
        print(f"{matmul / 1e6:.3f} {attention / 1e6:.3f} {(total - matmul - attention) / 1e6:.3f}")
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image pixels a side (a multiple of 16)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "int8", "int8+compile", "bf16",
                                                        "bf16+compile"])  # fmt: skip
    parser.add_argument("--calls", type=int, default=4, help="forwards per mode, the first compiles (>= 2)")
    parser.add_argument("--profile", action="store_true", help="split one more forward's CPU time by kind of op")
    parser.add_argument("--json", help="results file (default bench/results/forward.json)")
    args = parser.parse_args(argv)
    model, rows, runs = mid_flux(), [], []
    for mode in args.modes:
        command = [sys.executable, "-c", SCRIPT, str(model), str(args.batch), mode, str(args.calls)]
        command += [str(int(args.profile)), str(args.size)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
        seconds = [float(t) for t in out[: args.calls]]
        run = {"mode": mode, "seconds": seconds, "median_after_first": median(seconds[1:])}
        runs.append(run)
        if args.profile:
            matmul, attention, rest = map(float, out[-3:])
            run["profiled_seconds"] = {"matmul": matmul, "attention": attention, "rest": rest}
            total = matmul + attention + rest
            shares = [f"{t:.2f} ({t / total:.0%})" for t in (matmul, attention, rest)]
            out = [*out[:-3], *shares, f"{total / (matmul + attention):.2f}x"]
        rows.append([mode, *out[: args.calls], run["median_after_first"], *out[args.calls :]])
    columns = ["mode", *map(str, range(args.calls)), "median 1-"]
    if args.profile:
        columns += ["matmul", "attention", "rest", "ceiling"]
    print_table(f"One forward, batch {args.batch}, {args.size}x{args.size}, seconds per call", columns, rows)
    write_json(args.json, "forward", {"batch": args.batch, "size": args.size, "calls": args.calls, "runs": runs})


if __name__ == "__main__":
    main()
