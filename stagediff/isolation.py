"""Run a stage function in a fresh OS process that exits when the stage ends.

Children are forked from a `forkserver` that has already imported torch, diffusers and transformers
and has never touched an accelerator, so a stage starts in a fraction of a second instead of paying
a full import, and all of its memory (host and device) goes back to the OS when it exits.
`STAGEDIFF_START_METHOD=spawn` starts each stage from a fresh interpreter instead.

The child sends its log records, its progress events (`report`: an item is done) and, at the end,
its result (or its error) through a pipe; the parent re-emits the records on its own logger, so a
stage's logs show in the Prefect task run, and hands each event to its `on_event` callback. A
second pipe watches the parent: if the parent dies (kill -9, cancel), the child exits too.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Imported by the forkserver once, before any stage is forked from it.
PRELOAD_MODULES = ["stagediff.forkserver"]
# "fork": only for a process forked from the forkserver itself (a fan-out's local replica): it has everything
# imported, has never touched an accelerator, and runs no threads that hold locks.
START_METHODS = ("forkserver", "spawn", "fork")

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage failed inside its process (the message carries the child's error) or its process died."""


@dataclass
class ProcessStats:
    pid: int
    seconds: float  # wall time from asking for the process to receiving its result
    startup_seconds: float  # from asking for the process to the stage function being called (imports included)
    peak_rss_mb: float  # the child's peak resident set size (VmHWM)
    cuda_max_memory_allocated_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_wait_policy() -> None:
    """OpenMP's wait policy for this process' stages; call it before torch loads OpenMP (read once, then).

    Threads that wait for work sleep (PASSIVE): a CPU shared by several stage processes, replicas or workers
    stays fast (spinning threads held the cores their siblings needed: the tiny model ran ~100x slower). The
    forkserver of a `--compile` or `--quantize` run (`warm_up(spin=True)`) lets them spin, as in plain
    diffusers, unless it runs more threads than the cores it is pinned to or CPU replicas will fork from it:
    inductor's compiled kernels and torchao's int8 dynamic quantization, with their many short parallel
    regions, ran 1.6x and 1.15x slower with sleeping threads. An OMP_WAIT_POLICY of the user's wins."""
    spin = os.environ.get("STAGEDIFF_SPIN")
    if not spin or oversubscribed() or os.environ.get("STAGEDIFF_CPU_REPLICAS"):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def oversubscribed() -> bool:
    """Whether this process runs more torch threads than the cores it is pinned to."""
    if not hasattr(os, "sched_getaffinity"):
        return False
    threads = os.environ.get("STAGEDIFF_TORCH_THREADS") or os.environ.get("OMP_NUM_THREADS")
    return outnumbered(int(threads) if threads and threads.isdigit() else None, len(os.sched_getaffinity(0)))


def outnumbered(threads: int | None, cores: int) -> bool:
    """Whether `threads` torch threads outnumber `cores` (None: torch's default, at most the machine's CPUs, which
    a process pinned to some of them has fewer of)."""
    return (threads or os.cpu_count() or 1) > cores


def start_method() -> str:
    method = os.environ.get("STAGEDIFF_START_METHOD", "forkserver")
    if method not in START_METHODS:
        raise ValueError(f"STAGEDIFF_START_METHOD={method!r} is not one of {', '.join(START_METHODS)}")
    if method == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"  # e.g. Windows
    return method


