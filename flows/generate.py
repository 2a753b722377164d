"""The `generate` flow: encode -> denoise -> decode, each stage in its own OS process, handing
the next one checksummed safetensors files; the run is described by `OUT/RUN/manifest.json`."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger

from artifacts import write_manifest
from flows.ui import model_tag, stage_tags, tag_flow_run
from stagediff.default_model import default_model_dir, ensure_default_model
from stagediff.request import Dtype, validate_request
from stagediff.runs import new_run_id, open_manifest, record, reuse
from stagediff.spec import StageContext
from tasks import decode_task, denoise_task, encode_task


@flow(name="generate", log_prints=True)
def generate(
    prompts: list[str],
    model: str | None = None,
    steps: int = 28,
    guidance: float = 3.5,
    height: int = 1024,
    width: int = 1024,
    seed: int = 0,
    max_sequence_length: int = 512,
    batch_size: int = 1,
    dtype: Dtype = "auto",
    max_memory: str | dict[str, str] | None = None,
    offload_dir: str | None = None,
    out: str = "outputs",
    run_id: str | None = None,
    retries: int = 0,
) -> dict[str, Any]:
    """Generate one image per prompt through three process-isolated stages.

    Args:
        prompts: Prompts, one image each; prompt i is seeded with `seed + i`.
        model: Diffusers pipeline folder or Hub id; empty means the embedded tiny random model.
        steps: Denoising steps.
        guidance: Guidance scale (FLUX.1-dev's distilled guidance).
        height: Image height in pixels, a multiple of 16.
        width: Image width in pixels, a multiple of 16.
        seed: Base seed: prompt i uses torch.Generator("cpu").manual_seed(seed + i).
        max_sequence_length: T5 tokens per prompt, 1 to 512.
        batch_size: Prompts per forward pass in every stage.
        dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.
        max_memory: Memory per device, e.g. "0=16GiB,1=16GiB,cpu=64GiB".
        offload_dir: Folder for weights accelerate offloads to disk.
        out: Output root; this run writes under OUT/RUN_ID/.
        run_id: Plain name of the run folder; a new one is made when empty.
        retries: Retries of a failed stage.
    """
    logger = get_run_logger()
    # 1. Check inputs (before any model is built or loaded, and before anything is written)
    fields = dict(
        prompts=prompts, steps=steps, guidance=guidance, height=height, width=width, seed=seed,
        max_sequence_length=max_sequence_length, batch_size=batch_size, dtype=dtype,
        placement={"max_memory": max_memory, "offload_dir": offload_dir}, out=out, run_id=run_id or new_run_id(),
    )  # fmt: skip
    validate_request(**fields, model=model or str(default_model_dir()), check_model=model is not None)
    request = validate_request(**fields, model=model or str(ensure_default_model()))
    run_dir = request.run_dir
    manifest = open_manifest(request)
    manifest.update(status="running", flow_pid=os.getpid())
    write_manifest(run_dir, manifest)
    logger.info("run %s: %d prompts -> %s", request.run_id, len(request.prompts), request.run_dir)
    tag_flow_run(model_tag(model))
    tags = stage_tags(model)  # a concurrency limit on the device tag keeps runs from sharing a device

    ctx = StageContext(
        model=request.model,
        run_dir=str(request.run_dir),
        dtype=request.dtype,
        batch_size=request.batch_size,
        max_memory=request.placement.max_memory,
        offload_dir=request.placement.offload_dir,
    )
    try:
        # 2. Encode prompts -> embeddings
        embeddings = reuse(manifest, run_dir, "encode", upstream_ran=False)
        ran = embeddings is None
        if ran:
            prompts_ = list(enumerate(request.prompts))
            result = encode_task.with_options(retries=retries, tags=tags)(ctx, prompts_, request.max_sequence_length)
            embeddings = record(manifest, run_dir, "encode", result)
        # 3. Denoise embeddings + seeded noise -> latents
        latents = reuse(manifest, run_dir, "denoise", upstream_ran=ran)
        ran = ran or latents is None
        if latents is None:
            items = [(ref, request.seed_of(ref.index)) for ref in embeddings]
            result = denoise_task.with_options(retries=retries, tags=tags)(
                ctx, items, request.steps, request.guidance, request.height, request.width, request.max_sequence_length
            )
            latents = record(manifest, run_dir, "denoise", result)
        # 4. Decode latents -> PNG images
        if reuse(manifest, run_dir, "decode", upstream_ran=ran) is None:
            result = decode_task.with_options(retries=retries, tags=tags)(ctx, latents, request.height, request.width)
            record(manifest, run_dir, "decode", result)
    except BaseException as exc:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(exc).__name__}: {exc}"
        write_manifest(run_dir, manifest)
        raise
    manifest["status"] = "completed"
    manifest.pop("error", None)
    write_manifest(run_dir, manifest)
    logger.info("run %s completed: %d images in %s", request.run_id, len(request.prompts), run_dir / "images")
    return manifest
