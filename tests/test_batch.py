"""Prompts files and batch bookkeeping, as plain functions: no Prefect engine, no stage process (the tiny model
is only read for its family's defaults)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from stagediff.artifacts import Store
from stagediff.batch import (
    BatchFileError,
    auto_id,
    check_batch_file,
    file_format,
    read_batch_file,
    run_items,
    store_lock,
)
from stagediff.engine import FIRST_CHUNK, Engine, Item, StageRecord, Stored, next_chunk_size, order_by_group
from stagediff.jobs import DenoiseSettings, ItemRef, StageContext, StageResult
from stagediff.request import MAX_SEED, ImageSettings, RequestError
from stagediff.run_manifest import RunFolder
from stagediff.sources import commit, open_source, staging
from tests.conftest import read_items

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
    assert check_batch_file(path, seed=10) == (3, hashlib.sha256(path.read_bytes()).hexdigest())


def test_appending_lines_keeps_the_ids_and_seeds_of_the_lines_above(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "a dog\na cat\n")
    before = read_batch_file(path, seed=0)
    path.write_text("a dog\na cat\na forest\n")
    after = read_batch_file(path, seed=0)
    assert after[:2] == before and after[2].id not in {i.id for i in before}


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_a_share_from_item_k_on_is_the_files_items_from_k_on(tmp_path: Path, tiny_model: Path, fmt: str) -> None:
    # blank lines, whitespace that only str.strip sees (ASCII too: \x1c-\x1f), a byte order mark, a CSV row over two
    # lines
    prompts = ["a fox", "the same fox, again", "a \u3000wide\u3000 space", "ünïcödé", "a\nline break", "last"]
    if fmt == "txt":
        text = "\ufeff\n" + "\n \t\n\u3000\u2003\n\x1c\x1f\n".join(p.replace("\n", " ") for p in prompts) + "\n\n"
    elif fmt == "jsonl":
        text = "\ufeff" + "\n\u3000\n".join(json.dumps({"prompt": p, "seed": i}) for i, p in enumerate(prompts)) + "\n"
    else:
        text = "\ufeffprompt,steps\n" + "".join(f'"{p}",{i + 1}\n' for i, p in enumerate(prompts))
    path = write(tmp_path, f"p.{fmt}", text)
    args = (fmt, 5, DEFAULTS, str(tiny_model), path.name)
    with path.open("rb") as f:
        every = [(row, asdict(item.settings), item) for row, item in run_items(f, *args)]
    assert len(every) == len(prompts)
    for k in range(len(prompts) + 2):
        with path.open("rb") as f:
            assert [(row, asdict(item.settings), item) for row, item in run_items(f, *args, start=k)] == every[k:]


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
    # the first stage process waited 8 s for the stage server's imports: later chunks do not, so it counts as
    # the quickest start-up measured (as if all three had started in 0.03 s)
    first = [StageResult(items=[None] * 10, load_seconds=1.0, compute_seconds=0.5, process={"startup_seconds": s})
             for s in (8.0, 0.03, 0.03)]  # fmt: skip
    quick = [StageResult(items=[None] * 10, load_seconds=1.0, compute_seconds=0.5, process={"startup_seconds": 0.03})
             for _ in range(3)]  # fmt: skip
    assert next_chunk_size(first) == next_chunk_size(quick) < next_chunk_size(first[:1] * 3)


def settings(s: ImageSettings) -> DenoiseSettings:
    return DenoiseSettings(s.steps, s.guidance, s.height, s.width, 512)


class FakeEngine(Engine):
    """The run engine with a stand-in for the key function (model, prompt, seed, settings) and, instead of the
    stage processes, a small PNG per item: the batch bookkeeping without a model's stages."""

    def __init__(self, tiny_model: Path, store: Path, model: str, fail: bool = False) -> None:
        super().__init__(StageContext(str(tiny_model), str(store), str(store / ".store"), "float32"), identity=None,
                         prefect_tasks=False)  # fmt: skip
        self.model, self.fail, self.computed, self.keyed = model, fail, [], 0

    def key_context(self) -> str:
        return self.model  # all that its keys depend on besides the item

    def keys(self, item: Item) -> dict[str, str]:
        self.keyed += 1
        key = hashlib.sha256(json.dumps([self.model, item.prompt, item.seed, asdict(item.settings)]).encode())
        return dict.fromkeys(("embeddings", "latents", "images"), key.hexdigest())

    def run_chunk(self, chunk, keys, label, on_stored, progress) -> list:
        store = self.ctx.open_store()
        self.on_listed(chunk, keys)
        if self.fail:
            raise RuntimeError("the decode stage failed")
        todo, found, damaged = self.missing(store, "decode", chunk, keys)
        made = dict.fromkeys(found, "reused")
        stage = self.stages.setdefault("decode", StageRecord())
        stage.reused, stage.computed = stage.reused + len(found), stage.computed + len(todo)
        for item in todo:
            saved = store.save_png("images", keys[item.index]["images"], Image.new("RGB", (4, 4)), {"by": "test"})
            found[item.index] = ItemRef(item.index, "images", saved.key, saved.sha256)
            made[item.index] = "recomputed" if item.index in damaged else "computed"
        self.computed += [item.prompt for item in todo]
        on_stored(Stored("decode", chunk, keys, found, made))
        return []


