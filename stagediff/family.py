"""What differs between model families, in one place: which classes load, which tensors `encode`
persists, what `denoise` feeds the pipeline, and how `decode` un-scales the latents.

Only FLUX.1 is wired today; a family is a small class with these five members.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Flux:
    pipeline_class = "FluxPipeline"
    denoiser = "transformer"  # the component `denoise` loads (a UNet for SD 1.5/SDXL)

    @staticmethod
    def pipeline_cls() -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    @staticmethod
    def denoiser_cls() -> type:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    @staticmethod
    def encode(pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """Batched text embeddings: prompt_embeds (B, seq, t5_dim), pooled_prompt_embeds (B, clip_dim)."""
        prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, max_sequence_length=max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}

    @staticmethod
    def denoise_kwargs(embeddings: dict[str, torch.Tensor], guidance: float, max_sequence_length: int) -> dict:
        return dict(
            prompt_embeds=embeddings["prompt_embeds"],
            pooled_prompt_embeds=embeddings["pooled_prompt_embeds"],
            guidance_scale=guidance,
            max_sequence_length=max_sequence_length,
        )

    @staticmethod
    def latents_for_vae(latents: torch.Tensor, vae_config: Any, height: int, width: int) -> torch.Tensor:
        """Packed (B, seq, 4C) transformer latents -> un-scaled (B, C, H/8, W/8) VAE input."""
        from diffusers import FluxPipeline

        vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        latents = FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor)
        return latents / vae_config.scaling_factor + vae_config.shift_factor


FAMILIES = {Flux.pipeline_class: Flux}


def family_for(model: str | Path) -> type[Flux]:
    class_name = json.loads((Path(model) / "model_index.json").read_text())["_class_name"]
    return FAMILIES[class_name]


def vae_scale_factor(model: str | Path) -> int:
    """The VAE's spatial downscale, read from its config without loading its weights."""
    config = json.loads((Path(model) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)
