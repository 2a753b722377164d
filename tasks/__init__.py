"""Thin Prefect tasks: each runs one stage in a fresh OS process (see stagediff.isolation)."""

from tasks.decode import decode_task
from tasks.denoise import denoise_task
from tasks.encode import encode_task

__all__ = ["decode_task", "denoise_task", "encode_task"]
