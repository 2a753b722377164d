"""Fan-out: data-parallel replicas on this machine (processes pinned to their devices or cores) and the
seeds' launchers (torchrun, accelerate launch); every image equals a one-replica run's, in request order."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stagediff.cli import main
from stagediff.replica import cpu_shares, default_torch_threads, split
from stagediff.stages.work import cpu_list
from stagediff.tiny_model import TinySD15Config, build_tiny_model
from tests.conftest import read_items
from tests.reference import read_image, reference_images

PROMPTS = ["a red dog", "a cat in the city", "a forest at night", "blue sky photo", "a lighthouse"]
SMALL = {"steps": 2, "height": 64, "width": 64, "max_sequence_length": 16}
ARGS = [arg for k, v in SMALL.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
PROMPT_ARGS = [arg for p in PROMPTS for arg in ("--prompt", p)]


@pytest.fixture
def api(prefect_server, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> list[np.ndarray]:
    """The plain diffusers pipeline, one prompt at a time, prompt i seeded with 3 + i."""
    kwargs = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=16)
    return reference_images(tiny_model, PROMPTS, seed=3, **kwargs)


def images(run_dir: Path) -> list[np.ndarray]:
    items = read_items(run_dir)
    assert [item["prompt"] for item in items] == PROMPTS
    return [read_image(run_dir / item["image"]) for item in items]


def test_shares_are_contiguous_and_the_first_ones_longer() -> None:
    assert split(5, 2) == [range(0, 3), range(3, 5)]
    assert split(5, 4) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert split(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]  # the extra replica idles
    assert cpu_shares(2, [0, 1, 2, 3, 4]) == [[0, 1, 2], [3, 4]]
    assert cpu_shares(3, [4, 5]) == [[4], [5], [4]]  # more replicas than cores: they share, round-robin


# An SD 1.5 shape whose UNet convolutions (oneDNN) give other last bits with 1 thread than with 2 on the CPU:
# with one thread per replica, two of these three images were off by one from the plain pipeline's.
SENSITIVE = TinySD15Config(seed=5, scheduler="euler", unet_channels=(16, 32, 32), attention_head_dim=2)
SENSITIVE_PROMPTS, SENSITIVE_NEGATIVES = ["a red dog", "a cat", "a tower at dusk"], ["blurry", "", "ugly"]


def test_cpu_replicas_and_launcher_ranks_give_the_plain_pipeline_s_bits(tmp_path: Path, api) -> None:
    model = build_tiny_model(tmp_path / "sd15", SENSITIVE)
    kwargs = dict(num_inference_steps=3, height=64, width=48, guidance_scale=5.0)
    expected = reference_images(model, SENSITIVE_PROMPTS, seed=11, negative_prompts=SENSITIVE_NEGATIVES, **kwargs)
    args = ["--model", str(model), "--steps", "3", "--height", "64", "--width", "48", "--guidance", "5", "--seed", "11"]
    for prompt, negative in zip(SENSITIVE_PROMPTS, SENSITIVE_NEGATIVES, strict=True):
        args += ["--prompt", prompt, "--negative-prompt", negative]
    out = tmp_path / "out"
    assert main(["generate", *args, "--out", str(out), "--run-id", "fan", "--replicas", "2"]) == 0
    port = str(free_port())
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", port, "-m", "stagediff.launch", *args, "--out", str(out),
                "--run-id", "ranks"]  # fmt: skip
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for run in ("fan", "ranks"):
        for item, reference in zip(read_items(out / run), expected, strict=True):
            np.testing.assert_array_equal(read_image(out / run / item["image"]), reference, err_msg=run)


@pytest.mark.parametrize(
    ("option", "seen"),
    [(["--replicas", "2"], "torch_threads"), (["--device-groups", "0;1"], "CUDA_VISIBLE_DEVICES")],
    ids=["replicas", "device-groups"],
)
def test_two_replicas_over_five_prompts_equal_one_replica_in_order(
    api, tiny_model: Path, expected: list[np.ndarray], tmp_path: Path, option: list[str], seen: str, monkeypatch
) -> None:
    if "--device-groups" in option:  # groups must name GPUs this process sees: two, as far as it can tell
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_model), *PROMPT_ARGS, *ARGS, "--seed", "3", "--out", str(out),
                 "--run-id", "fan", *option])  # fmt: skip
    assert code == 0
    for image, reference in zip(images(out / "fan"), expected, strict=True):
        np.testing.assert_array_equal(image, reference)
    manifest = json.loads((out / "fan" / "manifest.json").read_text())
    replicas = manifest["replicas"]
    assert [r["items"] for r in replicas] == [[0, 3], [3, 5]]  # [start, stop) of each share
    assert [r["status"] for r in replicas] == ["completed", "completed"]
    assert len({r["pid"] for r in replicas}) == 2 and os.getpid() not in {r["pid"] for r in replicas}
    # each replica's stage processes saw its own device setting
    if seen == "torch_threads":  # no GPU: its share of the cores, with the thread count of a plain run
        assert [r["seen"]["cpus"] for r in replicas] == [cpu_list(share) for share in cpu_shares(2)]
        assert [r["seen"]["torch_threads"] for r in replicas] == [default_torch_threads()] * 2
        # more threads than cores: they sleep while they wait, instead of spinning on the core a sibling needs
        policy = ["PASSIVE" if default_torch_threads() > len(share) else None for share in cpu_shares(2)]
        assert [r["seen"]["OMP_WAIT_POLICY"] for r in replicas] == policy
    else:
        assert [r["seen"]["CUDA_VISIBLE_DEVICES"] for r in replicas] == ["0", "1"]


def test_more_replicas_than_prompts_leave_the_extra_ones_idle(api, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_model), *PROMPT_ARGS[:4], *ARGS, "--out", str(out),
                 "--run-id", "idle", "--replicas", "3"])  # fmt: skip
    assert code == 0
    replicas = json.loads((out / "idle" / "manifest.json").read_text())["replicas"]
    assert [(r["items"], r["status"]) for r in replicas] == [([0, 1], "completed"), ([1, 2], "completed"),
                                                             ([2, 2], "idle")]  # fmt: skip


@pytest.mark.parametrize(
    ("option", "first_line"),
    [
        (["--replicas", "0"], "invalid replicas=0: must be an integer >= 1"),
        (["--replicas", "2", "--threads", "0"], "invalid threads=0: must be an integer >= 1"),
        (["--device-groups", "0,,1"], "invalid device_groups='0,,1': must be device groups such as"),
        (["--device-groups", "0,1;1"], "invalid device_groups='0,1;1': a device may belong to one group only"),
        (["--replicas", "2", "--device-groups", "0;1"], "invalid replicas=2: give replicas or device_groups"),
        (["--pool", "gpu"], "invalid store=None: a pool's replicas run on other machines"),
        (["--pool", "gpu", "--store", "local/store"], "invalid store='local/store': a pool's replicas run"),
        (["--replicas", "2", "--storage-options", "[1]"], "invalid storage_options='[1]': must be a JSON object"),
    ],
)
def test_bad_fan_out_input_is_one_line_with_status_2_and_writes_nothing(
    tiny_model: Path, tmp_path: Path, capsys, option: list[str], first_line: str
) -> None:
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_model), "--prompt", "a", *ARGS, "--out", str(out), *option])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"stagediff: error: {first_line}"), err
    assert not out.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_seeds_launchers_write_the_five_right_images_in_order(
    tiny_model: Path, expected: list[np.ndarray], tmp_path: Path, launcher: str
) -> None:
    binary = Path(sys.executable).parent / launcher
    port = str(free_port())
    if launcher == "torchrun":
        command = [str(binary), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port]
    else:
        command = [str(binary), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                   "--main_process_port", port]  # fmt: skip
    out = tmp_path / "out"
    command += ["-m", "stagediff.launch", "--model", str(tiny_model), *PROMPT_ARGS, *ARGS, "--seed", "3"]
    command += ["--out", str(out), "--run-id", "launched"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # no accelerate config of the user's
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for image, reference in zip(images(out / "launched"), expected, strict=True):
        np.testing.assert_array_equal(image, reference)
    replicas = json.loads((out / "launched" / "manifest.json").read_text())["replicas"]
    assert [r["items"] for r in replicas] == [[0, 3], [3, 5]] and len({r["pid"] for r in replicas}) == 2
    assert shutil.which(str(binary))


def test_a_batch_with_two_replicas_writes_every_line_s_image(
    api, tiny_model: Path, expected: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stagediff.progress import Progress

    prompts_file, folder = tmp_path / "p.txt", tmp_path / "batch"
    prompts_file.write_text("".join(f"{p}\n" for p in PROMPTS))
    args = ["batch", str(prompts_file), "--store", str(folder), "--model", str(tiny_model), *ARGS, "--seed", "3"]
    gathered, real = [], Progress.gathered

    def spied(self: Progress, *args) -> None:  # the flow's progress after each replica segment it gathers
        real(self, *args)
        gathered.append((self.images, {stage: (c.done, c.total) for stage, c in self.stages.items()}))

    monkeypatch.setattr(Progress, "gathered", spied)
    assert main([*args, "--replicas", "2"]) == 0
    # what the replicas computed, from their journals: the progress line says it (it said "none yet")
    assert gathered[-1] == (5, {"encode": (5, 5), "denoise": (5, 5), "decode": (5, 5)})
    summary = json.loads((folder / "batch.json").read_text())
    for entry, reference in zip(read_items(folder), expected, strict=True):
        np.testing.assert_array_equal(read_image(folder / entry["image"]), reference)
    run = summary["runs"][-1]
    assert [r["items"] for r in summary["replicas"]] == [[0, 3], [3, 5]] and run["status"] == "completed"
    assert run["computed"] == 5
    assert main([*args, "--replicas", "2"]) == 0  # nothing left to do: no replica computes anything
    summary = json.loads((folder / "batch.json").read_text())
    assert summary["runs"][-1]["computed"] == 0 and summary["counts"]["computed_by_this_run"] == 0
    assert all(info["computed"] == 0 for stages in summary["replica_stages"].values() for info in stages.values())


def test_a_cancel_of_a_command_line_fan_out_stops_its_replicas_within_10_s(
    prefect_server, tiny_model: Path, tmp_path: Path
) -> None:
    """`prefect flow-run cancel` of a `stagediff generate --replicas 2` run, which no worker watches: the command
    stops its replicas and exits, the run recorded cancelled, no image written after."""
    import signal
    import time

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"item {i}\n" for i in range(2000)), encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(tiny_model), "--prompts-file",
           str(prompts), "--steps", "1", "--height", "64", "--width", "64", "--max-sequence-length", "8",
           "--batch-size", "4", "--out", str(out), "--run-id", "big", "--replicas", "2"]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "command.log"  # a file, not a pipe: a process left behind would keep a pipe open
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    store = out / ".store" / "objects" / "images"
    try:
        deadline = time.monotonic() + 300
        while not list(store.rglob("*.png"))[:1]:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        flow_run_id = json.loads((out / "big" / "manifest.json").read_text())["flow_run_id"]
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
        sent = time.monotonic()
        proc.wait(timeout=60)
        exited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    output = log.read_text()
    assert exited < 10, (exited, output[-3000:])
    # nothing of the run lives on: no process holds a file of its folder (replicas, stages, stage servers)
    deadline = time.monotonic() + 10
    while holders := [pid for pid in os.listdir("/proc") if pid.isdigit() and holds(int(pid), out)]:
        assert time.monotonic() < deadline, holders
        time.sleep(0.2)
    made = len(list(store.rglob("*.png")))
    time.sleep(3)
    assert len(list(store.rglob("*.png"))) == made  # no replica goes on
    summary = json.loads((out / "big" / "manifest.json").read_text())
    assert summary["status"] == "cancelled", output[-3000:]
    assert "was cancelled: stopping its work" in output and "stopped 2 local replica process(es)" in output


def holds(pid: int, folder: Path) -> bool:
    """Whether process `pid` has a file under `folder` open."""
    try:
        return any(os.readlink(fd).startswith(str(folder)) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
