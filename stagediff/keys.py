"""Content keys: every artifact is named by the sha256 of everything that determines it.

    embeddings = H(family, text encoders + tokenizers, prompt, negative prompt, max sequence length, dtype)
    latents    = H(embeddings key, denoiser, scheduler config, latent geometry, DenoiseSettings, seed, dtype)
    image      = H(latents key, VAE (+ SD 1.5's safety checker), tiled/sliced decoding, dtype)

A model component's identity is a fingerprint of its config and weight files. Hashing weights is
paid once per file: file hashes are cached in `$STAGEDIFF_CACHE/fingerprints.json` by real path, inode,
size, mtime and ctime, and a Hugging Face cache file is named after its sha256 already. What the cache
trusts: that a file whose inode, size, mtime and ctime are all unchanged has unchanged bytes. mtime alone
is not enough (`touch -r` sets it back after a same-size rewrite); ctime changes on every write, chmod and
touch and cannot be set by a user, and a file replaced by another (`os.replace`, `mv`) has another inode.
It does not defend against a rewrite within the file system's ctime granularity of the hash being taken,
nor against someone who sets the clock or writes the block device. Torch-free: the flow computes keys.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagediff.artifacts import atomic_write_bytes, sha256_file
from stagediff.default_model import cache_dir
from stagediff.family import family_for, model_index, vae_scale_factor

if TYPE_CHECKING:
    from stagediff.jobs import DenoiseSettings

KEY_VERSION = 2  # bump when a stage's math or an artifact's bytes change so that old artifacts are not reused
FINGERPRINTED = (".json", ".txt", ".model", ".safetensors")  # what from_pretrained reads (no pickles)


def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_stamp(st: os.stat_result) -> list[int]:
    """What a remembered hash is checked against: [inode, size, mtime_ns, ctime_ns] (`touch` cannot fake ctime)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class FileHashes:
    """sha256 of files, remembered by real path and `file_stamp` so that weights are hashed once.

    An entry is [inode, size, mtime_ns, ctime_ns, sha256]; an entry of any other shape (such as the older
    [size, mtime_ns, sha256]) is unknown and the file is hashed again."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "fingerprints.json"
        try:
            known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            known = {}
        self.known: dict[str, list] = known if isinstance(known, dict) else {}
        self.changed = False

    def sha256(self, file: Path) -> str:
        real = os.path.realpath(file)
        name = os.path.basename(real)
        if os.path.basename(os.path.dirname(real)) == "blobs" and len(name) == 64:
            return name  # Hugging Face cache: an LFS blob is named after its sha256
        stamp = file_stamp(os.stat(real))  # taken before hashing: a write during the hash changes ctime
        seen = self.known.get(real)
        if isinstance(seen, list) and len(seen) == 5 and seen[:4] == stamp and isinstance(seen[4], str):
            return seen[4]
        sha = sha256_file(real)
        self.known[real] = [*stamp, sha]
        self.changed = True
        return sha

    def save(self) -> None:
        if self.changed:  # concurrent savers may drop each other's entries: they are only hashed again
            atomic_write_bytes(self.path, json.dumps(self.known).encode())
            self.changed = False


def component_fingerprint(model: Path, component: str, hashes: FileHashes) -> str:
    """sha256 over the names and hashes of a component's config, tokenizer and safetensors files."""
    folder = model / component
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FINGERPRINTED)
    return digest({str(p.relative_to(folder)): hashes.sha256(p) for p in files})


@dataclass(frozen=True)
class ModelIdentity:
    """The parts of a diffusers pipeline folder that each stage's outputs depend on."""

    pipeline: str  # model_index.json's _class_name (the family)
    text: dict[str, str]  # the family's text encoders and tokenizers -> fingerprint
    denoiser: dict[str, str]  # transformer or unet -> fingerprint
    scheduler: dict[str, Any]  # the scheduler's config
    decoder: dict[str, str]  # the VAE (and SD 1.5's safety checker) -> fingerprint
    vae_scale_factor: int  # the latent geometry denoise uses


