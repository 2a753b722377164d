"""The three stages. Each is a plain function that does the torch work in the process it is called
in; `tasks/` runs each one in a fresh process and `flows/` orders them."""

from stagediff.spec import DenoiseSettings, ItemRef, StageContext
from stagediff.stages.decode import decode
from stagediff.stages.denoise import denoise
from stagediff.stages.encode import encode

__all__ = ["DenoiseSettings", "ItemRef", "StageContext", "decode", "denoise", "encode"]
