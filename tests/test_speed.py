"""Speed levers beyond plain diffusers, each opt-in: its own content keys (a store never mixes exact and
approximate artifacts), its images against plain diffusers with the same lever applied by hand, and for
`--compile` the compiled code kept in the store and loaded by the next process instead of compiled again."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_items
from tests.reference import read_image, reference_images

PROMPTS = ["a red fox", "a tower at dusk"]
ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "8", "--seed", "4"]


@pytest.fixture
def api(prefect_server, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())


def stagediff(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagediff.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip


def images(run: Path) -> list[np.ndarray]:
    return [read_image(run / item["image"]) for item in read_items(run)]


def test_compile_is_diffusers_compiled_by_hand_its_own_keys_and_its_code_compiled_once(
    prefect_server, tiny_model: Path, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "STAGEDIFF_CACHE": str(tmp_path / "machine")}
    out, common = tmp_path / "out", ["--model", str(tiny_model), *ARGS, "--out", str(tmp_path / "out")]
    for prompt in PROMPTS:
        common += ["--prompt", prompt]
    exact = stagediff("generate", *common, "--run-id", "exact", env=env)
    assert exact.returncode == 0, exact.stderr[-3000:]
    compiled = stagediff("generate", *common, "--run-id", "compiled", "--compile", env=env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "code compiled" in compiled.stderr, compiled.stderr[-3000:]

    # its own latents and images, the same embeddings (the text encoders are not compiled)
    exact_items, compiled_items = read_items(out / "exact"), read_items(out / "compiled")
    for e, c in zip(exact_items, compiled_items, strict=True):
        assert e["keys"]["embeddings"] == c["keys"]["embeddings"]
        assert e["keys"]["latents"] != c["keys"]["latents"] and e["keys"]["images"] != c["keys"]["images"]
    summary = json.loads((out / "compiled" / "manifest.json").read_text())
    assert summary["request"]["placement"]["compile"] is True

    # the images: those of diffusers compiled by hand, bit for bit; near the exact ones
    by_hand = reference_images(tiny_model, PROMPTS, seed=4, num_inference_steps=2, height=64, width=64,
                               max_sequence_length=8, compile=True)  # fmt: skip
    for image, reference, plain in zip(images(out / "compiled"), by_hand, images(out / "exact"), strict=True):
        np.testing.assert_array_equal(image, reference)
        assert np.abs(image.astype(int) - plain.astype(int)).max() <= 2

    # the compiled code: in the store once; a machine without it takes it from the store, compiles nothing
    store = out / ".store" / "objects" / "compiled"
    (stored,) = list(store.rglob("*.safetensors"))
    written = stored.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "machine" / "compiled")
    again = stagediff("generate", *common, "--run-id", "again", "--compile", "--seed", "9", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "code store" in again.stderr, again.stderr[-3000:]
    assert list(store.rglob("*.safetensors")) == [stored] and stored.stat().st_mtime_ns == written
    # a rerun computes nothing
    rerun = stagediff("generate", *common, "--run-id", "compiled", "--compile", env=env)
    assert rerun.returncode == 0 and "(0 computed)" in rerun.stdout, rerun.stdout[-2000:]


def test_compile_with_blocks_offloaded_to_disk_runs_near_diffusers(api, tiny_model: Path, tmp_path: Path) -> None:
    """accelerate's offload hooks are compiler-disabled: the blocks behind them are compiled in pieces."""
    env = {**os.environ, "STAGEDIFF_CACHE": str(tmp_path / "machine")}
    args = ["--model", str(tiny_model), *ARGS, "--out", str(tmp_path / "out"), "--run-id", "disk", "--compile"]
    run = stagediff("generate", *args, "--prompt", PROMPTS[0], "--max-memory", "cpu=200KB", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    placed = json.loads((tmp_path / "out" / "disk" / "manifest.json").read_text())["stages"]["denoise"]
    assert "disk" in placed["device_map"].values(), placed["device_map"]
    (reference,) = reference_images(tiny_model, PROMPTS[:1], seed=4, num_inference_steps=2, height=64, width=64,
                                    max_sequence_length=8)  # fmt: skip
    (image,) = images(tmp_path / "out" / "disk")
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 2


def test_compile_with_pipeline_stages_is_refused_in_one_line(tmp_path: Path) -> None:
    refused = stagediff("generate", "--prompt", "a", "--compile", "--pipeline-stages", "2", "--out", str(tmp_path),
                        env=dict(os.environ))  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "stagediff: error: invalid compile=True: does not go with pipeline_stages > 1 yet: use one of them"
    ]