def _context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context(start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(PRELOAD_MODULES)
    return ctx


def warm_up(
    model: str | None = None, compile: bool = False, cpu_replicas: bool = False, spin: bool | None = None
) -> None:
    """Start the forkserver now: it imports the heavy libraries, and the classes `model` names, in the background
    (and torch's compiler, seconds of imports, for a `--compile` run); `cpu_replicas`: local replicas pinned to
    shares of the cores will be forked from it; `spin`: its stage threads may spin while they wait (default: for
    a compile run; see `set_wait_policy` and `Placement.spinning`).

    A no-op when it is already running (it preloads what the first caller named).
    """
    if start_method() != "forkserver":
        return
    _context()
    from multiprocessing import forkserver

    names = ("STAGEDIFF_PRELOAD_MODEL", "STAGEDIFF_PRELOAD_COMPILER", "STAGEDIFF_CPU_REPLICAS", "STAGEDIFF_SPIN")
    before = {name: os.environ.get(name) for name in names}
    if model:
        os.environ["STAGEDIFF_PRELOAD_MODEL"] = str(model)  # read by stagediff.preload in the new forkserver
    if compile:
        os.environ["STAGEDIFF_PRELOAD_COMPILER"] = "1"
    if compile if spin is None else spin:
        os.environ["STAGEDIFF_SPIN"] = "1"  # read by set_wait_policy in the new forkserver
    if cpu_replicas:
        os.environ["STAGEDIFF_CPU_REPLICAS"] = "1"  # read by stagediff.forkserver
    try:
        forkserver.ensure_running()
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def stop_warm_up() -> None:
    """Stop this process' stage forkserver now (a command that refuses its input after `warm_up`: the server's
    imports would print after the one-line error)."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with contextlib.suppress(OSError, AttributeError):
        os.close(server._forkserver_alive_fd)
    server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None


_events: tuple[multiprocessing.connection.Connection, threading.Lock] | None = None  # set in a stage process


def report(event: str, value: Any) -> None:
    """Tell the parent of this stage process that something happened (e.g. "item", 3); a no-op elsewhere."""
    if _events is not None:
        conn, lock = _events
        with lock:
            conn.send(("event", event, value))


class _PipeHandler(logging.Handler):
    def __init__(self, conn: multiprocessing.connection.Connection, lock: threading.Lock) -> None:
        super().__init__()
        self.conn, self.send_lock = conn, lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self.send_lock:
                self.conn.send(("log", record.levelno, record.name, record.getMessage()))
        except Exception:
            pass


# Said by the pipelines for every batch (a prompt longer than max_sequence_length): once per stage process is enough
_ONCE = ("The following part of your input was truncated",)


def _library_logs_to_the_run(handler: logging.Handler) -> None:
    """diffusers' and transformers' warnings go to the run's log (not straight to the terminal), each of _ONCE
    once per process."""
    for name in ("diffusers", "transformers"):
        if name in sys.modules:  # their own stderr handler is added at first use: add it now, then take it away
            with contextlib.suppress(ImportError, AttributeError):
                importlib.import_module(f"{name}.utils.logging")._configure_library_root_logger()
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    said: set[str] = set()

    def once(record: logging.LogRecord) -> bool:
        repeated = next((start for start in _ONCE if str(record.msg).startswith(start)), None)
        if repeated is None:
            return True
        first = repeated not in said
        said.add(repeated)
        return first

    handler.addFilter(once)


def _watch_parent(parent_alive: multiprocessing.connection.Connection, caller: int) -> None:
    """Exit when the caller (the process that ran run_isolated, not the forkserver that forked this one) ends.

    Its pipe's EOF alone is not enough: a write end can live on in another process (a forkserver keeps what
    it was sent, a sibling forked at the wrong moment), and a cancelled fan-out's replicas then ran on, each
    keeping the other's stage server alive. The caller's pidfd becomes readable when it exits, whoever
    holds the pipe."""
    try:
        pidfd = os.pidfd_open(caller)
    except ProcessLookupError:
        os._exit(70)  # already gone
    except (OSError, AttributeError):
        pidfd = None
    with contextlib.suppress(EOFError, OSError, ValueError):
        if pidfd is None:  # no pidfds here: ask every POLL_SECONDS whether the caller still exists
            while not parent_alive.poll(POLL_SECONDS):
                os.kill(caller, 0)  # ProcessLookupError (an OSError) once it is gone
        else:
            select.select([parent_alive.fileno(), pidfd], [], [])  # the pipe's data or EOF, or the caller's end
    os._exit(70)


def peak_rss_mb() -> float:
    """This process' peak resident set size in MB: the kernel's VmHWM on Linux.

    Not `ru_maxrss`: Linux carries that over exec(), so a command started from a big process
    (a benchmark, a worker) would report at least its parent's peak.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def set_process_title(title: str) -> None:
    """Name the process (ps, top, /proc/PID/comm) after its stage; Linux only, best effort."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def find_stage_process(stage: str, timeout: float = 60.0) -> int:
    """The pid of a running stage process, found by its name (`stagediff-<stage>`, 15 characters in /proc)."""
    name = f"stagediff-{stage}"[:15]
    deadline = time.time() + timeout
    while time.time() < deadline:
        for comm in Path("/proc").glob("[0-9]*/comm"):
            with contextlib.suppress(OSError):
                if comm.read_text().strip() == name:
                    return int(comm.parent.name)
        time.sleep(0.05)
    raise TimeoutError(f"no {name} process appeared within {timeout} s")


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _caller_settings() -> dict[str, str]:
    """The caller's `STAGEDIFF_*` variables: a stage forked from the forkserver would otherwise see the
    environment the forkserver was started with, not the caller's of now."""
    return {k: v for k, v in os.environ.items() if k.startswith("STAGEDIFF_")}