def run_batch(
    tiny_model: Path,
    path: Path,
    store: Path,
    model: str = "/models/tiny",
    fail: bool = False,
    keyed: list | None = None,
):
    """What the batch flow does around the stages: the file stored, the folder's record, the engine over the file's
    items; returns (summary, prompts computed, every item of the record in items.jsonl's order). `keyed` gets the
    number of items whose keys the engine made."""
    engine = FakeEngine(tiny_model, store, model, fail)
    blobs = Store(engine.ctx.store)
    with staging(blobs) as staged:
        count, sha256 = check_batch_file(path, 0, staged)
        source = commit(blobs, staged, sha256, file_format(path), count)
    folder = RunFolder(store, "batch", "batch.json", {"kind": "stagediff-batch"})
    folder.start(engine, blobs, count)

    def items():
        with open_source(blobs, source) as stream:
            for row, item in run_items(stream, source.format, 0, DEFAULTS, str(tiny_model)):
                folder.ids[item.index] = (row.id, row.line)
                yield item

    try:
        engine.run(items(), **folder.hooks())
        summary = folder.finish("completed")
    except RuntimeError as exc:
        summary = folder.finish("failed", str(exc))
    every = [*folder.record.items("WHERE status != 'removed'"), *folder.record.items("WHERE status = 'removed'")]
    folder.close()
    if keyed is not None:
        keyed.append(engine.keyed)
    return summary, engine.computed, every


def test_a_run_skips_done_items_and_redoes_changed_or_failed_ones(tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "id": "a"}\n{"prompt": "b", "id": "b"}\n{"prompt": "c"}\n')
    summary, computed, items = run_batch(tiny_model, path, store)
    assert computed == ["a", "b", "c"] and [e["status"] for e in items] == ["done"] * 3
    assert [e["made"]["images"] for e in items] == ["computed"] * 3 and {e["run"] for e in items} == {1}
    assert summary["counts"] == {"items": 3, "done": 3, "pending": 0, "failed": 0, "removed": 0,
                                 "computed_by_this_run": 3}  # fmt: skip
    assert summary["runs"][0]["computed"] == 3 and summary["stages"]["decode"]["computed"] == 3
    assert read_items(store) == items and summary["first_items"] == items
    assert all((store / e["image"]).is_file() for e in items)
    keyed: list[int] = []
    summary, computed, items = run_batch(tiny_model, path, store, keyed=keyed)
    assert computed == [] and [e["status"] for e in items] == ["done"] * 3
    assert [e["made"]["images"] for e in items] == ["computed"] * 3 and {e["run"] for e in items} == {1}  # kept
    assert keyed == [0]  # the record holds their keys, made under the same key context: not made again
    assert summary["counts"]["computed_by_this_run"] == 0 and summary["stages"]["decode"]["reused"] == 3
    assert [(r["run"], r["computed"], r["done"]) for r in summary["runs"]] == [(1, 3, 3), (2, 0, 3)]

    # Another seed for "a" and a removed line "c"; a new line "d".
    path.write_text('{"prompt": "a", "id": "a", "seed": 9}\n{"prompt": "b", "id": "b"}\n{"prompt": "d"}\n')
    summary, computed, items = run_batch(tiny_model, path, store)
    assert computed == ["a", "d"]
    assert [(e["prompt"], e["seed"], e["status"], e["run"]) for e in items] == [
        ("a", 9, "done", 3),
        ("b", 1, "done", 1),
        ("d", 2, "done", 3),
        ("c", 2, "removed", 1),  # removed items last
    ]
    assert summary["counts"]["removed"] == 1 and summary["counts"]["computed_by_this_run"] == 2
    assert read_items(store) == items

    # "c" comes back at its old place: its image is still there. A failed run leaves its items failed, the next
    # run makes them; another model redoes everything.
    path.write_text('{"prompt": "a", "id": "a", "seed": 9}\n{"prompt": "b", "id": "b"}\n{"prompt": "c"}\n')
    summary, computed, items = run_batch(tiny_model, path, store)
    assert computed == [] and [e["status"] for e in items] == ["done"] * 3 + ["removed"]  # "d"
    assert [e["run"] for e in items] == [3, 1, 1, 3]
    with path.open("a") as f:
        f.write('{"prompt": "e"}\n')
    summary, computed, items = run_batch(tiny_model, path, store, fail=True)
    assert summary["status"] == "failed" and summary["runs"][-1]["status"] == "failed"
    assert [(e["prompt"], e["status"]) for e in items] == [("a", "done"), ("b", "done"), ("c", "done"),
                                                           ("e", "failed"), ("d", "removed")]  # fmt: skip
    summary, computed, items = run_batch(tiny_model, path, store)
    assert computed == ["e"] and [e["status"] for e in items] == ["done"] * 4 + ["removed"]
    summary, computed, items = run_batch(tiny_model, path, store, model="/models/other", keyed=keyed)
    assert computed == ["a", "b", "c", "e"] and summary["counts"]["computed_by_this_run"] == 4
    assert keyed == [0, 4]  # another key context: every key made again
    assert [r["computed"] for r in summary["runs"]] == [2, 0, 0, 1, 4]  # the last 5 runs


def test_a_corrupted_image_is_computed_again_and_counted_once(tiny_model: Path, tmp_path: Path, caplog) -> None:
    store = tmp_path / "store"
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "id": "a"}\n{"prompt": "b", "id": "b"}\n')
    run_batch(tiny_model, path, store)
    (store / "images/b.png").write_bytes(b"garbage")  # a link to the store's object: the object is damaged
    caplog.clear()
    summary, computed, items = run_batch(tiny_model, path, store)
    assert computed == ["b"] and [e["status"] for e in items] == ["done", "done"]
    assert [(e["run"], e["made"]["images"]) for e in items] == [(1, "computed"), (2, "recomputed")]
    assert Store(store / ".store").check("images", items[1]["keys"]["images"]) is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "is corrupted" in warnings[0] and "computing it again" in warnings[0], warnings
    assert summary["stages"]["decode"]["damaged"] == 1
    assert summary["counts"]["computed_by_this_run"] == 1 and summary["runs"][-1]["computed"] == 1


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
