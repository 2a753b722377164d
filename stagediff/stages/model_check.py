"""Before any stage: does each component's class exist, and do its config and its weights agree?

A component whose config does not match its weights (another size of the same model, a config edited by hand)
loads as a model with parameters left on the meta device and fails deep inside a stage, after the earlier
stages ran. Here each weighted component is built from its config on the meta device (no memory, no weights
read) and every tensor its safetensors headers name is compared with the parameter of that name. Run in a stage
process (torch, diffusers and transformers imported there): `stagediff.engine.check_model_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

from stagediff.family import model_index
from stagediff.request import WEIGHTED_COMPONENTS, weight_files


def header_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor the safetensors files hold: name -> (shape, file name), from their headers alone."""
    shapes = {}
    for path in files:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                shapes[name] = (tuple(entry["shape"]), path.name)
    return shapes


def empty_component(folder: Path, library: str, class_name: str):
    """The component built from its config on the meta device, or a one-line problem (str)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    module = diffusers if library == "diffusers" else transformers
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        return f"is declared as {library} class {class_name!r}, which this {library} lacks (model_index.json)"
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config(cls.load_config(folder))
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
        return cls._from_config(config)


def check_components(model: str, variant: str | None) -> str | None:
    """The first component whose class is missing or whose weights do not fit its config, in one line; or None."""
    root = Path(model)
    for name, entry in model_index(model).items():
        # (SD 1.5's safety checker comes from a diffusers pipeline module, not diffusers or transformers: skipped)
        library = entry[0] if isinstance(entry, list) else None
        if name not in WEIGHTED_COMPONENTS or library not in ("diffusers", "transformers"):
            continue
        folder = root / name
        files = weight_files(folder, variant) if folder.is_dir() else []
        if not files:
            continue  # a missing component or weights are the request checks' to name
        try:
            built = empty_component(folder, entry[0], entry[1])
        except Exception as exc:  # a config its class cannot build
            return f"component {name!r}: {name}/config.json does not build a {entry[1]} ({type(exc).__name__}: {exc})"
        if isinstance(built, str):
            return f"component {name!r} {built}"
        expected = {key: tuple(tensor.shape) for key, tensor in built.state_dict().items()}
        for key, (shape, file) in header_shapes(files).items():
            if key in expected and expected[key] != shape:
                return (
                    f"component {name!r}: {name}/{file} holds {key} of shape {list(shape)}, but {name}/config.json "
                    f"makes it {list(expected[key])} (weights and config of different models?)"
                )
    return None