def model_identity(model: str | Path, variant: str | None = None) -> ModelIdentity:
    """`variant`: the weights variant the stages load (another variant is another model)."""
    model = Path(model)
    family, index = family_for(model), model_index(model)
    on_disk = [
        name for name, entry in index.items() if isinstance(entry, list) and entry[0] and (model / name).is_dir()
    ]
    hashes = FileHashes()
    # a component is its [library, class] and its files: the same weights under another class are another model
    fingerprints = {
        name: digest({"class": index[name], "files": component_fingerprint(model, name, hashes), "variant": variant})
        for name in on_disk
    }
    hashes.save()
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    return ModelIdentity(
        pipeline=family.pipeline_class,
        text={n: fingerprints[n] for n in family.text_components if n in fingerprints},
        denoiser={family.denoiser: fingerprints[family.denoiser]},
        scheduler={k: v for k, v in scheduler.items() if k != "_diffusers_version"},
        decoder={n: fingerprints[n] for n in family.decode_components if n in fingerprints},
        vae_scale_factor=vae_scale_factor(model),
    )


def _json(value: Any) -> str:
    """`json.dumps` as `digest` writes it; plain strings, ints and None by the encoder's own C functions."""
    if type(value) is str:
        return encode_basestring_ascii(value)
    if type(value) is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest_encoded(fields: dict[str, str]) -> str:
    """`digest` of a dict whose values are given already JSON-encoded: the same bytes, so the same key.
    (A million items' keys share the model's and the settings' encodings: each is made once.)"""
    body = ",".join(f"{encode_basestring_ascii(name)}:{fields[name]}" for name in sorted(fields))
    return hashlib.sha256(("{" + body + "}").encode()).hexdigest()


_encoded_models: dict[int, tuple[ModelIdentity, dict[str, str]]] = {}


def _model_json(model: ModelIdentity) -> dict[str, str]:
    """The JSON encoding of each of a model identity's fields, made once per identity object."""
    found = _encoded_models.get(id(model))
    if found is None or found[0] is not model:
        if len(_encoded_models) > 64:
            _encoded_models.clear()
        found = (model, {name: _json(value) for name, value in asdict(model).items()})
        _encoded_models[id(model)] = found
    return found[1]


@functools.lru_cache(maxsize=1024)
def _settings_json(settings: DenoiseSettings) -> str:
    return _json(asdict(settings))


def embeddings_key(
    model: ModelIdentity,
    prompt: str,
    negative_prompt: str | None,
    max_sequence_length: int,
    dtype: str,
    levers: str = "",
) -> str:
    """`levers`: what changes the text encoders' bits (quantized encoders); empty: absent from the key."""
    m = _model_json(model)
    return _digest_encoded(
        {
            **({"levers": _json(levers)} if levers else {}),
            "v": _json(KEY_VERSION),
            "kind": '"embeddings"',
            "pipeline": m["pipeline"],
            "text": m["text"],
            "prompt": _json(prompt),
            "negative_prompt": _json(negative_prompt),
            "max_sequence_length": _json(max_sequence_length),
            "dtype": _json(dtype),
        }
    )


def latents_key(
    embeddings: str, model: ModelIdentity, settings: DenoiseSettings, seed: int, dtype: str, levers: str = ""
) -> str:
    """`settings`: steps, guidance, size, true CFG scale, SDXL micro-conditioning (all of DenoiseSettings);
    `levers`: the speed levers that change the denoiser's bits ("compile"), empty for diffusers' exact path
    (then absent from the key: the keys of exact runs never change)."""
    m = _model_json(model)
    return _digest_encoded(
        {
            **({"levers": _json(levers)} if levers else {}),
            "v": _json(KEY_VERSION),
            "kind": '"latents"',
            "embeddings": _json(embeddings),
            "pipeline": m["pipeline"],
            "denoiser": m["denoiser"],
            "scheduler": m["scheduler"],
            "vae_scale_factor": m["vae_scale_factor"],
            "settings": _settings_json(settings),
            "seed": _json(seed),
            "dtype": _json(dtype),
        }
    )


