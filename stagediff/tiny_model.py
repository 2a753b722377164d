"""Build a tiny, seeded, randomly initialised FluxPipeline in diffusers format, fully offline.

The components have the *shapes of roles* of FLUX.1-dev (a CLIP-L-style text encoder for the pooled
embedding, a T5-style encoder for the sequence, a FluxTransformer2DModel, an AutoencoderKL with
`vae_scale_factor` 8 and the flow-matching scheduler) but are a few hundred kilobytes. Tokenizers are
built locally: a byte-level BPE for CLIP and a Unigram vocabulary for T5. Same config, same bytes.
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


def build_components(config: TinyFluxConfig) -> dict:
    """Return the seeded FluxPipeline components for `config`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if sum(config.axes_dims_rope) != config.attention_head_dim:
        raise ValueError(f"axes_dims_rope={config.axes_dims_rope} must sum to {config.attention_head_dim}")
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()

    torch.manual_seed(config.seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.clip_hidden,
            intermediate_size=config.clip_hidden * 2,
            num_hidden_layers=config.clip_layers,
            num_attention_heads=config.clip_heads,
            max_position_embeddings=77,
            projection_dim=config.clip_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(config.seed + 1)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=config.t5_hidden,
            d_kv=config.t5_hidden // config.t5_heads,
            d_ff=config.t5_hidden * 2,
            num_layers=config.t5_layers,
            num_heads=config.t5_heads,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
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
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=min(config.vae_channels),
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,  # FLUX.1 VAE values
        shift_factor=0.1159,
        sample_size=64,
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


def build_tiny_flux(out_dir: str | Path, config: TinyFluxConfig | None = None) -> Path:
    """Write the tiny pipeline to `out_dir` atomically (built in a temporary sibling, then renamed)."""
    from diffusers import FluxPipeline

    config = config or TinyFluxConfig()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        FluxPipeline(**build_components(config)).save_pretrained(tmp, safe_serialization=True)
        (tmp / "stagediff_tiny.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
