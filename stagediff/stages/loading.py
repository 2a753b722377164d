"""Loading a pipeline with only the components a stage uses."""

from __future__ import annotations

from typing import Any

from stagediff.family import family_for, model_index
from stagediff.jobs import StageContext
from stagediff.stages.devices import torch_dtype


def load_pipeline(ctx: StageContext, keep: tuple[str, ...], **kwargs: Any):
    """The model's pipeline with only the `keep` components (and the scheduler) loaded from disk.

    Every other component is None, so a stage never loads weights it does not use; `kwargs` go to
    `from_pretrained` (already loaded components, `device_map`, `max_memory`).
    """
    import diffusers

    family = family_for(ctx.model)
    index = model_index(ctx.model)
    skipped = {
        name: None
        for name, entry in index.items()
        if isinstance(entry, list) and name not in (*keep, "scheduler") and name not in kwargs
    }
    if index.get("requires_safety_checker") and "safety_checker" not in keep:
        skipped["requires_safety_checker"] = False  # SD 1.5: the checker runs in `decode`, not missing here
    # ctx.model is a folder (a Hub id is resolved to its snapshot at ctx.revision before the stages), for which
    # from_pretrained ignores `revision`; every from_pretrained still gets it, should a Hub id ever reach a stage
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        ctx.model,
        dtype=torch_dtype(ctx.dtype),
        use_safetensors=True,
        variant=ctx.variant,
        revision=ctx.revision,
        **skipped,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quantization_config(ctx: StageContext, library: str) -> Any:
    """`ctx.quantize` as diffusers' (`library="diffusers"`) or transformers' quantization config: torchao's int8
    dynamic (int8 weights and activations), int8 weight-only and float8 dynamic; bitsandbytes' nf4."""
    import importlib

    lib = importlib.import_module(library)
    if ctx.quantize == "nf4":
        return lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch_dtype(ctx.dtype))  # fmt: skip
    import logging

    # torchao warns at import about each of its CUDA kernel libraries that a CPU build of torch cannot load
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao import quantization as ao

    configs = {"int8": ao.Int8DynamicActivationInt8WeightConfig, "int8-weight": ao.Int8WeightOnlyConfig,
               "float8": ao.Float8DynamicActivationFloat8WeightConfig}  # fmt: skip
    return lib.TorchAoConfig(configs[ctx.quantize]())


def quantized_text_encoders(ctx: StageContext) -> dict[str, Any]:
    """`from_pretrained` keywords quantizing the text encoders `ctx.quantized` names (none: no keywords)."""
    encoders = [name for name in ctx.quantized if name != ctx.denoiser]
    if not encoders:
        return {}
    from diffusers import PipelineQuantizationConfig

    mapping = {name: quantization_config(ctx, "transformers") for name in encoders}
    return {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)}


def denoiser_class(model: str) -> type:
    """The denoiser's diffusers class, as model_index.json names it (checked against diffusers before a run)."""
    import diffusers

    _, class_name = model_index(model)[family_for(model).denoiser]
    return getattr(diffusers, class_name)


def empty_denoiser(model: str):
    """The denoiser built from its config on the meta device: its structure and sizes, no weights."""
    from accelerate import init_empty_weights

    cls = denoiser_class(model)
    with init_empty_weights():
        return cls.from_config(cls.load_config(model, subfolder=family_for(model).denoiser))


def load_denoiser_model(ctx: StageContext, **kwargs: Any):
    """The denoiser alone, from safetensors in the run's dtype, variant and revision; `kwargs` go to
    `from_pretrained` (`device_map`, `offload_folder`); quantized as it loads when `ctx.quantized` names it."""
    if ctx.denoiser in ctx.quantized:
        kwargs["quantization_config"] = quantization_config(ctx, "diffusers")
    return denoiser_class(ctx.model).from_pretrained(
        ctx.model,
        subfolder=family_for(ctx.model).denoiser,
        dtype=torch_dtype(ctx.dtype),
        use_safetensors=True,
        variant=ctx.variant,
        revision=ctx.revision,
        **kwargs,
    )


def quiet_progress_bars() -> None:
    """Stage logs go to the flow run; loading bars on the terminal would only interleave with them."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


quiet_progress_bars()