@pytest.mark.parametrize("offload", ["block", "leaf"])
def test_compile_with_group_offload_compiles_the_blocks_in_pieces_and_runs(
    tiny_model: Path, tmp_path: Path, offload: str
) -> None:
    """diffusers' group offloading hooks are compiler-disabled: a whole-graph block could not call them. Onloaded
    to the CPU here (the stage onloads to the GPU, which CI lacks), the same hooks and the stage's compile."""
    import torch
    from diffusers import FluxTransformer2DModel

    from stagediff.jobs import StageContext
    from stagediff.stages.compiled import compile_blocks, compile_mode

    ctx = StageContext(str(tiny_model), str(tmp_path), str(tmp_path / "store"), "float32", compile=True,
                       group_offload=offload)  # fmt: skip
    denoiser = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    plain = StageContext(str(tiny_model), str(tmp_path), str(tmp_path), "float32", compile=True)
    assert compile_mode(plain, denoiser) == "whole"
    assert compile_mode(StageContext(**{**vars(plain), "cache": "magcache"}), denoiser) == "forward"
    config, cpu = denoiser.config, torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]) if config.guidance_embeds else None,
    }  # fmt: skip
    with torch.no_grad():
        exact = denoiser(**inputs).sample
        denoiser.enable_group_offload(cpu, offload_device=cpu, offload_type=f"{offload}_level",
                                      num_blocks_per_group=1 if offload == "block" else None)  # fmt: skip
        assert compile_mode(ctx, denoiser) == "pieces" and compile_blocks(denoiser, "pieces") > 0
        compiled = denoiser(**inputs).sample
    torch.testing.assert_close(compiled, exact, rtol=1e-4, atol=1e-5)


def test_compile_with_magcache_compiles_the_blocks_its_hooks_call(api, tiny_model: Path, tmp_path: Path) -> None:
    """MagCache's block hooks are compiler-disabled: a compiled call of a hooked block would run it eagerly and
    compile nothing. The blocks' own forwards are compiled, and the hooks call them."""
    env = {**os.environ, "STAGEDIFF_CACHE": str(tmp_path / "machine")}
    args = ["--model", str(tiny_model), "--steps", "6", "--height", "64", "--width", "64", "--max-sequence-length",
            "8", "--seed", "4", "--out", str(tmp_path / "out"), "--run-id", "mag", "--prompt", PROMPTS[0]]  # fmt: skip
    run = stagediff("generate", *args, "--cache", "magcache", "--compile", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    (folder,) = (tmp_path / "machine" / "compiled").iterdir()
    assert [path for path in (folder / "fxgraph").rglob("*") if path.is_file()], "no graph was compiled"
    (by_hand,) = reference_images(tiny_model, PROMPTS[:1], seed=4, num_inference_steps=6, height=64, width=64,
                                  max_sequence_length=8, cache=cache_config("magcache"))  # fmt: skip
    (image,) = images(tmp_path / "out" / "mag")
    assert np.abs(image.astype(int) - by_hand.astype(int)).max() <= 2


def cache_config(name: str):
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    return {"first-block:1": FirstBlockCacheConfig(threshold=1.0), "taylorseer": TaylorSeerCacheConfig(),
            "magcache": MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=6)}[name]  # fmt: skip


def test_block_caches_are_diffusers_with_the_same_config_by_hand_with_their_own_keys(
    api, tiny_model: Path, tmp_path: Path
) -> None:
    from stagediff.cli import main

    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--steps", "6", "--height", "64", "--width", "64", "--max-sequence-length",
            "8", "--seed", "4", "--out", str(out), *[a for p in PROMPTS for a in ("--prompt", p)]]  # fmt: skip
    assert main(["generate", *args, "--run-id", "exact"]) == 0
    exact = images(out / "exact")
    latents = {read_items(out / "exact")[0]["keys"]["latents"]}
    for name in ("first-block:1", "taylorseer", "magcache"):
        assert main(["generate", *args, "--run-id", name.replace(":", "-"), "--cache", name]) == 0
        run = out / name.replace(":", "-")
        by_hand = reference_images(tiny_model, PROMPTS, seed=4, num_inference_steps=6, height=64, width=64,
                                   max_sequence_length=8, cache=cache_config(name))  # fmt: skip
        for image, reference in zip(images(run), by_hand, strict=True):
            np.testing.assert_array_equal(image, reference, err_msg=name)
        items = read_items(run)
        assert items[0]["keys"]["latents"] not in latents, name  # never the exact run's, nor another cache's
        latents.add(items[0]["keys"]["latents"])
        summary = json.loads((run / "manifest.json").read_text())
        assert summary["request"]["placement"]["cache"] == name
        with Image.open(run / items[0]["image"]) as png:  # the PNG names the lever and the command that made it
            made = json.loads(png.text["stagediff"])
        assert made["levers"] == f"cache={name}" and f"--cache {name}" in made["command"]
    # the first-block cache at threshold 1 skips every step after the first: not the exact images
    cached = images(out / "first-block-1")
    assert any(np.abs(a.astype(int) - b.astype(int)).max() > 0 for a, b in zip(cached, exact, strict=True))
    # a rerun reuses everything
    assert main(["generate", *args, "--run-id", "first-block-1", "--cache", "first-block:1.0"]) == 0
    summary = json.loads((out / "first-block-1" / "manifest.json").read_text())
    assert summary["counts"]["computed_by_this_run"] == 0


