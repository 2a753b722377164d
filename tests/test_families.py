"""Every model family (Flux, SD3, SDXL, SD 1.5) against the one-process diffusers pipeline, and the
device placement of the stages: a denoiser spread over CPU and disk, sharded checkpoints, tiled decoding.

The wide matrix calls the stage functions in this process; a few cases go through the Prefect flow and
the command line, where every stage runs in its own process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from stagediff.artifacts import Store
from stagediff.jobs import (
    DecodeItem,
    DecodeJob,
    DenoiseItem,
    DenoiseJob,
    DenoiseSettings,
    EncodeItem,
    EncodeJob,
    StageContext,
)
from stagediff.tiny_model import (
    TinyFluxConfig,
    TinySD3Config,
    TinySD15Config,
    TinySDXLConfig,
    build_tiny_model,
)
from tests.conftest import read_items
from tests.reference import read_image, reference_images

FAMILIES = ("flux", "sd3", "sdxl", "sd15")
SHAPES = {
    "flux": {
        "default": TinyFluxConfig(),
        "wide": TinyFluxConfig(seed=1, clip_hidden=48, t5_hidden=64, t5_layers=1, latent_channels=16),
    },
    "sd3": {
        "default": TinySD3Config(),
        "wide": TinySD3Config(
            seed=1,
            clip_2_hidden=48,
            t5_hidden=96,
            t5_layers=1,
            latent_channels=16,
            transformer_layers=2,
            attention_head_dim=16,
            attention_heads=2,
            patch_size=1,
        ),
        "sd35": TinySD3Config(  # SD3.5 medium's MMDiT-X: a second attention in the first blocks, RMS-normed q and k
            seed=2, transformer_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm"
        ),
    },
    "sdxl": {
        "default": TinySDXLConfig(),
        "deep": TinySDXLConfig(  # 3 UNet levels, latents_mean/std in the VAE, no forced zeros
            seed=1,
            clip_2_hidden=48,
            clip_layers=3,
            unet_channels=(16, 32, 32),
            attention_head_dim=(2, 4, 4),
            latents_mean=(0.1, -0.2, 0.3, 0.0),
            latents_std=(0.9, 1.1, 1.0, 0.8),
            force_zeros_for_empty_prompt=False,
        ),
    },
    "sd15": {
        "default": TinySD15Config(),
        "deep": TinySD15Config(
            seed=1, clip_hidden=48, unet_channels=(16, 32, 32), attention_head_dim=2, scheduler="ddim"
        ),
        "sd2": TinySD15Config(  # SD 2.1 768's shape in a StableDiffusionPipeline
            seed=2, scheduler="ddim", prediction_type="v_prediction", use_linear_projection=True, upcast_attention=True
        ),
    },
}
MATRIX = [(family, shape) for family in FAMILIES for shape in SHAPES[family]]
PROMPTS = ["a red dog", "a city at night, photo"]
NEGATIVES = ["blurry", "a green forest"]
HEIGHT, WIDTH = 64, 48


def settings(family: str, negatives: bool) -> DenoiseSettings:
    """Two steps; CFG on (Flux: true CFG when there are negatives)."""
    return DenoiseSettings(
        steps=2,
        guidance=3.5 if family == "flux" else 5.0,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=24,
        true_cfg_scale=2.0 if family == "flux" and negatives else 1.0,
    )


def call_kwargs(family: str, s: DenoiseSettings) -> dict:
    """The same settings as diffusers pipeline arguments."""
    kwargs = dict(num_inference_steps=s.steps, guidance_scale=s.guidance, height=s.height, width=s.width)
    if family in ("flux", "sd3"):
        kwargs["max_sequence_length"] = s.max_sequence_length
    if family == "flux":
        kwargs["true_cfg_scale"] = s.true_cfg_scale
    if family == "sdxl" and s.original_size is not None:
        kwargs.update(
            original_size=s.original_size, crops_coords_top_left=s.crops_coords_top_left, target_size=s.target_size
        )
    return kwargs


def flow_kwargs(s: DenoiseSettings) -> dict:
    return dict(
        steps=s.steps,
        guidance=s.guidance,
        true_cfg_scale=s.true_cfg_scale,
        height=s.height,
        width=s.width,
        max_sequence_length=s.max_sequence_length,
    )


def run_stages(
    model: Path,
    run_dir: Path,
    s: DenoiseSettings,
    prompts: list[str],
    seed: int,
    negatives: list[str] | None = None,
    batch_size: int = 1,
    dtype: str = "float32",
    max_memory: dict[str, str] | None = None,
    tiled: bool = False,
    sliced: bool = False,
) -> tuple[list[np.ndarray], dict]:
    """encode -> denoise -> decode in this process; the images and each stage's result."""
    from stagediff.stages import decode, denoise, encode

    offload_dir = str(run_dir / "offload") if max_memory else None
    store = Store(run_dir / "store")  # its own store: the stand-in keys below name each item's artifacts
    ctx = StageContext(
        str(model), str(run_dir), store.location, dtype, batch_size, max_memory=max_memory, offload_dir=offload_dir
    )
    n = range(len(prompts))
    negative = negatives or [None] * len(prompts)
    key = {kind: {i: stand_in_key(kind, i) for i in n} for kind in ("e", "l", "i")}
    encoded = encode(
        EncodeJob(ctx, [EncodeItem(i, prompts[i], negative[i], s.max_sequence_length, key["e"][i]) for i in n])
    )
    embeddings = {ref.index: ref for ref in encoded.items}
    denoised = denoise(DenoiseJob(ctx, [DenoiseItem(i, embeddings[i], seed + i, s, key["l"][i]) for i in n]))
    latents = {ref.index: ref for ref in denoised.items}
    decoded = decode(
        DecodeJob(ctx, [DecodeItem(i, latents[i], s.height, s.width, key["i"][i]) for i in n], tiled, sliced)
    )
    refs = sorted(decoded.items, key=lambda ref: ref.index)
    images = [read_image(store.path(store.object_name("images", ref.key))) for ref in refs]
    return images, {"encode": encoded, "denoise": denoised, "decode": decoded}


