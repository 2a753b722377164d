"""Prompts files and batch bookkeeping, as plain functions: no Prefect engine, no model."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

import pytest

from stagediff.artifacts import atomic_write_bytes
from stagediff.batch import (
    BatchFileError,
    auto_id,
    item_entry,
    new_manifest,
    plan,
    read_batch_file,
    record_images,
    start_run,
    store_lock,
)
from stagediff.engine import FIRST_CHUNK, Item, next_chunk_size, order_by_group
from stagediff.jobs import DenoiseSettings, StageResult
from stagediff.request import MAX_SEED, ImageSettings, RequestError

DEFAULTS = ImageSettings(steps=28, guidance=3.5, height=1024, width=1024)


def shown(item) -> tuple:
    """An item's steps, guidance, height and width, the run's DEFAULTS where it has none of its own."""
    s = item.settings(DEFAULTS)
    return (s.steps, s.guidance, s.height, s.width)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_one_prompt_a_line_blank_lines_skipped_seed_plus_position(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "a dog\n\n  a cat  \nblue sky\n")
    items = read_batch_file(path, seed=10)
    assert [(i.line, i.position, i.prompt, i.seed) for i in items] == [
        (1, 0, "a dog", 10),
        (3, 1, "a cat", 11),
        (4, 2, "blue sky", 12),
    ]
    assert all(i.settings(DEFAULTS) == DEFAULTS and i.negative_prompt is None for i in items)
    assert items[0].id == auto_id(0, {"prompt": "a dog"}) and items[0].image == f"images/{items[0].id}.png"


def test_appending_lines_keeps_the_ids_and_seeds_of_the_lines_above(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "a dog\na cat\n")
    before = read_batch_file(path, seed=0)
    path.write_text("a dog\na cat\na forest\n")
    after = read_batch_file(path, seed=0)
    assert after[:2] == before and after[2].id not in {i.id for i in before}


def test_jsonl_all_columns(tmp_path: Path) -> None:
    lines = [
        {"prompt": "a dog", "id": "dog-1", "seed": 5, "steps": 2, "guidance": 1.5, "height": 64, "width": 48},
        {"prompt": "a cat", "negative_prompt": "blurry"},
    ]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    dog, cat = read_batch_file(path, seed=100)
    assert (dog.id, dog.seed, shown(dog), dog.image) == ("dog-1", 5, (2, 1.5, 64, 48), "images/dog-1.png")
    assert (cat.seed, shown(cat), cat.negative_prompt) == (101, (28, 3.5, 1024, 1024), "blurry")


def test_csv_with_the_same_columns_empty_cells_take_the_defaults(tmp_path: Path) -> None:
    text = 'id,prompt,seed,steps,width\nd,a dog,7,2,\nc,"a cat,\non two lines",,,32\nf,a forest,,,\n'
    items = read_batch_file(write(tmp_path, "p.csv", text), seed=0)
    assert [(i.id, i.line, i.prompt, i.seed, *shown(i)[::3]) for i in items] == [
        ("d", 2, "a dog", 7, 2, 1024),
        ("c", 3, "a cat,\non two lines", 1, 28, 32),
        ("f", 5, "a forest", 2, 28, 1024),
    ]


def test_every_bad_line_is_reported_at_once_with_line_column_value_and_what_is_allowed(tmp_path: Path) -> None:
    lines = [
        '{"prompt": "fine"}',
        '{"prompt": "a dog", "steps": 0}',
        "not json",
        '{"prompt": "x", "height": 70, "color": "red"}',
        '{"prompt": ""}',
        '{"id": "a/b", "prompt": "y"}',
        '{"prompt": "z", "seed": -1, "guidance": "much"}',
        '{"negative_prompt": 3, "steps": true}',
        '{"id": "fine-id", "prompt": "p"}',
        '{"id": "fine-id", "prompt": "q"}',
    ]
    path = write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(BatchFileError) as caught:
        read_batch_file(path, seed=0)
    found = {(p.line, p.column) for p in caught.value.problems}
    assert found == {
        (2, "steps"),
        (3, "(line)"),
        (4, "height"),
        (4, "color"),
        (5, "prompt"),
        (6, "id"),
        (7, "seed"),
        (7, "guidance"),
        (8, "negative_prompt"),
        (8, "steps"),
        (8, "prompt"),
        (10, "id"),
    }
    message = [line.strip() for line in str(caught.value).splitlines()]
    assert len(message) == 1 + len(found) and "nothing was computed" in message[0]
    assert str(path) in message[0]
    assert "line 2, column steps: invalid value 0: must be an integer from 1 to 1000" in message
    assert "line 4, column height: invalid value 70: must be a positive multiple of 16 (at most 16384)" in message
    assert any("line 10, column id: invalid value 'fine-id': must be unique; line 9 has it" in m for m in message)
    assert any("line 4, column color: invalid value 'red': is not a column; columns: id, prompt" in m for m in message)


def test_csv_header_problems_are_reported_on_line_1(tmp_path: Path) -> None:
    with pytest.raises(BatchFileError) as caught:
        read_batch_file(write(tmp_path, "p.csv", "text,steps\na dog,2\n"), seed=0)
    assert {(p.line, p.column, p.value) for p in caught.value.problems} == {
        (1, "(header)", "text"),
        (1, "(header)", "text,steps"),
    }


def test_csv_bad_cells_and_a_row_with_too_many_cells(tmp_path: Path) -> None:
    text = "prompt,steps,guidance\na dog,two,1\na cat,2,-1,extra\n"
    with pytest.raises(BatchFileError) as caught:
        read_batch_file(write(tmp_path, "p.csv", text), seed=0)
    assert {(p.line, p.column) for p in caught.value.problems} == {(2, "steps"), (3, "guidance"), (3, "(row)")}


@pytest.mark.parametrize(
    ("name", "text", "allowed"),
    [
        ("p.yaml", "a: b", "the extension picks the format"),
        ("missing.txt", None, "must be an existing UTF-8"),
        ("empty.txt", "\n\n", "is empty"),
    ],
)
def test_unreadable_files_are_one_line_request_errors(
    tmp_path: Path, name: str, text: str | None, allowed: str
) -> None:
    path = tmp_path / name if text is None else write(tmp_path, name, text)
    with pytest.raises(RequestError) as caught:
        read_batch_file(path, seed=0)
    assert caught.value.parameter == "prompts_file" and allowed in str(caught.value) and "\n" not in str(caught.value)


def test_default_seeds_must_stay_in_range(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="seed"):
        read_batch_file(write(tmp_path, "p.txt", "a\nb\n"), seed=MAX_SEED)


def test_items_are_ordered_by_settings_group_and_later_chunks_sized_from_measured_loads(tmp_path: Path) -> None:
    lines = [{"prompt": f"p{i}", "steps": 2 if i % 2 else 4} for i in range(7)]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(line) for line in lines))
    rows = read_batch_file(path, seed=0)
    items = [Item(r.position, r.prompt, None, r.seed, settings(r.settings(DEFAULTS))) for r in rows]
    assert [i.index for i in order_by_group(items)] == [0, 2, 4, 6, 1, 3, 5]
    # 3 s of loading and start-up, 0.1 s an item: a chunk of n items reloads at most 3% of its work
    measured = [StageResult(items=[None] * 10, load_seconds=1.0, compute_seconds=0.5, process={"startup_seconds": 0})
                for _ in range(3)]  # fmt: skip
    size = next_chunk_size(measured)
    assert 3.0 / (size * 0.15) <= 0.03 / 0.97 < 3.0 / ((size - 1) * 0.15)
    assert next_chunk_size([StageResult(items=[None], load_seconds=0.01, compute_seconds=1.0)]) == FIRST_CHUNK


def settings(s: ImageSettings) -> DenoiseSettings:
    return DenoiseSettings(s.steps, s.guidance, s.height, s.width, 512)


def entries(path: Path, model: str) -> list[dict]:
    """The flow's manifest entries, with a stand-in for the key function (model, prompt, seed, settings)."""
    listed = []
    for row in read_batch_file(path, 0):
        resolved = {**row.settings(DEFAULTS).model_dump(), "model": model}
        key = hashlib.sha256(json.dumps([row.prompt, row.seed, resolved], sort_keys=True).encode()).hexdigest()
        listed.append(item_entry(row, resolved, {"embeddings": key, "latents": key, "images": key}))
    return listed


