"""Imported once by the stage forkserver so that forked stages start without paying for imports.

Import only; never touch an accelerator here (CUDA must not be initialised before a fork).
"""

import os

# Ask NVML, not the CUDA driver, whether CUDA exists: then no import below can initialise CUDA
# in the forkserver (a forked child could not use it).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import PIL.Image  # noqa: F401
import safetensors.torch  # noqa: F401
import torch  # noqa: F401
from accelerate import init_empty_weights  # noqa: F401
from diffusers import (  # noqa: F401
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer  # noqa: F401

import stagediff.stages  # noqa: F401
