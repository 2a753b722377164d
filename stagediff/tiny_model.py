"""Build tiny, seeded, randomly initialised pipelines of every supported family, fully offline.

The components have the *shapes of roles* of the real checkpoints (FLUX.1-dev, Stable Diffusion 3,
SDXL, Stable Diffusion 1.5: the same component classes, text encoders, VAE scaling and scheduler
configs) but are a few hundred kilobytes. Tokenizers are built locally: a byte-level BPE for CLIP and a
Unigram vocabulary for T5. Same config, same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Words that get their own Unigram piece in the T5 vocabulary; everything else falls back to characters.
_T5_WORDS = [
    *("a", "an", "the", "of", "and", "in", "on", "with", "dog", "cat", "photo", "portrait"),
    *("city", "night", "red", "blue", "green", "forest", "sky"),
]


@dataclass(frozen=True)
class TinyFluxConfig:
    seed: int = 0
    clip_hidden: int = 32  # CLIP-L: 768; also the transformer's pooled_projection_dim
    clip_layers: int = 2
    clip_heads: int = 4
    t5_hidden: int = 32  # T5-XXL: 4096; also the transformer's joint_attention_dim
    t5_layers: int = 2
    t5_heads: int = 4
    latent_channels: int = 4  # FLUX.1 VAE: 16
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # 4 levels -> vae_scale_factor 8, like the real VAE
    transformer_layers: int = 1  # FLUX.1: 19
    transformer_single_layers: int = 1  # FLUX.1: 38
    attention_head_dim: int = 16  # FLUX.1: 128
    attention_heads: int = 2  # FLUX.1: 24
    axes_dims_rope: tuple[int, int, int] = (4, 4, 8)  # must sum to attention_head_dim
    guidance_embeds: bool = True  # FLUX.1-dev is guidance-distilled


@dataclass(frozen=True)
class TinySD3Config:
    seed: int = 0
    clip_hidden: int = 32  # text_encoder, CLIP-L: 768 (with projection)
    clip_2_hidden: int = 32  # text_encoder_2, OpenCLIP bigG: 1280 (with projection)
    clip_layers: int = 2
    clip_heads: int = 4
    t5_hidden: int = 64  # T5-XXL: 4096; >= clip_hidden + clip_2_hidden (CLIP embeddings are padded to it)
    t5_layers: int = 2
    t5_heads: int = 4
    latent_channels: int = 4  # SD3 VAE: 16
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # vae_scale_factor 8
    transformer_layers: int = 1  # SD3 medium: 24
    attention_head_dim: int = 8  # 64
    attention_heads: int = 4  # 24
    patch_size: int = 2
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 medium: 0-12 (MMDiT-X: a second self-attention)
    qk_norm: str | None = None  # SD3.5: "rms_norm"


@dataclass(frozen=True)
class TinySDXLConfig:
    seed: int = 0
    clip_hidden: int = 32  # text_encoder, CLIP-L: 768
    clip_2_hidden: int = 32  # text_encoder_2, OpenCLIP bigG: 1280 (with projection: the pooled embedding)
    clip_layers: int = 2  # SDXL takes the penultimate hidden state, so at least 2
    clip_heads: int = 4
    unet_channels: tuple[int, ...] = (16, 32)  # SDXL: (320, 640, 1280)
    attention_head_dim: tuple[int, ...] = (2, 4)  # heads per level; SDXL: (5, 10, 20)
    addition_time_embed_dim: int = 8  # SDXL: 256
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # vae_scale_factor 8
    latents_mean: tuple[float, ...] | None = None  # 4 values, as in some SDXL fine-tunes (Playground v2.5)
    latents_std: tuple[float, ...] | None = None
    force_zeros_for_empty_prompt: bool = True  # SDXL base: zeros as negatives when no negative prompt


@dataclass(frozen=True)
class TinySD15Config:
    seed: int = 0
    clip_hidden: int = 32  # CLIP-L: 768; also the UNet's cross_attention_dim
    clip_layers: int = 2
    clip_heads: int = 4
    unet_channels: tuple[int, ...] = (16, 32)  # SD 1.5: (320, 640, 1280, 1280)
    attention_head_dim: int = 4  # SD 1.5: 8
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # vae_scale_factor 8
    scheduler: str = "pndm"  # SD 1.5 ships PNDM; "ddim" and "euler" are common swaps
    prediction_type: str = "epsilon"  # SD 2.x 768: "v_prediction"
    use_linear_projection: bool = False  # SD 2.x: True
    upcast_attention: bool = False  # SD 2.1: True
    safety_checker: str | None = None  # None (many fine-tunes), "pass" (flags nothing) or "flag-all" (blacks out all)


TinyConfig = TinyFluxConfig | TinySD3Config | TinySDXLConfig | TinySD15Config
# `stagediff tiny-model --family NAME` -> the config class of that family.
TINY_CONFIGS: dict[str, type] = {
    "flux": TinyFluxConfig,
    "sd3": TinySD3Config,
    "sdxl": TinySDXLConfig,
    "sd15": TinySD15Config,
}


def _clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in _T5_WORDS]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces += [("\u2581" + c, -6.0), (c, -5.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_encoder(tokenizer, hidden: int, layers: int, heads: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _t5_encoder(tokenizer, hidden: int, layers: int, heads: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=hidden,
            d_kv=hidden // heads,
            d_ff=hidden * 2,
            num_layers=layers,
            num_heads=heads,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _vae(channels: tuple[int, ...], latent_channels: int, **config):
    """An AutoencoderKL with len(channels) levels (vae_scale_factor 2 ** (levels - 1))."""
    from diffusers import AutoencoderKL

    levels = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(channels),
        sample_size=64,
        **config,
    )


def _sd_scheduler(kind: str, prediction_type: str = "epsilon"):
    """The DDPM-family schedulers of SD 1.5 and SDXL, with their released configs."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  prediction_type=prediction_type)  # fmt: skip
    if kind == "pndm":  # SD 1.5
        return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    if kind == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "euler":  # SDXL
        return EulerDiscreteScheduler(**common, steps_offset=1, timestep_spacing="leading")
    raise ValueError(f"scheduler={kind!r}: one of pndm, ddim, euler")