def image_key(
    latents: str, model: ModelIdentity, tiled: bool, sliced: bool, dtype: str, metadata: bool = True, named: str = ""
) -> str:
    """`metadata`: the PNG carries the generation parameters, which the latents key covers but for the model as
    the run named it, `named` (a folder or Hub id): the same weights from another folder make another PNG."""
    m = _model_json(model)
    fields = {"latents": _json(latents), "pipeline": m["pipeline"], "decoder": m["decoder"], "tiled": _json(tiled)}
    png = _json(named if metadata and named else metadata)
    return _digest_encoded({"v": _json(KEY_VERSION), "kind": '"image"', **fields, "sliced": _json(sliced),
                            "dtype": _json(dtype), "png": png})  # fmt: skip


def model_hash(model: ModelIdentity) -> str:
    """A short fingerprint of the whole model (the PNG metadata's "Model hash")."""
    return digest(asdict(model))[:10]


def item_keys(
    model: ModelIdentity,
    prompt: str,
    negative_prompt: str | None,
    seed: int,
    settings: DenoiseSettings,
    dtype: str,
    tiled: bool = False,
    sliced: bool = False,
    metadata: bool = True,
    named: str = "",
    levers: str = "",
    encode_levers: str = "",
) -> dict[str, str]:
    """One item's store keys, by artifact kind: `embeddings`, `latents`, `images` (`dtype` resolved, never "auto";
    `named`: the model as the run names it, which a PNG with metadata records; `levers`, `encode_levers`: see
    `latents_key` and `embeddings_key`).

    The one key function: every flow names its artifacts through it."""
    embeddings = embeddings_key(model, prompt, negative_prompt, settings.max_sequence_length, dtype, encode_levers)
    latents = latents_key(embeddings, model, settings, seed, dtype, levers)
    image = image_key(latents, model, tiled, sliced, dtype, metadata, named)
    return {"embeddings": embeddings, "latents": latents, "images": image}


def key_context(
    model: ModelIdentity,
    dtype: str,
    tiled: bool = False,
    sliced: bool = False,
    metadata: bool = True,
    named: str = "",
    levers: str = "",
    encode_levers: str = "",
) -> str:
    """All that an item's keys depend on but its prompt, negative prompt, seed and settings (`item_keys`'s other
    arguments and the keys' version): under one context, an item has the keys that it had before."""
    return digest({"v": KEY_VERSION, "model": asdict(model), "dtype": dtype, "tiled": tiled, "sliced": sliced,
                   "metadata": metadata, "named": named, "levers": levers, "encode_levers": encode_levers})  # fmt: skip


def no_accelerator() -> bool:
    """True on a Linux machine that shows no NVIDIA, AMD (ROCm) or other DRM accelerator device at all."""
    if not sys.platform.startswith("linux"):
        return False
    from stagediff.request import visible_gpus

    devices = Path("/dev")
    return not visible_gpus() and not (devices / "kfd").exists() and not list(devices.glob("dri/renderD*"))


@functools.cache
def resolve_dtype(dtype: str) -> str:
    """The dtype the stages will use ("auto" depends on the machine): asked of a stage process, never torch here
    (unless this process descends from the stage forkserver: torch imported, CUDA asked of NVML only)."""
    if dtype != "auto":
        return dtype
    if no_accelerator():  # without a GPU: float32, known without waiting for torch to import
        return "float32"
    if "stagediff.preload" in sys.modules:  # e.g. a fan-out's local replica: no process to start
        from stagediff.stages.devices import dtype_name

        return dtype_name(dtype)
    from stagediff.isolation import run_isolated

    return run_isolated("stagediff.stages.devices:dtype_name", dtype, name="probe")[0]
