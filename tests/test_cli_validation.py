"""Bad input: a one-line error naming the parameter, exit status 2, before any model loads, OUT untouched."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stagediff.cli import main
from stagediff.request import RequestError, validate_request

GOOD = ["--prompt", "a dog", "--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "16"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An output root that already holds a run, so 'nothing changed' means something."""
    root = tmp_path / "out"
    (root / "old").mkdir(parents=True)
    (root / "old" / "manifest.json").write_text('{"run_id": "old"}\n')
    return root


@pytest.fixture(scope="module")
def broken_models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    not_pipeline = root / "not-a-pipeline"
    not_pipeline.mkdir()
    (not_pipeline / "config.json").write_text("{}")
    missing_vae = root / "missing-vae"
    shutil.copytree(tiny_model, missing_vae)
    shutil.rmtree(missing_vae / "vae")
    return {"not_pipeline": not_pipeline, "missing_vae": missing_vae}


def bad_cases(tiny_model: Path, broken: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    empty_file = tmp / "empty.txt"
    empty_file.write_text("\n  \n")
    model = ["--model", str(tiny_model)]
    return [
        (["--prompt", "", *model], "prompts"),
        (["--prompt", "   ", *model], "prompts"),
        ([*GOOD, "--height", "63", *model], "height"),
        ([*GOOD, "--width", "0", *model], "width"),
        ([*GOOD, "--height", "-16", *model], "height"),
        ([*GOOD, "--steps", "0", *model], "steps"),
        ([*GOOD, "--batch-size", "0", *model], "batch_size"),
        ([*GOOD, "--guidance", "-1", *model], "guidance"),
        ([*GOOD, "--model", str(tmp / "does-not-exist")], "model"),
        ([*GOOD, "--model", str(broken["not_pipeline"])], "model"),
        ([*GOOD, "--model", str(broken["missing_vae"])], "model"),
        ([*GOOD, "--dtype", "float8", *model], "dtype"),
        ([*GOOD, "--max-memory", "0:16GiB", *model], "max_memory"),
        ([*GOOD, "--max-memory", "gpu0=16GiB", *model], "max_memory"),
        ([*GOOD, "--max-memory", "0=lots", *model], "max_memory"),
        ([*GOOD, "--run-id", "../x", *model], "run_id"),
        ([*GOOD, "--run-id", "a/b", *model], "run_id"),
        (["--prompts-file", str(tmp / "nope.txt"), *model], "prompts_file"),
        (["--prompts-file", str(empty_file), *model], "prompts_file"),
    ]


def test_every_bad_input_is_rejected_in_one_line_with_status_2(
    tiny_model: Path, broken_models: dict[str, Path], out: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(out)
    for args, parameter in bad_cases(tiny_model, broken_models, tmp_path):
        code = main(["generate", *args, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2, args
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"stagediff: error: invalid {parameter}="), (args, err)
        assert snapshot(out) == before, args


def test_a_run_id_holding_another_run_is_refused(out: Path, tiny_model: Path, capsys) -> None:
    (out / "taken").mkdir()
    (out / "taken" / "manifest.json").write_text('{"request": {"prompts": ["something else"]}}')
    before = snapshot(out)
    assert main(["generate", *GOOD, "--model", str(tiny_model), "--out", str(out), "--run-id", "taken"]) == 2
    assert "invalid run_id='taken'" in capsys.readouterr().err
    assert snapshot(out) == before


def test_prompt_that_is_not_text_and_empty_list_are_rejected(tiny_model: Path) -> None:
    common = dict(model=str(tiny_model), run_id="r", out="x")
    with pytest.raises(RequestError, match=r"invalid prompts="):
        validate_request(prompts=[], **common)
    with pytest.raises(RequestError, match=r"invalid prompts\[0\]=7"):
        validate_request(prompts=[7], **common)


def test_console_script_exits_2_before_importing_torch(tmp_path: Path) -> None:
    # `run` is the console script's entry point: its exit code and stderr are what a user gets
    code = (
        "import atexit, sys; from stagediff.cli import run; "
        "atexit.register(lambda: print('torch' in sys.modules, 'prefect' in sys.modules)); run()"
    )
    args = ["generate", *GOOD, "--height", "65", "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip() == "stagediff: error: invalid height=65: must be a positive multiple of 16 (at most 16384)"
    )
    assert proc.stdout.split() == ["False", "False"]  # neither imported
    assert not (tmp_path / "out").exists()


def test_python_dash_m_is_the_same_command(tmp_path: Path) -> None:
    args = ["generate", *GOOD, "--height", "65", "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "stagediff", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("stagediff: error: invalid height=65")


def test_prefect_api_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stagediff import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    assert prefect_api.configured_api_url() is None
    (tmp_path / "profiles.toml").write_text(
        'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    assert prefect_api.configured_api_url() == "http://127.0.0.1:9/api"
    assert not prefect_api.server_is_up("http://127.0.0.1:9/api", timeout=0.2)  # nothing listens on port 9