def build_components(config: TinyFluxConfig) -> dict:
    """Return the seeded FluxPipeline components for `config`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if sum(config.axes_dims_rope) != config.attention_head_dim:
        raise ValueError(f"axes_dims_rope={config.axes_dims_rope} must sum to {config.attention_head_dim}")
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()

    torch.manual_seed(config.seed)
    text_encoder = _clip_encoder(tokenizer, config.clip_hidden, config.clip_layers, config.clip_heads)
    torch.manual_seed(config.seed + 1)
    text_encoder_2 = _t5_encoder(tokenizer_2, config.t5_hidden, config.t5_layers, config.t5_heads)
    torch.manual_seed(config.seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * config.latent_channels,  # 2x2 packed latents
        num_layers=config.transformer_layers,
        num_single_layers=config.transformer_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.attention_heads,
        joint_attention_dim=config.t5_hidden,
        pooled_projection_dim=config.clip_hidden,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=config.axes_dims_rope,
    )
    torch.manual_seed(config.seed + 3)
    vae = _vae(  # FLUX.1 VAE values
        config.vae_channels,
        config.latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_sd3_components(config: TinySD3Config) -> dict:
    """Return the seeded StableDiffusion3Pipeline components for `config`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    if config.t5_hidden < config.clip_hidden + config.clip_2_hidden:
        raise ValueError(f"t5_hidden={config.t5_hidden} must be >= clip_hidden + clip_2_hidden")
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    clip = (config.clip_layers, config.clip_heads)

    torch.manual_seed(config.seed)
    text_encoder = _clip_encoder(tokenizer, config.clip_hidden, *clip, with_projection=True)
    torch.manual_seed(config.seed + 1)
    text_encoder_2 = _clip_encoder(tokenizer_2, config.clip_2_hidden, *clip, with_projection=True)
    torch.manual_seed(config.seed + 2)
    text_encoder_3 = _t5_encoder(tokenizer_3, config.t5_hidden, config.t5_layers, config.t5_heads)
    torch.manual_seed(config.seed + 3)
    inner = config.attention_heads * config.attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=config.patch_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        num_layers=config.transformer_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.attention_heads,
        joint_attention_dim=config.t5_hidden,
        caption_projection_dim=inner,
        pooled_projection_dim=config.clip_hidden + config.clip_2_hidden,
        pos_embed_max_size=32,
        dual_attention_layers=config.dual_attention_layers,
        qk_norm=config.qk_norm,
    )
    torch.manual_seed(config.seed + 4)
    vae = _vae(  # SD3 VAE values
        config.vae_channels,
        config.latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's scheduler config
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        transformer=transformer,
    )


