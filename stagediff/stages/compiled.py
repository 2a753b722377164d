"""`--compile`: the denoiser's repeated blocks compiled (torch.compile, regional), their code compiled once.

Every stage is a fresh process, so torch.compile's own caches would pay the compile in each of them on a
machine that has not compiled yet (80 s for the benchmarks' transformer on this CPU). Inductor's cache folder
(FX graphs, AOTAutograd entries and the built kernels: `TORCHINDUCTOR_CACHE_DIR`) is kept per compile key on
the machine, and as an artifact of the store: the next stage process, the next run, every replica and a pool
worker on another machine start from it. The key names what the code depends on: the denoiser's weights and
config, how its blocks are compiled, dtype, batch size, torch, diffusers and Python versions, and the device
kind (GPU model or CPU ISA); inductor checks its own finer keys (shapes, guards) as it loads, so a stale entry
is recompiled, never run.

The cache holds code that the stage runs: a store's writers are trusted with it as with the store's artifacts.
"""

from __future__ import annotations

import io
import os
import platform
import secrets
import shutil
import sys
import tarfile
from typing import Any, Literal

import torch

from stagediff.artifacts import ArtifactError, Store
from stagediff.jobs import StageContext
from stagediff.stages.work import log, metadata

# Denoisers without diffusers' `_repeated_blocks`: the blocks compiled instead
REPEATED_BLOCKS = {"SD3Transformer2DModel": ["JointTransformerBlock"]}
CompileMode = Literal["whole", "pieces", "forward"]  # see compile_mode
RECOMPILE_LIMIT = 64  # static shapes: one graph per batch shape (a chunk's last batch is smaller)


def device_kind() -> str:
    """What compiled code is specific to: the GPU model and capability, or the CPU's architecture and ISA."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"cuda:{torch.cuda.get_device_name()}:{major}.{minor}:{torch.version.cuda}"
    return f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"


def compile_key(ctx: StageContext, mode: CompileMode) -> str:
    """The store key of the compiled code of this denoiser, as this process would compile it (`compile_mode`)."""
    import diffusers

    from stagediff.keys import digest, model_identity

    identity = model_identity(ctx.model, ctx.variant)
    return digest({
        "kind": "compiled", "v": 2, "mode": mode, "pipeline": identity.pipeline, "denoiser": identity.denoiser,
        "dtype": ctx.dtype, "levers": ctx.levers, "batch_size": ctx.batch_size, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "python": list(sys.version_info[:2]), "device": device_kind(),
    })  # fmt: skip


def compile_blocks(denoiser: torch.nn.Module, mode: CompileMode = "whole") -> int:
    """Compile each repeated block of `denoiser` in place, static shapes, the `compile_mode` way ("whole": as
    `compile_repeated_blocks(fullgraph=True)` does); returns how many. ValueError when the class has no repeated
    blocks."""
    names = getattr(denoiser, "_repeated_blocks", None) or REPEATED_BLOCKS.get(type(denoiser).__name__)
    if not names:
        raise ValueError(f"{type(denoiser).__name__} declares no repeated blocks to compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [module for module in denoiser.modules() if type(module).__name__ in names]
    for block in blocks:
        if mode == "forward":  # its own forward, in pieces: hooks registered later wrap compiled code
            block.forward = torch.compile(block.forward, dynamic=False)
        else:
            block.compile(fullgraph=mode == "whole", dynamic=False)
    return len(blocks)


def compile_mode(ctx: StageContext, denoiser: torch.nn.Module) -> CompileMode:
    """How `--compile` compiles the loaded denoiser's blocks (each way compiles other graphs: part of the key).
    The compiler must not trace offload hooks (accelerate's, for blocks in CPU memory, on disk or over several
    GPUs; diffusers' group offloading): hooked blocks are compiled in "pieces" around them. The block caches'
    hooks come later, compiler-disabled in part: on the blocks (MagCache's: a compiled call of the block would run
    it all eagerly), or inside them (TaylorSeer's): each block's own "forward" is compiled, in pieces, and the
    hooks call it. Otherwise each block is compiled "whole", as `compile_repeated_blocks(fullgraph=True)` does."""
    if ctx.group_offload or any(hasattr(module, "_hf_hook") for module in denoiser.modules()):
        return "pieces"
    return "forward" if ctx.cache else "whole"


class CompileCache:
    """This process's inductor cache folder for `ctx`'s denoiser: taken from the machine's folder for the key,
    else from the store; after the stage, given to the store if the store lacks it."""

    def __init__(self, ctx: StageContext, store: Store, mode: CompileMode) -> None:
        from stagediff.default_model import cache_dir

        self.ctx, self.store, self.key = ctx, store, compile_key(ctx, mode)
        self.folder = cache_dir() / "compiled" / self.key
        self.info: dict[str, Any] = {"key": self.key, "from": "machine" if self.folder.exists() else "compiled"}
        if not self.folder.exists() and self._fetch():
            self.info["from"] = "store"
        self.folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.folder)  # read by inductor as it compiles
        os.environ["TRITON_CACHE_DIR"] = str(self.folder / "triton")
        self.first_batches: list[float] = []
        self.later_batches: list[float] = []  # batches of shapes already compiled: what a batch costs

    def _fetch(self) -> bool:
        """Unpack the store's copy into the machine's folder (whole, or not at all); False when it has none."""
        try:
            found = self.store.get("compiled", self.key)
        except ArtifactError as exc:
            log.warning("compiled code in the store is unusable (%s): compiling again", exc)
            return False
        if found is None:
            return False
        from safetensors.torch import load

        data = load(found[1])["tar"].numpy().tobytes()
        staging = self.folder.with_name(f".{self.key}.{secrets.token_hex(4)}.tmp")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(staging, filter="data")  # no links out, no absolute paths, no devices
        try:
            staging.rename(self.folder)
        except OSError:  # another process unpacked it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
        return True

    def timed(self, seconds: float, first: bool) -> None:
        """A batch's seconds; `first`: through a shape compiled (or loaded) for the first time in this process."""
        (self.first_batches if first else self.later_batches).append(round(seconds, 3))

    def finish(self) -> dict[str, Any]:
        """Give the store this machine's folder when it lacks it (one writer: the store's claim)."""
        self.info["first_batch_seconds"] = self.first_batches
        if self.later_batches:  # compiling (or loading the code) = a first batch less a batch of the same work
            batch = sorted(self.later_batches)[len(self.later_batches) // 2]
            self.info["compile_seconds"] = round(max(0.0, sum(self.first_batches) - len(self.first_batches) * batch), 3)
        if self.info["from"] != "store" and not self.store.usable("compiled", self.key):
            claim = self.store.claim("compiled", self.key, wait=False)
            if claim is not None:
                try:
                    self.info["stored_bytes"] = self._put()
                finally:
                    claim.release()
        return self.info

    def _put(self) -> int:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(self.folder.rglob("*")):
                relative = path.relative_to(self.folder)
                if path.is_file() and not path.is_symlink() and relative.parts[0] != "locks":
                    tar.add(path, arcname=str(relative), recursive=False)
        data = buffer.getvalue()
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        meta = metadata(self.ctx, "denoise", what="compiled code", device=device_kind(), torch=torch.__version__)
        self.store.save_tensors("compiled", self.key, {"tar": tensor}, meta)
        return len(data)


def shape_of(batch: list, settings: Any) -> tuple:
    """What a batch's compiled graphs depend on besides the model: its rows and the image and text shapes."""
    return (len(batch), settings.height, settings.width, settings.max_sequence_length,
            settings.guidance > 1, settings.true_cfg_scale > 1)  # fmt: skip
