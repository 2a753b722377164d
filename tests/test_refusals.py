"""What stagediff refuses: one table of bad inputs, each a real `stagediff` command in a fresh process that
must print one line naming the parameter, exit 2, change no file, and import neither torch nor Prefect.

Grow the table with every refusal: it is the project's record of what it refuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "16"]
HUB_ID = "black-forest-labs/FLUX.1-dev"  # not in the table's empty Hugging Face cache, and offline
RUN = (
    "import atexit, sys; from stagediff.cli import run; "
    "atexit.register(lambda: print('imported:', 'torch' in sys.modules, 'prefect' in sys.modules)); run()"
)


@pytest.fixture(scope="module")
def work(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding an earlier run, a store, prompts files and broken models, as a user's would."""
    root = tmp_path_factory.mktemp("work")
    (root / "out" / "old").mkdir(parents=True)
    (root / "out" / "old" / "manifest.json").write_text('{"run_id": "old"}\n')
    (root / "store" / "objects").mkdir(parents=True)
    (root / "a.txt").write_text("a dog\n")
    (root / "file").write_text("not a folder\n")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine\n")
    os.mkfifo(root / "fifo.txt")
    (root / "elsewhere").mkdir()
    (root / "out" / "link").symlink_to(root / "elsewhere")
    (root / "linked").mkdir()
    (root / "linked" / ".store").symlink_to(root / "elsewhere")  # the default store OUT/.store, a link
    (root / "damaged" / "objects").mkdir(parents=True)
    (root / "damaged" / "objects" / "latents").write_text("not a folder\n")
    (root / "damaged-batch" / ".store").mkdir(parents=True)
    (root / "damaged-batch" / ".store" / "objects").write_text("not a folder\n")

    def broken(name: str, edit) -> None:
        model = root / name
        shutil.copytree(tiny_model, model)
        edit(model)

    def index_entry(key: str, value) -> callable:
        def edit(model: Path) -> None:
            index = json.loads((model / "model_index.json").read_text())
            index[key] = value
            (model / "model_index.json").write_text(json.dumps(index))

        return edit

    def stray_safetensors(model: Path) -> None:
        weights = model / "vae" / "diffusion_pytorch_model.safetensors"
        weights.rename(model / "vae" / "stray.safetensors")
        (model / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickled")

    broken("vae-is-5", index_entry("vae", 5))
    broken("vae-is-a-dict", index_entry("vae", {"a": 1}))
    broken("custom-class", index_entry("vae", ["mymodule", "Evil"]))
    broken("stray", stray_safetensors)
    broken("unknown-class", index_entry("transformer", ["diffusers", "FluxTransformer9DModel"]))
    broken("wrong-class", index_entry("vae", ["diffusers", "UNet2DConditionModel"]))

    def truncate(model: Path) -> None:
        weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
        data = weights.read_bytes()
        weights.unlink()  # a copy of its own, not the shared model's file
        weights.write_bytes(data[: len(data) // 2])

    broken("truncated", truncate)
    broken("garbage", lambda model: (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64))
    broken("latin1", lambda model: (model / "model_index.json").write_bytes(b'{"_class_name": "Fl\xfcx"}'))
    from stagediff.tiny_model import TinySD15Config, build_tiny_model

    build_tiny_model(root / "unet", TinySD15Config())
    return root


def table(model: str, work: Path) -> list[tuple[list[str], str]]:
    """(command, the start of its one line of stderr: after "stagediff: error: ", or the whole line when it
    starts with "stagediff " (an option argparse refuses: "stagediff generate: error: argument ..."))."""
    gen = ["generate", "--prompt", "a dog", *SMALL, "--model", model]
    negatives = ["--negative-prompt", "x", "--negative-prompt", "y"]
    s3 = ["--store", "s3://bucket/store", "--storage-options"]
    too_large = [arg for _ in range(3) for arg in ("--prompt", "x" * 100_000)]  # an argument is at most 128 KiB
    return [
        ([*gen, "--original-size", "²,2"], "invalid original_size='²,2': must be two integers"),
        (["generate", "--prompts-file", "a.txt/x", "--model", model], "invalid prompts_file='a.txt/x': must be an"),
        (["generate", "--prompts-file", "fifo.txt", "--model", model], "invalid prompts_file='fifo.txt': must be an"),
        (
            ["generate", "--prompts-file", "a.txt", *negatives, "--model", model],
            "invalid negative_prompt=['x', 'y']: with --prompts-file give it once (for every prompt)",
        ),
        ([*gen, "--out", "file"], "invalid out="),
        ([*gen, "--store", "file"], "invalid store='file': must be a folder"),
        ([*gen, "--run-id", "nl\n"], "invalid run_id='nl\\n': must be a plain name"),
        ([*gen, "--out", "out", "--run-id", "link"], "invalid run_id='link':"),
        ([*gen[:-1], "vae-is-5"], "invalid model='vae-is-5': model_index.json entry 'vae' must be [library, class]"),
        ([*gen[:-1], "vae-is-a-dict"], "invalid model='vae-is-a-dict': model_index.json entry 'vae' must be"),
        ([*gen[:-1], "custom-class"], "invalid model='custom-class': component 'vae' comes from 'mymodule'"),
        (
            [*gen[:-1], "unknown-class"],
            "invalid model='unknown-class': component 'transformer' is declared as diffusers class "
            "'FluxTransformer9DModel', which this diffusers lacks",
        ),
        (
            [*gen[:-1], "wrong-class"],
            "invalid model='wrong-class': component 'vae' is declared as 'UNet2DConditionModel' in model_index.json, "
            "but vae/config.json was saved by 'AutoencoderKL'",
        ),
        (
            [*gen[:-1], "truncated"],
            "invalid model='truncated': component 'transformer': transformer/diffusion_pytorch_model.safetensors "
            "is truncated: its header places",
        ),
        (
            [*gen[:-1], "garbage"],
            "invalid model='garbage': component 'vae': vae/diffusion_pytorch_model.safetensors is not a "
            "safetensors file",
        ),
        ([*gen[:-1], "stray"], "invalid model='stray': component 'vae' has no safetensors weights"),
        ([*gen[:-1], "latin1"], "invalid model='latin1': is not a diffusers pipeline: no readable UTF-8"),
        ([*gen, "--max-memory", "0=1GB"], "invalid max_memory='0=1GB': names GPU 0, but this machine has 0 GPU(s)"),
        ([*gen, "--retries", "-1"], "invalid retries=-1: must be an integer from 0 to 10"),
        ([*gen, "--variant", "a/b"], "invalid variant='a/b': must be a weights variant name such as fp16"),
        ([*gen, "--variant", "fp8"], f"invalid model='{model}': component 'vae' has no 'fp8' variant weights"),
        ([*gen, "--revision", "v1.0"], "invalid revision='v1.0': applies to a Hub id; a local folder is one revision"),
        ([*gen, "--revision", "../main"], "invalid revision='../main': must be a Hub branch, tag or commit"),
        (
            [*gen[:-1], HUB_ID],
            f"invalid model='{HUB_ID}': is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids",
        ),
        (
            [*gen[:-1], HUB_ID, "--revision", "v1.0"],
            f"invalid model='{HUB_ID}': is not in the Hugging Face cache at "
            "revision 'v1.0' and HF_HUB_OFFLINE=1 forbids downloading it",
        ),
        ([*gen, "--chunk-size", "0"], "invalid chunk_size=0: must be an integer >= 1"),
        ([*gen, "--replicas", "0"], "invalid replicas=0: must be an integer >= 1"),
        ([*gen, "--pool", "gpu"], "invalid store=None: a pool's replicas run on other machines"),
        ([*gen, "--pipeline-stages", "0"], "invalid pipeline_stages=0: must be an integer from 1 to 64"),
        ([*gen, "--pipeline-stages", "3"], "invalid pipeline_stages=3: must be at most the denoiser's 2 blocks"),
        ([*gen[:-1], "unet", "--pipeline-stages", "2"], "invalid pipeline_stages=2: must be 1 for StableDiffusionPi"),
        ([*gen, "--pipeline-stages", "2", "--max-memory", "cpu=1GB"], "invalid pipeline_stages=2: places each part"),
        ([*gen, "--micro-batch-size", "2"], "invalid micro_batch_size=2: needs pipeline_stages > 1"),
        ([*gen, "--pipeline-stages", "2", "--micro-batch-size", "0"], "invalid micro_batch_size=0: must be an integ"),
        (
            [*gen, "--pipeline-stages", "2", "--micro-batch-size", "4"],
            "invalid micro_batch_size=4: must be at most batch_size (1)",
        ),
        ([*gen, "--pipeline-split", "a b"], "invalid pipeline_split='a b': must be block names such as"),
        ([*gen, "--pipeline-split", "single_transformer_blocks.0"], "invalid pipeline_split=['single_transformer_b"),
        (
            [*gen, "--pipeline-stages", "2", "--pipeline-split", "transformer_blocks.0"],
            "invalid pipeline_split=['transformer_blocks.0']: must name 1 of the denoiser's blocks",
        ),
        (["tiny-model", "file"], "invalid dir='file': already exists"),
        (["tiny-model", "full"], "invalid dir='full': already exists"),
        (["tiny-model", "new", "--seed", str(2**64 + 1)], f"invalid seed={2**64 + 1}: must be an integer from 0"),
        (["batch", "a.txt", "--store", "file", "--model", model], "invalid store='file': must be a folder"),
        (["batch", "fifo.txt", "--store", "b", "--model", model], "invalid prompts_file='fifo.txt'"),
        (
            ["batch", "a.txt", "--store", "b", "--model", HUB_ID],
            f"invalid model='{HUB_ID}': is not in the Hugging Face",
        ),
        (["gc", "file"], "invalid store='file'"),
        (["gc", "store", "--older-than", "\u0667d"], "invalid older_than='\u0667d': must be a duration such as 7d"),
        ([*gen, "--offload-dir", "file"], f"invalid offload_dir='{work / 'file'}': must be a folder (or not exist"),
        ([*gen, "--offload-dir", "a.txt/x"], f"invalid offload_dir='{work / 'a.txt/x'}': must be a folder (or not"),
        (["batch", "a.txt", "--store", "b", "--model", model, "--offload-dir", "file"], "invalid offload_dir="),
        (
            [*gen, "--store", "damaged"],
            f"invalid store='damaged': must be a store this process can write into; {work}/damaged/objects/latents "
            "is not a folder",
        ),
        (["gc", "damaged"], "invalid store='damaged': must be a store this process can write into"),
        (
            ["batch", "a.txt", "--store", "damaged-batch", "--model", model],
            f"invalid store='damaged-batch/.store': must be a store this process can write into; {work}/damaged-batch"
            "/.store/objects is not a folder",
        ),
        (
            [*gen, "--out", "linked"],
            f"invalid store='{work}/linked/.store': is a symbolic link: stagediff writes only into real folders",
        ),
        ([*gen, *s3, "[1]"], "invalid storage_options='[1]': must be a JSON object"),
        *[
            ([*gen, *s3, options], f"invalid storage_options={options!r}: {allowed}")
            for options, allowed in [
                ('{"endpoint_url": 5}', "endpoint_url must be an http(s) URL such as"),
                ('{"endpoint_url": "localhost:9000"}', "endpoint_url must be an http(s) URL such as"),
                ('{"client_kwargs": {"region_name": 1}}', "client_kwargs.region_name must be a string"),
                ('{"client_kwargs": []}', "client_kwargs must be a JSON object"),
                ('{"anon": "yes"}', "anon must be true or false"),
            ]
        ],
        (  # a secret is never shown
            [*gen, *s3, '{"key": "k", "secret": 5}'],
            """invalid storage_options='{"key": "***", "secret": "***"}': secret must be a string""",
        ),
        ([*gen, "--device-groups", "0;1"], "invalid device_groups='0;1': names GPU 0, but this machine has 0 GPU(s)"),
        ([*gen, "--device-groups", "٠"], "invalid device_groups='٠': must be device groups such as"),
        (
            ["batch", "a.txt", "--store", "b", "--model", model, "--device-groups", "1"],
            "invalid device_groups='1': names GPU 1, but this machine has 0 GPU(s)",
        ),
        (
            [*gen, "--steps", "٤"],
            "stagediff generate: error: argument --steps: invalid value '٤': must be an integer in ASCII digits "
            "(0-9) (see stagediff generate --help)",
        ),
        ([*gen, "--guidance", "٣.٥"], "stagediff generate: error: argument --guidance: invalid value '٣.٥': must be"),
        (["tiny-model", "new", "--seed", "1_0"], "stagediff tiny-model: error: argument --seed: invalid value '1_0'"),
        (["batch", "a.txt", "--replicas", "²"], "stagediff batch: error: argument --replicas: invalid value '²'"),
        (
            ["generate", "--model", model],
            "stagediff generate: error: one of the arguments --prompt --prompts-file is required (see stagediff "
            "generate --help)",
        ),
        (["nope"], "argument command: invalid choice: 'nope'"),
        (
            ["generate", *too_large, *SMALL, "--model", model],
            "invalid prompts='3 prompts': are too large to travel as flow parameters (over 256 KB)",
        ),
    ]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if not p.is_fifo()
    }


def test_every_bad_input_is_one_line_exit_2_and_changes_nothing(tiny_model: Path, work: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # this machine has no GPU, whatever the test machine has
    env.pop("PREFECT_API_URL", None)
    (tmp_path / "hf").mkdir()  # an empty Hugging Face cache, never to be downloaded into
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    failures = []
    for args, expected in table(str(tiny_model), work):
        before = snapshot(work)
        proc = subprocess.run([sys.executable, "-c", RUN, *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        err = proc.stderr.strip().splitlines()
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        start = expected if expected.startswith("stagediff ") else f"stagediff: error: {expected}"
        if len(err) != 1 or not err[0].startswith(start):
            problems.append(f"stderr {proc.stderr.strip()[:300]!r}")
        if proc.stdout.split()[-2:] != ["False", "False"]:
            problems.append(f"imported {proc.stdout.strip()[-60:]!r}")
        if snapshot(work) != before:
            problems.append("files changed")
        if problems:
            failures.append(f"{[arg[:40] for arg in args]}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)
    assert not any((tmp_path / "hf").iterdir())


def test_a_store_folder_a_run_cannot_write_into_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without write permission (which binds every user but root, so it is simulated here)."""
    from stagediff.request import RequestError, check_store

    shard = tmp_path / "store" / "objects" / "latents" / "ab"
    shard.mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != shard and access(path, mode))
    with pytest.raises(RequestError, match=f"must be a store this process can write into; {shard} is not writable"):
        check_store(str(tmp_path / "store"), "out")
    monkeypatch.undo()
    assert check_store(str(tmp_path / "store"), "out") == str(tmp_path / "store")


def test_an_unreachable_prefect_server_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens on port 9
    args = ["generate", "--prompt", "a dog", *SMALL, "--model", str(tiny_model), "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", RUN, *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        "stagediff: error: invalid PREFECT_API_URL='http://127.0.0.1:9/api': no Prefect server answers there: "
        "start it (`prefect server start`) or unset the setting"
    )
    assert not (tmp_path / "out").exists()


def test_a_model_whose_weights_do_not_fit_its_config_is_one_line_before_any_stage(
    prefect_server, tiny_model: Path, tmp_path: Path
) -> None:
    """What needs the model's classes (torch) is checked in a stage process once the flow has started, before the
    first stage: a config of another size than its weights, a class transformers lacks."""
    from prefect.settings import PREFECT_API_URL

    def broken(name: str, component: str, file: str, old: str, new: str) -> Path:
        model = tmp_path / name
        shutil.copytree(tiny_model, model)
        path = model / component / file
        text = path.read_text()
        assert old in text
        path.unlink()  # a copy of its own
        path.write_text(text.replace(old, new))
        return model

    cases = [
        (broken("resized", "transformer", "config.json", '"joint_attention_dim": 32', '"joint_attention_dim": 48'),
         "component 'transformer': transformer/diffusion_pytorch_model.safetensors holds context_embedder.weight of "
         "shape [32, 32], but transformer/config.json makes it [32, 48]"),
        (broken("unknown", ".", "model_index.json", '"CLIPTextModel"', '"CLIPTextModelX"'),
         "component 'text_encoder' is declared as transformers class 'CLIPTextModelX', which this transformers lacks"),
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    for model, expected in cases:
        out = tmp_path / f"out-{model.name}"
        proc = subprocess.run([sys.executable, "-m", "stagediff.cli", "generate", "--prompt", "a dog", *SMALL,
                               "--model", str(model), "--out", str(out), "--run-id", "r"], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"stagediff: error: invalid model={str(model)!r}: {expected}"), last
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not list((out / ".store").rglob("*.safetensors")), "a stage ran"
