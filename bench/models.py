"""The benchmarks' mid-sized model: random weights, FLUX.1-dev's component proportions, a few GB.

FLUX.1-dev holds ~11.9B transformer, ~4.7B T5-XXL, ~0.12B CLIP-L and ~0.08B VAE parameters. This
model keeps the transformer at ~2.7x the T5 encoder and the CLIP encoder and VAE at ~1% of it, with
FLUX's head size (128), rope axes and VAE depth (scale factor 8), in float32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

from stagediff.default_model import cache_dir
from stagediff.tiny_model import TinyFluxConfig, build_tiny_flux

MID_FLUX = TinyFluxConfig(
    seed=0,
    clip_hidden=256,
    clip_layers=6,
    clip_heads=4,
    t5_hidden=1024,
    t5_layers=12,
    t5_heads=16,
    latent_channels=16,
    vae_channels=(32, 64, 128, 128),
    transformer_layers=10,
    transformer_single_layers=20,
    attention_head_dim=128,
    attention_heads=6,
    axes_dims_rope=(16, 56, 56),
    guidance_embeds=True,
)


def mid_flux() -> Path:
    """Build the mid-sized model once into the stagediff cache; return its folder."""
    path = cache_dir() / "bench" / "mid-flux-v1"
    if not (path / "model_index.json").exists():
        print(f"building the mid-sized model into {path} (once)...", flush=True)
        build_tiny_flux(path, MID_FLUX)
    return path


def component_sizes(model: Path) -> dict[str, float]:
    """Weight bytes per component, in MB."""
    return {
        folder.name: round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20, 1)
        for folder in sorted(model.iterdir())
        if folder.is_dir() and any(folder.glob("*.safetensors"))
    }
