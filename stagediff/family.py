"""What differs between model families, in one place.

A family is a small class that says which components each stage loads, which tensors `encode`
persists, what `denoise` passes to the pipeline besides them, and how `decode` un-scales the latents.
`encode` names its tensors like the pipeline's own keyword arguments (`prompt_embeds`,
`negative_prompt_embeds`, `pooled_prompt_embeds`, ...), so `denoise` hands them straight back and the
pipeline never needs a text encoder. Everything else is shared by the stages.

This module is torch-free at import time: the flow's process reads the class attributes to validate a
request; the methods run only inside the stage processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from stagediff.jobs import DenoiseSettings

log = logging.getLogger("stagediff.stages")


class Family:
    """The members every family defines (the defaults are the common case)."""

    pipeline_class: ClassVar[str]  # model_index.json's `_class_name`
    denoiser: ClassVar[str]  # what `denoise` loads besides the scheduler: "transformer" or "unet"
    text_components: ClassVar[tuple[str, ...]]  # what `encode` loads: the tokenizers and text encoders
    decode_components: ClassVar[tuple[str, ...]] = ("vae",)  # what `decode` loads (those present on disk)
    true_cfg: ClassVar[bool] = False  # takes `true_cfg_scale` with negative prompts (FLUX.1-dev)
    micro_conditioning: ClassVar[bool] = False  # takes original size, crop and target size (SDXL)
    upcast_vae: ClassVar[bool] = False  # decodes a float16 VAE with `force_upcast` in float32 (SDXL)
    # The pipeline's own defaults for what a user leaves out (its `__call__` signature; tests compare them).
    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float]
    default_max_sequence_length: ClassVar[int] = 77  # CLIP-only families: the tokenizers' fixed length
    # The denoiser's block lists, in forward order, over which pipeline stages split it: (list, config count).
    # Empty: it cannot be split (a UNet's skip connections cross its blocks).
    denoiser_blocks: ClassVar[tuple[tuple[str, str], ...]] = ()
    denoiser_packs_latents: ClassVar[bool] = False  # the pipeline packs 2x2 latent patches into a token (Flux)
    block_cache: ClassVar[bool] = False  # the denoiser takes diffusers' cache configs (its class is a CacheMixin)

    @classmethod
    def denoiser_config(cls, model: str | Path) -> dict[str, Any]:
        """The denoiser's config.json."""
        return json.loads((Path(model) / cls.denoiser / "config.json").read_text())

    @classmethod
    def block_names(cls, model: str | Path) -> list[str]:
        """The denoiser's blocks in forward order ("transformer_blocks.0", ...), from its config."""
        config = cls.denoiser_config(model)
        return [f"{name}.{i}" for name, count in cls.denoiser_blocks for i in range(int(config[count]))]

    @classmethod
    def default_size(cls, model: str | Path) -> tuple[int, int]:
        """(height, width) when none is given: the denoiser's `sample_size` (in latents) x the VAE's scale."""
        config = cls.denoiser_config(model)
        size = config.get("sample_size") or 128
        height, width = (size, size) if isinstance(size, int) else size
        return height * vae_scale_factor(model), width * vae_scale_factor(model)

    @classmethod
    def required_components(cls) -> tuple[str, ...]:
        """Components that must be on disk for every stage to run."""
        return ("scheduler", "vae", cls.denoiser, *cls.text_components)

    @staticmethod
    def encode(
        pipe: Any, prompts: list[str], negative_prompts: list[str] | None, max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        """Batched embeddings, exactly as the pipeline computes them inside `__call__`."""
        raise NotImplementedError

    @staticmethod
    def denoise_kwargs(embeddings: dict[str, torch.Tensor], settings: DenoiseSettings) -> dict[str, Any]:
        """Pipeline keyword arguments: the persisted embeddings plus the family's own settings."""
        raise NotImplementedError

    @staticmethod
    def latents_for_vae(latents: torch.Tensor, vae_config: Any, height: int, width: int) -> torch.Tensor:
        """The denoiser's latents -> un-scaled VAE input (B, C, H/8, W/8)."""
        raise NotImplementedError

    @staticmethod
    def postprocess(pipe: Any, image: torch.Tensor) -> list[Any]:
        """Decoded images (B, 3, H, W) in [-1, 1] -> PIL images, as the pipeline does after `vae.decode`."""
        return pipe.image_processor.postprocess(image, output_type="pil")


class Flux(Family):
    """FLUX.1: CLIP-L pooled + T5 sequence; distilled `guidance_scale`, optional true CFG."""

    pipeline_class = "FluxPipeline"
    denoiser = "transformer"
    denoiser_blocks = (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers"))
    denoiser_packs_latents = True
    block_cache = True
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    true_cfg = True
    default_steps = 28
    default_guidance = 3.5
    default_max_sequence_length = 512

    @classmethod
    def default_size(cls, model: str | Path) -> tuple[int, int]:
        size = 128 * vae_scale_factor(model)  # FluxPipeline.default_sample_size is fixed
        return size, size

    @staticmethod
    def encode(
        pipe: Any, prompts: list[str], negative_prompts: list[str] | None, max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        # prompt_embeds (B, seq, t5_dim), pooled_prompt_embeds (B, clip_dim); negatives only when given:
        # FLUX.1-dev is guidance-distilled and runs a negative pass only for true CFG.
        out = {}
        for prefix, texts in (("", prompts), ("negative_", negative_prompts)):
            if texts is not None:
                embeds, pooled, _ = pipe.encode_prompt(
                    prompt=texts, prompt_2=None, max_sequence_length=max_sequence_length
                )
                out |= {f"{prefix}prompt_embeds": embeds, f"{prefix}pooled_prompt_embeds": pooled}
        return out

    @staticmethod
    def denoise_kwargs(embeddings: dict[str, torch.Tensor], settings: DenoiseSettings) -> dict[str, Any]:
        return dict(
            embeddings,
            guidance_scale=settings.guidance,
            true_cfg_scale=settings.true_cfg_scale,
            max_sequence_length=settings.max_sequence_length,
        )

    @staticmethod
    def latents_for_vae(latents: torch.Tensor, vae_config: Any, height: int, width: int) -> torch.Tensor:
        from diffusers import FluxPipeline

        # packed (B, seq, 4C) -> (B, C, H/8, W/8)
        vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        latents = FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor)
        return latents / vae_config.scaling_factor + vae_config.shift_factor


class SD3(Family):
    """Stable Diffusion 3: two CLIPs (pooled + sequence) and T5, concatenated; classifier-free guidance."""

    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    denoiser_blocks = (("transformer_blocks", "num_layers"),)
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    default_steps = 28
    default_guidance = 7.0
    default_max_sequence_length = 256

    @staticmethod
    def encode(
        pipe: Any, prompts: list[str], negative_prompts: list[str] | None, max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        # prompt_embeds (B, 77 + seq, t5_dim), pooled_prompt_embeds (B, clip_dim + clip_2_dim), and the same
        # for the negatives; without negative prompts the pipeline encodes "" (here, not in `denoise`).
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompts,
            max_sequence_length=max_sequence_length,
        )
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    @staticmethod
    def denoise_kwargs(embeddings: dict[str, torch.Tensor], settings: DenoiseSettings) -> dict[str, Any]:
        return dict(embeddings, guidance_scale=settings.guidance, max_sequence_length=settings.max_sequence_length)

    @staticmethod
    def latents_for_vae(latents: torch.Tensor, vae_config: Any, height: int, width: int) -> torch.Tensor:
        return latents / vae_config.scaling_factor + vae_config.shift_factor


class SDXL(Family):
    """SDXL: two CLIPs (penultimate states concatenated, pooled from the second); micro-conditioning."""

    pipeline_class = "StableDiffusionXLPipeline"
    denoiser = "unet"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    micro_conditioning = True
    upcast_vae = True
    default_guidance = 5.0

    @staticmethod
    def encode(
        pipe: Any, prompts: list[str], negative_prompts: list[str] | None, max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        # prompt_embeds (B, 77, clip_dim + clip_2_dim), pooled_prompt_embeds (B, clip_2_projection), and the
        # negatives: zeros when there is no negative prompt and `force_zeros_for_empty_prompt` is set.
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, do_classifier_free_guidance=True, negative_prompt=negative_prompts
        )
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    @staticmethod
    def denoise_kwargs(embeddings: dict[str, torch.Tensor], settings: DenoiseSettings) -> dict[str, Any]:
        # The pipeline builds `add_time_ids` from these sizes and the pooled embedding's width.
        return dict(
            embeddings,
            guidance_scale=settings.guidance,
            original_size=settings.original_size,
            crops_coords_top_left=settings.crops_coords_top_left,
            target_size=settings.target_size,
        )

    @staticmethod
    def latents_for_vae(latents: torch.Tensor, vae_config: Any, height: int, width: int) -> torch.Tensor:
        import torch

        if vae_config.latents_mean is not None and vae_config.latents_std is not None:
            mean = torch.tensor(vae_config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(vae_config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            return latents * std / vae_config.scaling_factor + mean
        return latents / vae_config.scaling_factor

    @staticmethod
    def postprocess(pipe: Any, image: torch.Tensor) -> list[Any]:
        if pipe.watermark is not None:  # diffusers adds it when invisible-watermark is installed
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")


class SD15(Family):
    """Stable Diffusion 1.5: one CLIP (last hidden state); classifier-free guidance; optional safety checker."""

    pipeline_class = "StableDiffusionPipeline"
    denoiser = "unet"
    text_components = ("text_encoder", "tokenizer")
    decode_components = ("vae", "safety_checker", "feature_extractor")
    default_guidance = 7.5

    @staticmethod
    def encode(
        pipe: Any, prompts: list[str], negative_prompts: list[str] | None, max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        # prompt_embeds and negative_prompt_embeds (B, 77, clip_dim); no negative prompt means "".
        embeds, negative_embeds = pipe.encode_prompt(
            prompt=prompts,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompts,
        )
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}

    @staticmethod
    def denoise_kwargs(embeddings: dict[str, torch.Tensor], settings: DenoiseSettings) -> dict[str, Any]:
        return dict(embeddings, guidance_scale=settings.guidance)

    @staticmethod
    def latents_for_vae(latents: torch.Tensor, vae_config: Any, height: int, width: int) -> torch.Tensor:
        return latents / vae_config.scaling_factor

    @staticmethod
    def postprocess(pipe: Any, image: torch.Tensor) -> list[Any]:
        # The safety checker (when the model has one) blacks out flagged images, as in the pipeline.
        image, nsfw = pipe.run_safety_checker(image, image.device, image.dtype)
        if nsfw is not None and any(nsfw):
            log.warning("the safety checker blacked out %d of %d images", sum(nsfw), len(nsfw))
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize)


FAMILIES: dict[str, type[Family]] = {f.pipeline_class: f for f in (Flux, SD3, SDXL, SD15)}


def model_index(model: str | Path) -> dict[str, Any]:
    return json.loads((Path(model) / "model_index.json").read_text())


def family_for(model: str | Path) -> type[Family]:
    class_name = model_index(model).get("_class_name")
    if class_name not in FAMILIES:
        raise ValueError(f"pipeline {class_name!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[class_name]


def vae_scale_factor(model: str | Path) -> int:
    """The VAE's spatial downscale, read from its config without loading its weights."""
    config = json.loads((Path(model) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)
