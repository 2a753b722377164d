"""The three stages. Each is a plain function from its job to a `StageResult` that does the torch work
in the process it is called in; `stagediff.tasks` runs each one in a fresh process, the engine orders them."""

from stagediff.stages.decode import decode
from stagediff.stages.denoise import denoise
from stagediff.stages.encode import encode

__all__ = ["decode", "denoise", "encode"]
