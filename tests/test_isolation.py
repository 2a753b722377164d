"""Stage processes: fresh, reported, cleaned up, and never outliving the process that asked for them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stagediff.isolation import StageError, find_stage_process, run_isolated, set_wait_policy


def test_result_stats_and_a_fresh_process() -> None:
    pid, stats = run_isolated("os:getpid", name="getpid")
    assert pid == stats.pid != os.getpid()
    assert stats.seconds >= stats.startup_seconds >= 0 and stats.peak_rss_mb > 0
    assert not Path(f"/proc/{pid}").exists()


def test_the_forkserver_never_initialises_cuda() -> None:
    initialised, _ = run_isolated("torch.cuda:is_initialized", name="cuda")
    assert initialised is False


def test_stage_threads_sleep_while_they_wait_but_a_compile_runs_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    # real stage processes: a fresh forkserver decides before torch loads OpenMP
    script = ("import sys\nfrom stagediff.isolation import run_isolated, warm_up\n"
              "warm_up(compile=sys.argv[1] == 'c', cpu_replicas=sys.argv[2] == 'r', spin=sys.argv[1] in 'cq')\n"
              "print(run_isolated('os:getenv', 'OMP_WAIT_POLICY', name='e')[0])")  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    more = str(len(os.sched_getaffinity(0)) + 1)
    cases = [(clean, "-", "-"), (clean, "c", "-"), ({**clean, "STAGEDIFF_TORCH_THREADS": more}, "c", "-"),
             ({**clean, "OMP_NUM_THREADS": "1"}, "c", "-"), (clean, "c", "r"), (clean, "q", "-")]  # fmt: skip
    seen = []
    for env, compiled, replicas in cases:
        command = [sys.executable, "-c", script, compiled, replicas]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        seen.append(proc.stdout.split()[-1])
    assert seen == ["PASSIVE", "None", "PASSIVE", "None", "PASSIVE", "None"]  # q: a quantize run spins too
    # a compile run's process pinned to a share of the cores at torch's default thread count; the user wins
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "STAGEDIFF_TORCH_THREADS", "STAGEDIFF_CPU_REPLICAS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STAGEDIFF_SPIN", "1")
    set_wait_policy()
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    set_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    set_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_errors_and_deaths_become_stage_errors() -> None:
    with pytest.raises(StageError, match=r"boom stage failed: FileNotFoundError"):
        run_isolated("os:listdir", "/no/such/dir", name="boom")
    with pytest.raises(StageError, match=r"exit stage process \d+ died with exit code 3"):
        run_isolated("os:_exit", 3, name="exit")


def test_stage_process_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    code = "from stagediff.isolation import run_isolated; run_isolated('time:sleep', 120, name='sleep')"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        child = find_stage_process("sleep")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.time() + 10
        while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text():
            assert time.time() < deadline, "the stage process outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()


def test_a_stage_does_not_re_import_the_parents_main_module(tmp_path: Path) -> None:
    (tmp_path / "slow_main.py").write_text(
        "import time\ntime.sleep(3)\n"
        "if __name__ == '__main__':\n"
        "    from stagediff.isolation import run_isolated\n"
        "    run_isolated('os:getpid', name='warm')\n"
        "    print(run_isolated('os:getpid', name='x')[1].startup_seconds)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "slow_main"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 2.0  # a re-import would sleep 3 s


def test_the_forkserver_preloads_the_classes_the_model_names(tiny_model: Path, tmp_path: Path) -> None:
    from stagediff.preload import EVERY_FAMILY, classes_of

    named = classes_of(str(tiny_model))
    assert named["diffusers"][0] == "FluxPipeline" and "FluxTransformer2DModel" in named["diffusers"]
    assert {"T5EncoderModel", "CLIPTextModel"} <= set(named["transformers"])
    assert classes_of(None) == classes_of(str(tmp_path)) == EVERY_FAMILY  # no model_index.json: every family
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "x": ["evil_module", "Class"]}')
    assert "evil_module" not in classes_of(str(tmp_path))  # only diffusers and transformers are imported

    # A stage forked from a forkserver warmed up for the tiny Flux model finds Flux imported, SDXL not
    code = (
        "from stagediff.isolation import run_isolated, warm_up\n"
        f"warm_up({str(tiny_model)!r})\n"
        "print(*run_isolated('stagediff.preload:loaded_pipelines', name='probe')[0])\n"
        "print(run_isolated('gc:get_freeze_count', name='probe')[0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    pipelines, frozen = proc.stdout.splitlines()
    assert pipelines.split() == ["flux"]
    # What the forkserver imported is frozen: out of every stage's garbage collections
    assert int(frozen) > 100_000


def test_the_forkserver_lets_go_of_the_callers_output_when_it_exits(tmp_path: Path) -> None:
    # A caller reading a command's output to the end (a pipe, a worker) waits for every process holding
    # it. The forkserver holds it too: 1.3-1.5 s after the command while it tore torch down, 0.35 s with
    # its objects frozen, 0.05 s now that it skips the teardown.
    code = "from stagediff.isolation import run_isolated\nprint(run_isolated('os:getpid', name='x')[0])\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    exited = []
    waiter = threading.Thread(target=lambda: exited.append((proc.wait(), time.monotonic())))
    waiter.start()
    out = proc.stdout.read()  # returns at EOF: when the last holder of the pipe has gone
    eof = time.monotonic()
    waiter.join()
    assert exited[0][0] == 0 and int(out)
    assert eof - exited[0][1] < 0.25


def test_peak_rss_is_the_processs_own_not_its_parents() -> None:
    from stagediff.isolation import peak_rss_mb

    ballast = bytearray(400 * 2**20)  # touched: 400 MB resident in this process
    assert peak_rss_mb() > 400
    code = "from stagediff.isolation import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 200  # ru_maxrss would say >= 400: Linux keeps it across exec()
    del ballast


def warn_as_a_pipeline_does() -> None:
    from diffusers.utils import logging as diffusers_logging

    logger = diffusers_logging.get_logger("diffusers.pipelines.flux.pipeline_flux")
    for batch in range(3):
        logger.warning("The following part of your input was truncated because `max_sequence_length` is set to "
                       "8 tokens: ['batch %d']", batch)  # fmt: skip
    logger.warning("another warning")


def test_library_warnings_reach_the_run_log_and_a_per_batch_one_is_said_once(capfd) -> None:
    import logging

    said: list[str] = []
    logger = logging.getLogger("test-library-warnings")
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger.addHandler(handler)
    run_isolated("tests.test_isolation:warn_as_a_pipeline_does", name="encode", logger=logger)
    assert [line.split(" is set to")[0] for line in said] == [
        "[encode] The following part of your input was truncated because `max_sequence_length`",
        "[encode] another warning",
    ]
    assert "truncated" not in capfd.readouterr().err  # not straight to the terminal
