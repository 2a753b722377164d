"""Stage 2 in parts: scheduled pipeline parallelism for a transformer denoiser (`--pipeline-stages N`).

The denoiser's blocks are cut into N consecutive parts, one process per part (its own device, or its own
share of the CPU cores), and the stage's batches stream through them as micro-batches. Each micro-batch runs the
family's own diffusers loop in a thread of this process (the coordinator), whose denoiser is a proxy: a
call sends its inputs to every part and waits for the last part's output. As soon as a micro-batch leaves
the last part its thread takes the scheduler step and sends the next step into the first part, so with
at least N micro-batches in flight no part waits for a step to end (no fill and drain at every step).

Each part runs the model's own `forward`: the blocks before its range are relays that return what the
previous part computed, and a hook after its last block stops the forward there. Time, text and position
embeddings are recomputed in every part from the call's inputs. The arithmetic is the unsplit model's, so
the latents equal a one-process run's at the same batch size.

Transport is torch.distributed point to point (gloo between CPU processes, NCCL between CUDA parts; the
coordinator always talks gloo with CPU tensors): a JSON header, then each tensor's bytes. The processes meet
through a rendezvous file and connect over loopback only.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import itertools
import json
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stagediff.family import family_for, vae_scale_factor
from stagediff.isolation import peak_rss_mb, set_process_title
from stagediff.jobs import DenoiseJob, DenoiseSettings, StageContext, StageResult
from stagediff.stages.devices import accelerator_count, torch_dtype
from stagediff.stages.loading import empty_denoiser, load_denoiser_model, load_pipeline
from stagediff.stages.work import Loaded, batches, log

IN_FLIGHT_PER_PART = 2  # micro-batches in flight per part: one computing, one arriving


class PipelineError(RuntimeError):
    """A part failed or its process died."""


@dataclass(frozen=True)
class Part:
    index: int
    blocks: tuple[str, ...]  # its consecutive blocks, e.g. ("transformer_blocks.0", ...)
    parameters: int  # in its blocks (every part also holds the embedders and output layers)
    share: float  # of the blocks' estimated compute
    device: str
    threads: int  # torch threads: the stage's own, so that each block computes the bits it does unsplit
    cpus: tuple[int, ...] | None = None  # CPU parts: their share of the stage's cores (None: as the stage)


def split_points(costs: list[float], parts: int) -> list[int]:
    """Where parts 2..N start so that each has about 1/N of the cost (every part at least one block)."""
    total, starts, cumulative = sum(costs), [], [0.0]
    for cost in costs:
        cumulative.append(cumulative[-1] + cost)
    for k in range(1, parts):
        lo = (starts[-1] if starts else 0) + 1
        hi = len(costs) - (parts - k)
        starts.append(min(range(lo, hi + 1), key=lambda i: abs(cumulative[i] - total * k / parts)))
    return starts


def block_cost(block: torch.nn.Module, image_tokens: int, text_tokens: int, inner: int) -> float:
    """A block's estimated multiply-adds per item: each weight times the tokens it sees, plus attention.

    In a two-stream block (Flux's double blocks, SD3's joint blocks) the text weights (`*context*`, `add_*`)
    see the text tokens and the others the image tokens; a one-stream block (Flux's single blocks) runs
    every weight on every token, so per parameter it costs about twice as much.
    """
    names = [name for name, _ in block.named_parameters()]
    two_streams = any("context" in name or "add_" in name for name in names)
    tokens = image_tokens + text_tokens
    cost = 2.0 * tokens * tokens * inner  # scores and weighted sum of one joint attention
    for name, parameter in block.named_parameters():
        text = "context" in name or "add_" in name
        cost += parameter.numel() * (tokens if not two_streams else text_tokens if text else image_tokens)
    return cost


def plan_parts(ctx: StageContext, settings: DenoiseSettings, threads: int) -> tuple[list[Part], Any]:
    """The parts (blocks, device, CPUs) and the denoiser's config, from an empty (meta) copy of the model.

    By default the blocks are split where each part's estimated compute for `settings` is about equal. On the
    CPU a kernel's last bit can depend on its thread count: each part computes with `threads`, the stage's (a
    plain run's, or a replica's --threads), on its share of the stage's cores (see stagediff/replica.py)."""
    family = family_for(ctx.model)
    empty = empty_denoiser(ctx.model)
    names = family.block_names(ctx.model)
    patch = getattr(empty.config, "patch_size", 1) or 1
    scale = vae_scale_factor(ctx.model) * (2 if family.denoiser_packs_latents else patch)
    image_tokens = (settings.height // scale) * (settings.width // scale)
    inner = empty.config.num_attention_heads * empty.config.attention_head_dim
    blocks = [empty.get_submodule(name) for name in names]
    costs = [block_cost(b, image_tokens, settings.max_sequence_length, inner) for b in blocks]
    n = ctx.pipeline_stages
    starts = [names.index(name) for name in ctx.pipeline_split] if ctx.pipeline_split else split_points(costs, n)
    bounds = [0, *starts, len(names)]
    gpus = accelerator_count()
    from stagediff.replica import cpu_shares

    cpus = [None] * n if gpus else [tuple(share) for share in cpu_shares(n)]
    parts = []
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        parameters = sum(p.numel() for block in blocks[a:b] for p in block.parameters())
        parts.append(Part(k, tuple(names[a:b]), parameters, round(sum(costs[a:b]) / sum(costs), 4),
                          f"cuda:{k % gpus}" if gpus else "cpu", threads, cpus[k]))  # fmt: skip
    return parts, empty.config


# Transport: nested tuples, lists and dicts of tensors and plain values between ranks. The header is JSON (never
# pickle: nothing read from a socket is executed), then each tensor's bytes, in the header's order.


def _encode(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"tensor": [list(obj.shape), str(obj.dtype).removeprefix("torch.")]}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        return {"dict": {str(k): _encode(v, tensors) for k, v in obj.items()}}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot send a {type(obj).__name__} between pipeline parts")


def _decode(obj: Any, take: Callable[[list[int], torch.dtype], torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, take) for x in obj]
    if isinstance(obj, dict):
        if "tensor" in obj:
            shape, name = obj["tensor"]
            dtype = getattr(torch, name, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"not a torch dtype: {name!r}")
            return take(shape, dtype)
        if "tuple" in obj:
            return tuple(_decode(x, take) for x in obj["tuple"])
        return {k: _decode(v, take) for k, v in obj["dict"].items()}
    return obj


class Sender:
    """Non-blocking sends that keep their buffers alive until delivered."""

    def __init__(self) -> None:
        self.pending: deque[tuple[Any, Any]] = deque()

    def send(self, obj: Any, dst: int, group: Any = None) -> None:
        tensors: list[torch.Tensor] = []
        header = json.dumps(_encode(obj, tensors)).encode()
        size = torch.tensor([len(header)], dtype=torch.int64)
        buffers = [size, torch.frombuffer(bytearray(header), dtype=torch.uint8)]
        works = [dist.isend(b, dst) for b in buffers]
        for tensor in tensors:
            data = tensor.contiguous().reshape(-1).view(torch.uint8)
            if data.numel():
                works.append(dist.isend(data, dst, group=group))
                buffers.append(data)
        self.pending.append((works, buffers))
        while self.pending and all(w.is_completed() for w in self.pending[0][0]):
            self.pending.popleft()

    def flush(self) -> None:
        while self.pending:
            for work in self.pending.popleft()[0]:
                work.wait()


def receive(src: int, device: str = "cpu", group: Any = None) -> Any:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src)
    header = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(header, src)

    def take(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        data = torch.empty(torch.Size(shape).numel() * dtype.itemsize, dtype=torch.uint8, device=device)
        if data.numel():
            dist.recv(data, src, group=group)
        return data.view(dtype).reshape(shape)

    return _decode(json.loads(header.numpy().tobytes()), take)


# A part's process.


class _Done(Exception):  # control flow: a part's forward ends after its last block
    def __init__(self, state: Any) -> None:
        self.state = state


class _Elsewhere(torch.nn.Module):
    """A block computed in another part: returns what the previous part sent (blocks after the range are never
    reached)."""

    def __init__(self, holder: dict[str, Any]) -> None:
        super().__init__()
        self.holder = holder

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.holder["state"]


def _stop_after(module: torch.nn.Module, args: Any, output: Any) -> None:
    raise _Done(output)


def load_part(ctx: StageContext, part: Part, last: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The denoiser with only this part's blocks (the others are relays), on the part's device."""
    family = family_for(ctx.model)
    model = load_denoiser_model(ctx)
    holder: dict[str, Any] = {"state": None}
    own = set(part.blocks)
    for name in family.block_names(ctx.model):
        if name not in own:
            parent, _, index = name.rpartition(".")
            model.get_submodule(parent)[int(index)] = _Elsewhere(holder)
    if not last:
        model.get_submodule(part.blocks[-1]).register_forward_hook(_stop_after)
    return model.to(part.device).eval(), holder


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


@torch.no_grad()
def part_main(ctx: StageContext, parts: list[Part], k: int, rendezvous: str, conn: Any) -> None:
    """One part's process: load its blocks, then take calls until told to stop; report its times."""
    _die_with_parent()
    set_process_title(f"stagediff-part{k}")  # ps, top; tests find a part by it
    logging.getLogger().handlers.clear()  # the stage's log pipe belongs to the coordinator
    part, n = parts[k], len(parts)
    try:
        if part.cpus is not None and hasattr(os, "sched_setaffinity"):  # Linux; elsewhere the OS places it
            os.sched_setaffinity(0, part.cpus)
        torch.set_num_threads(part.threads)
        cuda = part.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(part.device)
        dist.init_process_group("gloo", store=dist.FileStore(rendezvous, n + 1), rank=k + 1, world_size=n + 1)
        group = dist.new_group(list(range(1, n + 1)), backend="nccl") if cuda else None
        t0 = time.perf_counter()
        model, holder = load_part(ctx, part, last=k == n - 1)
        times = {"load_seconds": time.perf_counter() - t0, "compute_seconds": 0.0, "wait_seconds": 0.0}
        times |= {"send_seconds": 0.0, "calls": 0}
        sender = Sender()
        while True:
            t0 = time.perf_counter()
            kind, kwargs = receive(0)
            if kind == "stop":
                if k == n - 1:
                    sender.send(("end", None), 0)  # the coordinator's receiving thread ends after the last output
                break
            kwargs = {key: v.to(part.device) if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}
            if k:
                holder["state"] = receive(k, part.device, group)
            t1 = time.perf_counter()
            try:
                output = model(**kwargs)[0]
            except _Done as done:
                output = done.state
            if cuda:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if k == n - 1:
                sender.send(("output", output.cpu()), 0)
            else:
                sender.send(output, k + 2, group)
            times["wait_seconds"] += t1 - t0
            times["compute_seconds"] += t2 - t1
            times["send_seconds"] += time.perf_counter() - t2
            times["calls"] += 1
        sender.flush()
        conn.send(("times", {**times, "peak_rss_mb": round(peak_rss_mb(), 1)}))
        dist.destroy_process_group()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


# The coordinator.


class Link:
    """The coordinator's side: each denoiser call goes to every part; outputs come back in call order."""

    def __init__(self, n: int) -> None:
        self.n, self.lock, self.sender = n, threading.Lock(), Sender()
        self.waiting: deque[Future] = deque()
        self.error: BaseException | None = None
        self.first_call: float | None = None
        self.last_output: float | None = None
        self.receiver = threading.Thread(target=self._receive, name="pipeline-outputs", daemon=True)
        self.receiver.start()

    def call(self, kwargs: dict[str, Any]) -> torch.Tensor:
        future: Future = Future()
        with self.lock:
            if self.error:
                raise self.error
            self.first_call = self.first_call or time.perf_counter()
            self.waiting.append(future)
            for k in range(self.n):
                self.sender.send(("call", kwargs), k + 1)
        return future.result()

    def _receive(self) -> None:
        try:
            while True:
                kind, output = receive(self.n)
                if kind == "end":
                    return
                self.last_output = time.perf_counter()
                self.waiting.popleft().set_result(output)
        except Exception as exc:  # the last part died; the stage names which part failed
            self.fail(PipelineError(f"receiving from the last pipeline part failed: {exc}"))

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.error = error
            while self.waiting:
                self.waiting.popleft().set_exception(error)

    def close(self) -> None:
        with self.lock:
            for k in range(self.n):
                self.sender.send(("stop", None), k + 1)
            self.sender.flush()


class PartsProxy(torch.nn.Module):
    """Stands in for the denoiser in the coordinator's pipelines: its config and dtype, calls through the parts."""

    def __init__(self, config: Any, dtype: torch.dtype, link: Link) -> None:
        super().__init__()
        self.config, self.link = config, link
        self.register_buffer("anchor", torch.empty(0, dtype=dtype))  # the pipeline's device and dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def cache_context(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if args:
            raise TypeError("the pipeline-stage denoiser takes keyword arguments only")
        output = self.link.call({**kwargs, "return_dict": False})
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)


class Parts:
    """The part processes and the coordinator's process group: started, watched, stopped."""

    def __init__(self, ctx: StageContext, parts: list[Part]) -> None:
        self.parts, n = parts, len(parts)
        # Rendezvous through a file and connections over loopback only: nothing listens beyond this machine.
        fd, self.rendezvous = tempfile.mkstemp(prefix="stagediff-parts-")
        os.close(fd)
        if os.path.exists("/sys/class/net/lo"):
            for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                os.environ.setdefault(variable, "lo")
        fork = multiprocessing.get_context("fork")
        self.processes, self.conns = [], []
        for k in range(n):
            recv, send = fork.Pipe(duplex=False)
            process = fork.Process(target=part_main, args=(ctx, parts, k, self.rendezvous, send), daemon=True)
            process.start()
            send.close()
            self.processes.append(process)
            self.conns.append(recv)
        self.times: list[dict[str, Any]] = [{} for _ in parts]
        self.errors: dict[int, str] = {}
        self.error: str | None = None
        # Joining the group waits for every part: watched, so that a part that dies first fails the stage.
        joined = threading.Thread(target=self._join, args=(n, any(p.device.startswith("cuda") for p in parts)),
                                  daemon=True)  # fmt: skip
        joined.start()
        while joined.is_alive():
            if self.failure():
                self.kill()
                raise PipelineError(self.error)
            joined.join(timeout=0.02)
        self.link = Link(n)

    def _join(self, n: int, cuda: bool) -> None:
        dist.init_process_group("gloo", store=dist.FileStore(self.rendezvous, n + 1), rank=0, world_size=n + 1)
        if cuda:
            dist.new_group(list(range(1, n + 1)), backend="nccl")  # every rank takes part in creating a group

    def failure(self) -> str | None:
        """What went wrong in the parts, if anything did: a part that died unannounced (killed) is the cause;
        otherwise the first part that reported an error. Kept once found."""
        if self.error:
            return self.error
        died = []
        for part, process, conn in zip(self.parts, self.processes, self.conns, strict=True):
            with contextlib.suppress(EOFError, OSError):
                while conn.poll():
                    kind, value = conn.recv()
                    if kind == "error":
                        self.errors.setdefault(part.index, value)
                    else:
                        self.times[part.index] = value
            if process.exitcode is not None and not self.times[part.index] and part.index not in self.errors:
                died.append(f"pipeline part {part.index} (pid {process.pid}) exited with code {process.exitcode}")
        if died:
            self.error = died[0]
        elif self.errors:
            k = min(self.errors)
            log.error("pipeline part %d failed:\n%s", k, self.errors[k])
            last = self.errors[k].strip().splitlines()[-1]
            self.error = f"pipeline part {k} (pid {self.processes[k].pid}) failed: {last}"
        return self.error

    def stop(self) -> None:
        """Tell the parts to stop, collect their times, and wait for them to exit."""
        self.link.close()
        deadline = time.time() + 60
        while not all(self.times) and time.time() < deadline:
            if self.failure():
                raise PipelineError(self.error)
            time.sleep(0.01)
        for process in self.processes:
            process.join(timeout=30)
        self.link.receiver.join(timeout=5)
        dist.destroy_process_group()
        with contextlib.suppress(OSError):
            os.unlink(self.rendezvous)

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
        with contextlib.suppress(OSError):
            os.unlink(self.rendezvous)


def denoise_in_parts(job: DenoiseJob, in_flight: int | None = None) -> StageResult:
    """`denoise` with the denoiser in `ctx.pipeline_stages` parts; `in_flight`: micro-batches in flight at most
    (default 2 per part; 1 runs the parts one after the other, as `device_map="auto"` does)."""
    from stagediff.stages.denoise import denoise_batch, store_latents

    ctx, store = job.ctx, job.ctx.open_store()
    result = StageResult()
    models = Loaded(lambda: None, result, "denoise")  # device locks and the process' device setting
    if all(store.usable("latents", item.key) for item in job.items):
        return models.finish()
    models.get()
    threads = torch.get_num_threads()  # the parts'
    # The coordinator's own work (scheduler steps, guidance) takes one thread. Set before planning, so that this
    # process starts no OpenMP team before it forks the parts (SD3 computes its position embedding as it is
    # built): a forked child would wait forever for the team's threads, which it does not have.
    torch.set_num_threads(1)
    parts, config = plan_parts(ctx, job.items[0].settings, threads)
    running = Parts(ctx, parts)  # forked before anything is claimed: the parts hold no claim of ours
    held: list = []
    try:
        pipe = load_pipeline(ctx, ())
        pipe.transformer = PartsProxy(config, torch_dtype(ctx.dtype), running.link)
        pipe.vae_scale_factor = vae_scale_factor(ctx.model)  # no VAE here; diffusers would assume 8
        micro = ctx.micro_batch_size or ctx.batch_size
        claimed = batches(store, "latents", job.items, lambda item: item.settings, ctx.batch_size, held=held)
        todo = [batch[i : i + micro] for batch in claimed for i in range(0, len(batch), micro)]
        if len(todo) < len(parts):
            log.warning("%d micro-batches for %d parts: at most %d parts work at once (more items, or a smaller "
                        "micro_batch_size, keep them all busy)", len(todo), len(parts), len(todo))  # fmt: skip
        in_flight = in_flight or IN_FLIGHT_PER_PART * len(parts)
        split = "; ".join(f"part {p.index} on {p.device}: {p.blocks[0]} .. {p.blocks[-1]}" for p in parts)
        log.info("denoising %d micro-batches through %d parts, %d in flight: %s", len(todo), len(parts), in_flight,
                 split)  # fmt: skip

        def one(n: int, batch: list) -> None:
            own = copy.copy(pipe)  # its own scheduler state and call state; the same components
            object.__setattr__(own, "scheduler", copy.deepcopy(pipe.scheduler))
            store_latents(job, store, result, batch, denoise_batch(own, job, store, batch, n))

        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="micro-batch") as pool:
            futures = [pool.submit(one, n, batch) for n, batch in enumerate(todo, 1)]
            while not all(f.done() for f in futures):
                if running.failure():
                    running.link.fail(PipelineError(running.error))
                    break
                time.sleep(0.02)
        if any(f.exception() for f in futures):
            time.sleep(0.1)  # a part that died is named as such, not by the broken connection it left
        if running.failure():
            raise PipelineError(running.error)
        for future in futures:
            future.result()
        running.stop()
    except BaseException:
        running.kill()
        raise
    finally:
        for claim in held:
            claim.release()
    result.loads = 1  # one load of the denoiser, spread over the parts (in parallel)
    result.load_seconds = max(t.get("load_seconds", 0.0) for t in running.times)
    window = (running.link.last_output or 0) - (running.link.first_call or 0)
    result.pipeline = describe(parts, running, window, len(todo), in_flight)
    result.device_map = {block: part.device for part in parts for block in part.blocks}
    for entry in result.pipeline["parts"]:
        log.info("part %d (%s, %d threads): %d blocks, busy %.0f%% (compute %.2f s, waiting %.2f s, sending %.2f s)",
                 entry["part"], entry["device"], entry["threads"], len(entry["blocks"]), 100 * entry["busy_fraction"],
                 entry["compute_seconds"], entry["wait_seconds"], entry["send_seconds"])  # fmt: skip
    return models.finish()


def describe(parts: list[Part], running: Parts, window: float, micro_batches: int, in_flight: int) -> dict[str, Any]:
    """The manifest's record of the split: blocks and device per part, and where each part's time went."""
    entries = []
    for part, process, times in zip(parts, running.processes, running.times, strict=True):
        entries.append({
            "part": part.index, "device": part.device, "threads": part.threads, "cpus": part.cpus, "pid": process.pid,
            "blocks": list(part.blocks), "parameters": part.parameters, "compute_share": part.share,
            "calls": times.get("calls", 0),
            "load_seconds": round(times.get("load_seconds", 0.0), 4),
            "compute_seconds": round(times.get("compute_seconds", 0.0), 4),
            "wait_seconds": round(times.get("wait_seconds", 0.0), 4),
            "send_seconds": round(times.get("send_seconds", 0.0), 4),
            "peak_rss_mb": times.get("peak_rss_mb"),
            "busy_fraction": round(times.get("compute_seconds", 0.0) / window, 4) if window > 0 else 0.0,
        })  # fmt: skip
    return {"parts": entries, "micro_batches": micro_batches, "in_flight": in_flight,
            "seconds": round(window, 4), "transport": "gloo" if parts[0].device == "cpu" else "nccl"}  # fmt: skip