def _child_main(
    target: str,
    args: tuple,
    conn: multiprocessing.connection.Connection,
    parent_alive: multiprocessing.connection.Connection,
    settings: dict[str, str],
    caller: int,
) -> None:
    threading.Thread(target=_watch_parent, args=(parent_alive, caller), daemon=True).start()
    for name in [k for k in os.environ if k.startswith("STAGEDIFF_") and k not in settings]:
        del os.environ[name]
    os.environ.update(settings)
    set_process_title(f"stagediff-{target.rpartition(':')[2]}")
    global _events
    lock = threading.Lock()
    _events = (conn, lock)
    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(conn, lock)]
    root.setLevel(logging.INFO)
    if "torch" not in sys.modules:  # a spawned stage: as the forkserver does (a forked one has its policy)
        set_wait_policy()
    started = time.time()
    try:
        fn = _resolve(target)  # imports the stage's module: free after a forkserver preload
        _library_logs_to_the_run(root.handlers[0])
        started = time.time()
        result = fn(*args)
        message = ("ok", result)
    except BaseException as exc:
        message = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    cuda_mb = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        cuda_mb = torch.cuda.max_memory_allocated() / 2**20
    with lock:
        conn.send(("stats", started, peak_rss_mb(), cuda_mb))
        conn.send(message)
    conn.close()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Keep the parent's `__main__` out of the child's preparation data.

    multiprocessing would re-import it in every child (for a Prefect worker's flow run that is
    `prefect.engine`, seconds of imports per stage); stage targets never live in `__main__`.
    """
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


POLL_SECONDS = 0.5  # how often a wait on a stage process checks that the process is still alive
_live: set[Any] = set()  # the processes run_isolated is waiting for, across threads
_live_lock = threading.Lock()


_cancelled: set[str] = set()  # name prefixes of run_isolated calls cancelled: they stop, later ones never start


def kill_isolated(prefix: str) -> int:
    """Kill every process that run_isolated calls of this process named `prefix...` are waiting for (their own
    children follow: each watches its parent), and refuse such calls from now on (StageError): for a cancelled
    run whose waits are in other threads (a fan-out's replicas, some of them maybe not started yet). Returns
    how many were killed."""
    with _live_lock:
        _cancelled.add(prefix)
        alive = [p for p in _live if p.is_alive() and p.name.startswith(f"stagediff-{prefix}")]
    for process in alive:
        with contextlib.suppress(Exception):
            process.kill()
    return len(alive)


def _is_cancelled(name: str) -> bool:
    return any(name.startswith(prefix) for prefix in _cancelled)


def run_isolated(
    target: str,
    *args: Any,
    name: str,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    on_event: Callable[[str, Any], None] | None = None,
) -> tuple[Any, ProcessStats]:
    """Run `target(*args)` in a fresh process; return its result and the process' stats.

    `target` is "module:function", imported in the child only (the caller never imports torch), and
    `args` are picklable. `on_event(event, value)` gets what the child `report`s, as it happens.
    Raises StageError if the stage raises or its process dies.
    """
    logger = logger or log
    if _is_cancelled(name):
        raise StageError(f"{name} was cancelled before it started")
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    alive_recv, alive_send = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_child_main,
        args=(target, args, send, alive_recv, _caller_settings(), os.getpid()),
        name=f"stagediff-{name}",
    )
    t0 = time.time()
    with _main_module_hidden():
        process.start()
    with _live_lock:
        _live.add(process)
        if _is_cancelled(name):  # cancelled while it started
            process.kill()
    send.close()
    alive_recv.close()
    started, peak_rss_mb, cuda_mb, outcome = t0, 0.0, None, None
    try:
        while outcome is None:
            # poll, not a blocking recv: a killed process' write end may live on in a child it forked
            if not recv.poll(POLL_SECONDS):
                if process.is_alive():
                    continue
                if not recv.poll(0):
                    break
            try:
                message = recv.recv()
            except EOFError:
                break
            if message[0] == "log":
                _, level, _, text = message
                logger.log(level, "[%s] %s", name, text)
            elif message[0] == "event":
                if on_event is not None:
                    on_event(message[1], message[2])
            elif message[0] == "stats":
                _, started, peak_rss_mb, cuda_mb = message
            else:
                outcome = message
        process.join()
    finally:
        with _live_lock:
            _live.discard(process)
        alive_send.close()  # tells the child's watchdog to exit if it is still there
        if process.is_alive():
            process.kill()
            process.join()
        recv.close()
    stats = ProcessStats(
        pid=process.pid,
        seconds=round(time.time() - t0, 4),
        startup_seconds=round(started - t0, 4),
        peak_rss_mb=round(peak_rss_mb, 1),
        cuda_max_memory_allocated_mb=None if cuda_mb is None else round(cuda_mb, 1),
    )
    if outcome is None:
        raise StageError(f"{name} stage process {process.pid} died with exit code {process.exitcode}")
    if outcome[0] == "error":
        logger.debug("%s stage traceback:\n%s", name, outcome[2])
        raise StageError(f"{name} stage failed: {outcome[1]}")
    return outcome[1], stats


# The stages by name: the only place that says where each stage's function lives.
STAGE_FUNCTIONS = {
    "encode": "stagediff.stages.encode:encode",
    "denoise": "stagediff.stages.denoise:denoise",
    "decode": "stagediff.stages.decode:decode",
}


def run_stage_process(
    stage: str,
    job: Any,
    on_item: Callable[[int], None] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> Any:
    """Run one stage's job (`stagediff.jobs`) in a fresh process; return its StageResult with the process' stats.

    `on_item(index)` is called as each item is stored. The stage task's body; also run without Prefect
    (a fan-out's local replicas, torchrun ranks)."""
    logger = logger or log

    def on_event(event: str, value: Any) -> None:
        if event == "item" and on_item is not None:
            on_item(value)

    result, stats = run_isolated(STAGE_FUNCTIONS[stage], job, name=stage, logger=logger, on_event=on_event)
    result.process = stats.to_dict()
    placed = f", on {result.device_map}" if result.device_map else ""
    logger.info(
        "%s finished in process %d: %.2f s (start-up %.2f s, loading %.2f s), peak RSS %.0f MB%s",
        stage,
        stats.pid,
        stats.seconds,
        stats.startup_seconds,
        result.load_seconds,
        stats.peak_rss_mb,
        placed,
    )  # the one row of a stage process (with the run's "N of M items to compute" and its progress lines)
    return result
