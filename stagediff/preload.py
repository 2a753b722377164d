"""What the stage forkserver imports once so that forked stages start without paying for imports.

Besides what every stage uses, it imports the classes the stages will load: those named in the
model_index.json of `$STAGEDIFF_PRELOAD_MODEL` (set by `isolation.warm_up(model)`), or, without a
readable one, those of every supported family. Import only; never touch an accelerator here (CUDA
must not be initialised before a fork).
"""

import contextlib
import gc
import importlib
import json
import os
import sys
from pathlib import Path

# Ask NVML, not the CUDA driver, whether CUDA exists: then no import below can initialise CUDA
# in the forkserver (a forked child could not use it).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import PIL.Image  # noqa: F401
import safetensors.torch  # noqa: F401
import torch
from accelerate import init_empty_weights  # noqa: F401

import stagediff.stages  # noqa: F401

LIBRARIES = ("diffusers", "transformers")  # never a module a model file names otherwise (remote code)
EVERY_FAMILY = {
    "diffusers": [
        *("AutoencoderKL", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "PNDMScheduler"),
        *("FluxPipeline", "FluxTransformer2DModel", "SD3Transformer2DModel", "StableDiffusion3Pipeline"),
        *("StableDiffusionPipeline", "StableDiffusionXLPipeline", "UNet2DConditionModel"),
    ],
    "transformers": ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "T5EncoderModel", "T5Tokenizer"],
}


def classes_of(model: str | None) -> dict[str, list[str]]:
    """Library -> class names: the pipeline and components a model_index.json names."""
    try:
        index = json.loads((Path(model) / "model_index.json").read_text()) if model else None
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        return EVERY_FAMILY
    wanted: dict[str, list[str]] = {"diffusers": [str(index.get("_class_name"))], "transformers": []}
    for entry in index.values():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] in LIBRARIES and entry[1]:
            wanted[entry[0]].append(entry[1])
    return wanted


def preload(model: str | None) -> None:
    for library, names in classes_of(model).items():
        module = importlib.import_module(library)
        for name in names:
            # diffusers and transformers import lazily, on attribute access; a class that fails to
            # import fails again in its stage, with its error there
            with contextlib.suppress(Exception):
                getattr(module, name)


def warm_loading() -> None:
    """Do once here the one-time work of a process' first `from_pretrained`, which every stage would repeat.

    transformers builds its checkpoint conversion table (hundreds of regexes) on first use, and torch
    takes its decomposition path for `normal_` on the meta device (where weights are created before
    loading) the first time. Internal details: whatever fails here is simply done again in the stage.
    """
    with contextlib.suppress(Exception):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("t5")
    with contextlib.suppress(Exception), torch.device("meta"):
        torch.nn.Embedding(2, 2)


def prepare_forkserver() -> None:
    """Everything the stage forkserver does before it forks its first stage (see stagediff/forkserver.py)."""
    preload(os.environ.get("STAGEDIFF_PRELOAD_MODEL"))
    if os.environ.get("STAGEDIFF_PRELOAD_COMPILER"):
        with contextlib.suppress(Exception):  # what fails here is imported again in the stage, failing there
            import torch._inductor.codecache
            import torch._inductor.compile_fx  # noqa: F401
    warm_loading()
    # Move every object imported so far out of the collector's reach (Python's advice before fork()):
    # a stage's collections no longer walk, or copy-on-write, the objects torch and diffusers import.
    gc.freeze()


def loaded_pipelines() -> list[str]:
    """The diffusers pipeline packages imported in this process (what a test asks a forked stage)."""
    prefix = "diffusers.pipelines."
    return sorted({name.split(".")[2] for name in sys.modules if name.startswith(prefix) and name.count(".") >= 3})