def stand_in_key(kind: str, index: int) -> str:
    return hashlib.sha256(f"{kind}{index}".encode()).hexdigest()


def assert_identical(images: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(images) == len(expected)
    for image, reference in zip(images, expected, strict=True):
        assert image.shape == reference.shape
        np.testing.assert_array_equal(image, reference)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """`tiny(family, shape, max_shard_size=None)`: a tiny model of that family and shape, built once per module."""
    built: dict[tuple, Path] = {}

    def get(family: str, shape: str = "default", max_shard_size: str | None = None) -> Path:
        key = (family, shape, max_shard_size)
        if key not in built:
            name = f"{family}-{shape}" + ("-sharded" if max_shard_size else "")
            path = tmp_path_factory.mktemp("models") / name
            built[key] = build_tiny_model(path, SHAPES[family][shape], max_shard_size=max_shard_size)
        return built[key]

    return get


# 1. Bit identity, every family and shape, with and without negative prompts (stages in this process)


@pytest.mark.parametrize("negatives", [False, True], ids=["no-negative", "negative"])
@pytest.mark.parametrize(("family", "shape"), MATRIX)
def test_stages_bit_identical_to_diffusers(tiny, tmp_path: Path, family: str, shape: str, negatives: bool) -> None:
    model = tiny(family, shape)
    s = settings(family, negatives)
    negative_prompts = NEGATIVES if negatives else None
    images, _ = run_stages(model, tmp_path, s, PROMPTS, seed=11, negatives=negative_prompts)
    assert_identical(images, reference_images(model, PROMPTS, 11, negative_prompts, **call_kwargs(family, s)))


@pytest.mark.parametrize("family", FAMILIES)
def test_stages_batched_within_one_of_diffusers(tiny, tmp_path: Path, family: str) -> None:
    model = tiny(family)
    s = settings(family, negatives=True)
    prompts, negatives = ["a dog", "a cat", "blue sky"], ["red", "", "a forest"]
    images, _ = run_stages(model, tmp_path, s, prompts, seed=3, negatives=negatives, batch_size=2, sliced=True)
    expected = reference_images(model, prompts, 3, negatives, **call_kwargs(family, s))
    for image, reference in zip(images, expected, strict=True):
        assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1


# 2. Family specifics


def test_sdxl_persists_forced_zero_negatives_only_when_configured(tiny, tmp_path: Path) -> None:
    from stagediff.stages import encode

    for shape, zeros in (("default", True), ("deep", False)):
        ctx = StageContext(str(tiny("sdxl", shape)), str(tmp_path / shape), str(tmp_path / shape), "float32", 1)
        ref = encode(EncodeJob(ctx, [EncodeItem(0, "a dog", None, 77, stand_in_key("e", 0))])).items[0]
        tensors = Store(ctx.store).load_tensors(ref.kind, ref.key)
        assert set(tensors) == {
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        }
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            assert bool((tensors[name] == 0).all()) is zeros, (shape, name)


def test_sdxl_micro_conditioning_and_float16_upcast(tiny, tmp_path: Path) -> None:
    model = tiny("sdxl")
    s = DenoiseSettings(
        **{
            **settings("sdxl", False).__dict__,
            "original_size": (128, 96),
            "crops_coords_top_left": (8, 4),
            "target_size": (64, 48),
        }
    )
    images, _ = run_stages(model, tmp_path / "micro", s, PROMPTS[:1], seed=5)
    assert_identical(images, reference_images(model, PROMPTS[:1], 5, **call_kwargs("sdxl", s)))
    plain = reference_images(model, PROMPTS[:1], 5, **call_kwargs("sdxl", settings("sdxl", False)))
    assert not np.array_equal(images[0], plain[0])  # the micro-conditioning reached the UNet
    # float16: the VAE has force_upcast, so decode runs it in float32 like the pipeline does
    s16 = settings("sdxl", False)
    images, _ = run_stages(model, tmp_path / "fp16", s16, PROMPTS[:1], seed=5, dtype="float16")
    assert_identical(images, reference_images(model, PROMPTS[:1], 5, dtype="float16", **call_kwargs("sdxl", s16)))


def test_tiled_decode_matches_diffusers_with_tiling(tiny, tmp_path: Path) -> None:
    model = tiny("sd15")
    s = DenoiseSettings(**{**settings("sd15", False).__dict__, "height": 128, "width": 96})  # latents > one tile
    images, _ = run_stages(model, tmp_path, s, PROMPTS[:1], seed=2, tiled=True)
    assert_identical(images, reference_images(model, PROMPTS[:1], 2, tiled_decode=True, **call_kwargs("sd15", s)))


@pytest.mark.parametrize("checker", ["pass", "flag-all"])
def test_sd15_safety_checker_runs_in_decode_like_the_pipeline(tmp_path: Path, checker: str) -> None:
    model = build_tiny_model(tmp_path / "model", TinySD15Config(safety_checker=checker))
    s = settings("sd15", negatives=False)
    images, _ = run_stages(model, tmp_path / "run", s, PROMPTS[:1], seed=6)
    assert_identical(images, reference_images(model, PROMPTS[:1], 6, **call_kwargs("sd15", s)))
    assert (images[0] == 0).all() == (checker == "flag-all")


# 3. Placement: a denoiser spread over CPU and disk, sharded checkpoints


def denoiser_bytes(model: Path) -> int:
    folder = model / ("unet" if (model / "unet").is_dir() else "transformer")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_denoise_forced_onto_disk_gives_the_same_images(tiny, tmp_path: Path, family: str) -> None:
    model = tiny(family)
    s = settings(family, negatives=False)
    images, stages = run_stages(model, tmp_path, s, PROMPTS[:1], seed=9, max_memory={"cpu": "100KB"})
    assert "disk" in stages["denoise"].device_map.values()
    assert_identical(images, reference_images(model, PROMPTS[:1], 9, **call_kwargs(family, s)))


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_loads_and_gives_the_same_images(tiny, tmp_path: Path, family: str) -> None:
    from stagediff.request import validate_request

    model = tiny(family, max_shard_size="50KB")
    assert list(model.glob("*/*.safetensors.index.json")), "nothing was sharded"
    validate_request(prompts=["a"], model=str(model), run_id="r")  # shards count as safetensors weights
    s = settings(family, negatives=True)
    images, _ = run_stages(model, tmp_path, s, PROMPTS[:1], seed=4, negatives=NEGATIVES[:1])
    expected = reference_images(model, PROMPTS[:1], 4, NEGATIVES[:1], **call_kwargs(family, s))
    assert_identical(images, expected)
    # Same weights as the unsharded model, but at other file offsets: CPU kernels whose rounding depends on
    # the weights' memory alignment may move a pixel by 1.
    unsharded = reference_images(tiny(family), PROMPTS[:1], 4, NEGATIVES[:1], **call_kwargs(family, s))
    assert np.abs(images[0].astype(int) - unsharded[0].astype(int)).max() <= 1


# 4. Through the flow and the command line (each stage in its own process)


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_every_family_bit_identical_with_negative_prompts(
    prefect_server, tiny, tmp_path: Path, family: str
) -> None:
    from tests.reference import run_generate as generate

    model, s = tiny(family), settings(family, negatives=True)
    manifest = generate(
        prompts=PROMPTS, negative_prompts=NEGATIVES, model=str(model), seed=21, out=str(tmp_path), run_id="r",
        **flow_kwargs(s),
    )  # fmt: skip
    assert manifest["status"] == "completed"
    items = read_items(tmp_path / "r")
    expected = reference_images(model, PROMPTS, 21, NEGATIVES, **call_kwargs(family, s))
    assert_identical([read_image(tmp_path / "r" / item["image"]) for item in items], expected)
    without = reference_images(model, PROMPTS[:1], 21, **call_kwargs(family, settings(family, negatives=False)))
    assert not np.array_equal(expected[0], without[0])  # the negative prompt mattered
    assert [item["negative_prompt"] for item in items] == NEGATIVES
    for stage in ("encode", "denoise", "decode"):
        assert set(manifest["stages"][stage]["device_map"].values()) == {"cpu"}
        assert manifest["stages"][stage]["warnings"] == []


def test_flow_spreads_denoiser_over_cpu_and_disk(prefect_server, tiny, tmp_path: Path) -> None:
    from tests.reference import run_generate as generate

    model, s = tiny("sdxl"), settings("sdxl", negatives=False)
    budget = f"{denoiser_bytes(model) // 2}B"  # about half the UNet fits in "CPU memory"; the rest goes to disk
    manifest = generate(
        prompts=PROMPTS, model=str(model), seed=8, max_memory=f"cpu={budget}", offload_dir=str(tmp_path / "offload"),
        out=str(tmp_path), run_id="r", **flow_kwargs(s),
    )  # fmt: skip
    device_map = manifest["stages"]["denoise"]["device_map"]
    assert {"cpu", "disk"} <= set(device_map.values()), device_map
    on_disk = json.loads((tmp_path / "r" / "manifest.json").read_text())["stages"]["denoise"]["device_map"]
    assert on_disk == device_map
    expected = reference_images(model, PROMPTS, 8, **call_kwargs("sdxl", s))
    assert_identical([read_image(tmp_path / "r" / item["image"]) for item in read_items(tmp_path / "r")], expected)


def test_cli_generates_sd3_with_one_negative_prompt_for_all(prefect_server, tiny, tmp_path: Path, capsys) -> None:
    from stagediff.cli import main

    model, s = tiny("sd3"), settings("sd3", negatives=True)
    argv = ["generate", "--model", str(model), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    argv += ["--negative-prompt", "ugly", "--steps", "2", "--guidance", "5", "--height", "64", "--width", "48"]
    argv += ["--max-sequence-length", "24", "--seed", "1", "--out", str(tmp_path), "--run-id", "cli"]
    assert main(argv) == 0
    assert "device map" in capsys.readouterr().out
    items = read_items(tmp_path / "cli")
    assert [item["negative_prompt"] for item in items] == ["ugly", "ugly"]
    expected = reference_images(model, PROMPTS, 1, ["ugly", "ugly"], **call_kwargs("sd3", s))
    assert_identical([read_image(tmp_path / "cli" / item["image"]) for item in items], expected)


# 5. Validation: one-line errors before anything loads


def test_unsupported_pipeline_lists_the_supported_ones(tmp_path: Path) -> None:
    from stagediff.request import RequestError, validate_request

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(RequestError) as error:
        validate_request(prompts=["a"], model=str(tmp_path), run_id="r")
    message = str(error.value)
    assert "KandinskyPipeline" in message and "\n" not in message
    for name in ("FluxPipeline", "StableDiffusion3Pipeline", "StableDiffusionXLPipeline", "StableDiffusionPipeline"):
        assert name in message


@pytest.mark.parametrize(
    ("family", "fields", "parameter"),
    [
        ("sd15", {"negative_prompts": ["x", "y"]}, "negative_prompts"),  # one prompt, two negatives
        ("sdxl", {"true_cfg_scale": 2.0, "negative_prompts": ["x"]}, "true_cfg_scale"),  # Flux only
        ("flux", {"true_cfg_scale": 2.0}, "true_cfg_scale"),  # true CFG needs negatives
        ("flux", {"negative_prompts": ["x"]}, "negative_prompts"),  # Flux negatives need true CFG
        ("flux", {"true_cfg_scale": 0.5, "negative_prompts": ["x"]}, "true_cfg_scale"),
        ("sd15", {"original_size": (512, 512)}, "original_size"),  # SDXL micro-conditioning only
        ("sd3", {"crops_coords_top_left": (4, 4)}, "crops_coords_top_left"),
        ("sdxl", {"target_size": (0, 64)}, "target_size"),
        ("sdxl", {"negative_prompts": ["a\x00b"]}, "negative_prompts[0]"),
    ],
)
def test_family_options_are_checked(tiny, family: str, fields: dict, parameter: str) -> None:
    from stagediff.request import RequestError, validate_request

    with pytest.raises(RequestError) as error:
        validate_request(prompts=["a"], model=str(tiny(family)), run_id="r", **fields)
    assert error.value.parameter.startswith(parameter.split("[")[0]) and "\n" not in str(error.value)


def test_family_options_that_are_accepted(tiny) -> None:
    from stagediff.request import validate_request

    flux = validate_request(
        prompts=["a", "b"], negative_prompts=["x", ""], true_cfg_scale=4.0, model=str(tiny("flux")), run_id="r"
    )
    assert flux.negative_prompts == ["x", ""]
    sdxl = validate_request(
        prompts=["a"], original_size=[1024, 1024], target_size=(512, 512), model=str(tiny("sdxl")), run_id="r"
    )
    assert sdxl.settings.original_size == (1024, 1024)


def test_cli_negative_prompt_once_or_once_per_prompt(capsys) -> None:
    from stagediff.cli import check_negative_prompts, main
    from stagediff.request import RequestError

    assert check_negative_prompts(["n"], 3, from_file=False) == ["n"]  # one for all: each item takes it
    assert check_negative_prompts(["n"], 3, from_file=True) == ["n"]
    assert check_negative_prompts(["x", "y"], 2, from_file=False) == ["x", "y"]
    assert check_negative_prompts(None, 1, from_file=False) is None
    for count, from_file in ((3, False), (2, True)):
        with pytest.raises(RequestError, match="negative_prompt"):
            check_negative_prompts(["x", "y"], count, from_file=from_file)
    argv = ["generate", "--prompt", "a", "--prompt", "b", "--prompt", "c", "--negative-prompt", "x"]
    assert main([*argv, "--negative-prompt", "y"]) == 2
    assert "negative_prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a", "--original-size", "big"]) == 2


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_cli_tiny_model_builds_each_family(tmp_path: Path, family: str, capsys) -> None:
    from stagediff.cli import main
    from stagediff.request import validate_request

    assert main(["tiny-model", str(tmp_path / family), "--family", family]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == family
    validate_request(prompts=["a"], model=str(tmp_path / family), run_id="r")


def test_flow_process_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, stagediff.flows.generate, stagediff.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