def finish(manifest: dict, store: Path, todo: list[str]) -> None:
    """What the flow does for the items to do, with fake images instead of the stages."""
    run = start_run(manifest, "p.jsonl", None, todo)
    by_id = {e["id"]: e for e in manifest["items"]}
    record_images(manifest, run, {i: atomic_write_bytes(store / by_id[i]["image"], i.encode()) for i in todo})


def test_plan_skips_done_items_and_redoes_changed_corrupted_or_failed_ones(tmp_path: Path) -> None:
    store, model = tmp_path / "store", "/models/tiny"
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "id": "a"}\n{"prompt": "b", "id": "b"}\n{"prompt": "c"}\n')
    manifest = new_manifest()
    todo = plan(manifest, entries(path, model), store)
    assert len(todo) == 3 and {e["status"] for e in manifest["items"]} == {"pending"}
    finish(manifest, store, todo)
    assert plan(manifest, entries(path, model), store) == []
    assert [e["status"] for e in manifest["items"]] == ["done"] * 3 and manifest["runs"][0]["computed"] == 3

    # Another model, another seed for "a", a corrupted image of "b" and a removed line "c"; a new line "d".
    (store / "images/b.png").write_bytes(b"garbage")
    path.write_text('{"prompt": "a", "id": "a", "seed": 9}\n{"prompt": "b", "id": "b"}\n{"prompt": "d"}\n')
    todo = plan(manifest, entries(path, model), store)
    assert [e["prompt"] for e in manifest["items"] if e["id"] in todo] == ["a", "b", "d"]
    assert [e["status"] for e in manifest["items"]] == ["pending", "pending", "pending", "removed"]
    finish(manifest, store, todo)

    # "c" comes back at its old place: its image is still there. Another model redoes everything.
    path.write_text('{"prompt": "a", "id": "a", "seed": 9}\n{"prompt": "b", "id": "b"}\n{"prompt": "c"}\n')
    assert plan(manifest, entries(path, model), store) == []
    assert [e["status"] for e in manifest["items"]] == ["done", "done", "done", "removed"]
    assert len(plan(manifest, entries(path, "/models/other"), store)) == 3


def test_a_second_run_on_a_store_waits_for_the_first(tmp_path: Path) -> None:
    entered = threading.Event()

    def second() -> None:
        with store_lock(tmp_path / "store", logging.getLogger("test")):
            entered.set()

    with store_lock(tmp_path / "store", logging.getLogger("test")):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.5)
    thread.join(5)
    assert entered.is_set()
