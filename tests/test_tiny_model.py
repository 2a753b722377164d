"""The embedded default model: offline, deterministic, and loadable by the code that loads FLUX.1-dev."""

from __future__ import annotations

import json
from pathlib import Path

from stagediff.cli import main


def test_same_seed_same_bytes(tmp_path: Path, capsys) -> None:
    assert main(["tiny-model", str(tmp_path / "a")]) == 0
    assert main(["tiny-model", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_loads_with_from_pretrained_like_flux_dev(tiny_model: Path) -> None:
    from diffusers import DiffusionPipeline, FluxPipeline

    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    pipe = DiffusionPipeline.from_pretrained(str(tiny_model), use_safetensors=True)
    assert isinstance(pipe, FluxPipeline)
    assert pipe.vae_scale_factor == 8  # like the real FLUX.1 VAE
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert pipe.tokenizer("a dog").input_ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer_2("a dog").input_ids[-1] == pipe.tokenizer_2.eos_token_id
    assert all(p.suffix != ".bin" for p in tiny_model.rglob("*"))