def build_sdxl_components(config: TinySDXLConfig) -> dict:
    """Return the seeded StableDiffusionXLPipeline components (and its config flag) for `config`."""
    from diffusers import UNet2DConditionModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    clip = (config.clip_layers, config.clip_heads)

    torch.manual_seed(config.seed)
    text_encoder = _clip_encoder(tokenizer, config.clip_hidden, *clip)
    torch.manual_seed(config.seed + 1)
    text_encoder_2 = _clip_encoder(tokenizer_2, config.clip_2_hidden, *clip, with_projection=True)
    torch.manual_seed(config.seed + 2)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=config.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(config.unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(config.unet_channels) - 1) + ("UpBlock2D",),
        attention_head_dim=config.attention_head_dim,
        use_linear_projection=True,
        norm_num_groups=min(config.unet_channels),
        cross_attention_dim=config.clip_hidden + config.clip_2_hidden,  # both encoders' states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=config.addition_time_embed_dim,
        # 6 micro-conditioning numbers (original size, crop, target size) + the pooled embedding
        projection_class_embeddings_input_dim=6 * config.addition_time_embed_dim + config.clip_2_hidden,
    )
    torch.manual_seed(config.seed + 3)
    vae = _vae(  # SDXL VAE values
        config.vae_channels,
        4,
        scaling_factor=0.13025,
        force_upcast=True,
        latents_mean=config.latents_mean,
        latents_std=config.latents_std,
    )
    return dict(
        scheduler=_sd_scheduler("euler"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        unet=unet,
        force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt,
    )


def build_sd15_components(config: TinySD15Config) -> dict:
    """Return the seeded StableDiffusionPipeline components for `config` (no safety checker)."""
    from diffusers import UNet2DConditionModel

    tokenizer = _clip_tokenizer()

    torch.manual_seed(config.seed)
    text_encoder = _clip_encoder(tokenizer, config.clip_hidden, config.clip_layers, config.clip_heads)
    torch.manual_seed(config.seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=config.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (len(config.unet_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(config.unet_channels) - 1),
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=min(config.unet_channels),
        cross_attention_dim=config.clip_hidden,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
    )
    torch.manual_seed(config.seed + 2)
    vae = _vae(config.vae_channels, 4, scaling_factor=0.18215)  # SD 1.5 VAE values
    torch.manual_seed(config.seed + 3)
    safety_checker, feature_extractor = _safety_checker(config.safety_checker)
    return dict(
        scheduler=_sd_scheduler(config.scheduler, config.prediction_type),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=safety_checker is not None,
    )


def _safety_checker(kind: str | None):
    """SD 1.5's NSFW checker (a CLIP vision tower scored against concept embeddings) and its image processor."""
    if kind is None:
        return None, None
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32)
    config = CLIPConfig(text_config=dict(hidden_size=32), vision_config=dict(vision, patch_size=8), projection_dim=32)
    checker = StableDiffusionSafetyChecker(config)
    if kind == "flag-all":  # an image is flagged when its cosine to a concept exceeds the concept's weight
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-1.0)
    elif kind != "pass":
        raise ValueError(f"safety_checker={kind!r}: one of None, 'pass', 'flag-all'")
    return checker, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


# config class -> (pipeline class, components builder)
_BUILDERS = {
    TinyFluxConfig: ("FluxPipeline", build_components),
    TinySD3Config: ("StableDiffusion3Pipeline", build_sd3_components),
    TinySDXLConfig: ("StableDiffusionXLPipeline", build_sdxl_components),
    TinySD15Config: ("StableDiffusionPipeline", build_sd15_components),
}


def build_tiny_model(out_dir: str | Path, config: TinyConfig, max_shard_size: str | None = None) -> Path:
    """Write the tiny pipeline of `config`'s family to `out_dir` atomically (built in a temporary sibling,
    then renamed). `max_shard_size` (e.g. "50KB") splits each weighted component into shards."""
    import diffusers

    pipeline_class, components = _BUILDERS[type(config)]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe = getattr(diffusers, pipeline_class)(**components(config))
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        (tmp / "stagediff_tiny.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty folder: nothing is lost
        if out_dir.exists() or out_dir.is_symlink():  # never delete or overwrite what is there
            raise FileExistsError(f"{out_dir} already exists; the tiny model was not written")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_tiny_flux(out_dir: str | Path, config: TinyFluxConfig | None = None) -> Path:
    """The tiny FluxPipeline (the embedded default model)."""
    return build_tiny_model(out_dir, config or TinyFluxConfig())


def build_tiny_family(out_dir: str | Path, family: str = "flux", seed: int = 0) -> Path:
    """The default tiny model of `family` ("flux", "sd3", "sdxl" or "sd15") with `seed`."""
    return build_tiny_model(out_dir, TINY_CONFIGS[family](seed=seed))