def test_a_block_cache_on_a_denoiser_without_one_is_refused_in_one_line(tmp_path: Path) -> None:
    from stagediff.tiny_model import TinySD15Config, build_tiny_model

    model = build_tiny_model(tmp_path / "sd15", TinySD15Config())
    refused = stagediff("generate", "--prompt", "a", "--model", str(model), "--cache", "taylorseer", "--out",
                        str(tmp_path / "out"), env=dict(os.environ))  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("stagediff: error: invalid cache='taylorseer': needs a denoiser that takes diffusers'")
    bad = stagediff("generate", "--prompt", "a", "--cache", "first-block:0", "--out", str(tmp_path / "out"),
                    env=dict(os.environ))  # fmt: skip
    assert bad.returncode == 2 and "invalid cache='first-block:0'" in bad.stderr, bad.stderr
    assert not (tmp_path / "out").exists()


def test_quantized_components_are_diffusers_quantized_by_hand_with_their_own_keys(
    api, tiny_model: Path, tmp_path: Path
) -> None:
    import diffusers
    import transformers
    from diffusers import PipelineQuantizationConfig
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    from stagediff.cli import main

    out = tmp_path / "out"
    args = ["--model", str(tiny_model), *ARGS, "--out", str(out), *[a for p in PROMPTS for a in ("--prompt", p)]]
    assert main(["generate", *args, "--run-id", "exact"]) == 0
    exact = read_items(out / "exact")
    configs = {"int8": Int8DynamicActivationInt8WeightConfig, "int8-weight": Int8WeightOnlyConfig}
    # the default components: the denoiser and the largest text encoder (CLIP's in the tiny model, T5 in FLUX.1)
    size = {n: (tiny_model / n / "model.safetensors").stat().st_size for n in ("text_encoder", "text_encoder_2")}
    largest = max(size, key=size.__getitem__)
    for mode, config in configs.items():
        assert main(["generate", *args, "--run-id", mode, "--quantize", mode]) == 0
        summary = json.loads((out / mode / "manifest.json").read_text())
        assert summary["request"]["placement"]["quantize"] == mode
        mapping = {"transformer": diffusers.TorchAoConfig(config()), largest: transformers.TorchAoConfig(config())}
        quantized = PipelineQuantizationConfig(quant_mapping=mapping)  # in the run's dtype (diffusers' default: bf16)
        by_hand = reference_images(tiny_model, PROMPTS, seed=4, dtype="float32", num_inference_steps=2, height=64,
                                   width=64, max_sequence_length=8, quantization_config=quantized)  # fmt: skip
        for image, reference in zip(images(out / mode), by_hand, strict=True):
            np.testing.assert_array_equal(image, reference, err_msg=mode)
        for e, q in zip(exact, read_items(out / mode), strict=True):
            assert e["keys"]["embeddings"] != q["keys"]["embeddings"] and e["keys"]["latents"] != q["keys"]["latents"]
    # the denoiser alone: the exact run's embeddings are reused, its latents are not
    assert main(["generate", *args, "--run-id", "denoiser", "--quantize", "int8-weight", "--quantize-components",
                 "transformer"]) == 0  # fmt: skip
    summary = json.loads((out / "denoiser" / "manifest.json").read_text())
    assert summary["stages"]["encode"]["computed"] == 0 and summary["stages"]["denoise"]["computed"] == 2
    for e, q in zip(exact, read_items(out / "denoiser"), strict=True):
        assert e["keys"]["embeddings"] == q["keys"]["embeddings"] and e["keys"]["latents"] != q["keys"]["latents"]
    # a rerun computes nothing
    assert main(["generate", *args, "--run-id", "int8", "--quantize", "int8"]) == 0
    assert json.loads((out / "int8" / "manifest.json").read_text())["counts"]["computed_by_this_run"] == 0


def test_a_lever_this_machine_cannot_run_is_refused_in_one_line(tiny_model: Path, tmp_path: Path) -> None:
    common = ["generate", "--prompt", "a", "--model", str(tiny_model), "--out", str(tmp_path / "out")]
    cases = {
        ("--quantize", "float8"): "invalid quantize='float8': needs a CUDA GPU of compute capability 8.9 or more",
        ("--quantize", "int4"): "invalid quantize='int4'",
        ("--quantize", "int8", "--quantize-components", "vae"): "invalid quantize_components=['vae']: must name",
        ("--quantize-components", "transformer"): "invalid quantize_components=['transformer']: needs quantize",
        ("--group-offload", "block"): "invalid group_offload='block': needs a GPU to move the denoiser's groups to",
        ("--group-offload", "blocks"): "invalid group_offload='blocks'",
        ("--offload-stream",): "invalid offload_stream=True: needs group_offload",
        ("--group-offload", "leaf", "--max-memory", "cpu=4GiB"): "invalid group_offload='leaf': is a placement of its",
    }
    if importlib.util.find_spec("bitsandbytes") is None:
        cases[("--quantize", "nf4")] = "invalid quantize='nf4': needs the bitsandbytes package"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # whatever this machine has: no GPU
    for options, message in cases.items():
        refused = stagediff(*common, *options, env=env)
        assert refused.returncode == 2, (options, refused.stderr)
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith(f"stagediff: error: {message}"), (options, line)
    assert not (tmp_path / "out").exists()
