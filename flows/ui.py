"""What the flows show in the Prefect UI: the flow run's name and tags, and each run's table and gallery
artifacts (the progress artifact is `stagediff.progress`'s).

Tags: the flow run carries `model:<name>`. A tag concurrency limit on `device:<STAGEDIFF_DEVICE or
"local">` keeps stages of different runs from sharing one device (`prefect concurrency-limit create
device:local 1`); stage task runs carry the device and model tags that such a limit exists for.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run

from stagediff.default_model import DEFAULT_MODEL_NAME

TABLE_ROWS = 50  # the table artifact lists the first and the latest items, this many of each at most
GALLERY_IMAGES = 8
THUMBNAIL_PIXELS = 128


def model_tag(model: str | None) -> str:
    """`model:<folder name>` for a local pipeline folder, `model:<org/name>` for a Hub id."""
    if not model:
        return f"model:{DEFAULT_MODEL_NAME}"
    return f"model:{Path(model).name}" if Path(model).exists() else f"model:{model}"


def device_tag() -> str:
    """The tag that a concurrency limit of 1 turns into "one stage at a time on this device"."""
    return f"device:{os.environ.get('STAGEDIFF_DEVICE') or 'local'}"


def stage_tags(model: str | None) -> set[str]:
    """The device and model tags that a concurrency limit exists for, looked up once per flow run.

    Prefect takes a slot of every tag of a task run before it starts: a write to the server per
    stage, which on a SQLite server can collide with the server's own writes ("database is locked",
    answered 503 and retried ~2 s later). A tag nobody limits would pay that for nothing.
    """
    tags = {model_tag(model), device_tag()}
    if flow_run.id is None:
        return tags
    limited = set()
    with get_client(sync_client=True) as client:
        for tag in tags:
            with contextlib.suppress(ObjectNotFound):
                client.read_concurrency_limit_by_tag(tag)
                limited.add(tag)
    return limited


def label_flow_run(name: str | None, *tags: str) -> None:
    """Add tags to the running flow run (and rename it, given a `name`), so runs can be found in the UI."""
    if flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name, tags=sorted({*flow_run.tags, *tags}))


def items_table(first: list[dict[str, Any]], latest: list[dict[str, Any]], total: int, key: str, what: str) -> str:
    """Table artifact `key`: the first and the latest items (TABLE_ROWS of each at most), a row saying how many
    are not shown, and where the full list is (`what`)."""
    shown = first[:TABLE_ROWS]
    seen = {row["id"] for row in shown}
    recent = [row for row in latest[:TABLE_ROWS] if row["id"] not in seen]
    rest = total - len(shown) - len(recent)
    rows = shown + ([{"id": f"... {rest} more ..."}] if rest > 0 else []) + recent
    described = f"first {len(shown)} and latest {len(recent)} of {total}" if rest > 0 else f"all {total}"
    return str(create_table_artifact(rows, key=key, description=f"Items ({described}); every item: {what}"))


def run_artifacts(folder: Any, key: str, title: str) -> None:
    """A finished run's item table and gallery (`folder`: a `run_manifest.RunFolder`)."""
    record, where = folder.record, folder.folder.resolve()

    def row(e: dict[str, Any]) -> dict[str, Any]:
        s = e["settings"]
        return {"index": e["index"], "id": e["id"], "status": e["status"], "prompt": e["prompt"], "seed": e["seed"],
                "steps": s.get("steps"), "size": f"{s.get('width')}x{s.get('height')}",
                "made": e["made"]["images"] if e["run"] == record.run else "done before",
                "image": str(where / e["image"])}  # fmt: skip

    counts = record.counts()
    total = counts["items"] + counts["removed"]
    first, latest = [row(e) for e in record.first(TABLE_ROWS)], [row(e) for e in record.latest(TABLE_ROWS)]
    items_table(first, latest, total, key=f"{key}-items", what=str(where / "items.jsonl"))
    # The gallery shows what this run made; a run that made nothing shows the first images
    new = list(record.items("WHERE status = 'done' AND run = ? AND made_images != 'reused'", (record.run,),
                            limit=GALLERY_IMAGES))  # fmt: skip
    shown = new or list(record.items("WHERE status = 'done'", limit=GALLERY_IMAGES))
    made = counts["computed_by_this_run"]
    what = f"first {len(shown)} of the {made} new images" if new else f"first {len(shown)} images"
    images = [(where / e["image"], caption(e["prompt"], e["seed"])) for e in shown]
    gallery(images, key=f"{key}-gallery", title=f"{title}: {counts['done']} images, {what}", where=str(where))


def _thumbnail(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def caption(prompt: str, seed: int, limit: int = 60) -> str:
    text = prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ") + f"<br>seed {seed}"


def gallery(images: list[tuple[Path, str]], key: str, title: str, where: str) -> str:
    """Markdown artifact `key`: thumbnails (inline, so the UI needs no file access) of the first GALLERY_IMAGES
    `(image, caption)` pairs."""
    shown = images[:GALLERY_IMAGES]
    cells = [f"![image]({_thumbnail(path)})<br>{text}" for path, text in shown]
    lines = [f"# {title}", "", f"Folder: `{where}`", ""]
    if cells:
        columns = min(4, len(cells))
        rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
        lines += ["| " + " | ".join([" "] * columns) + " |", "|" + "---|" * columns]
        lines += ["| " + " | ".join(row + [" "] * (columns - len(row))) + " |" for row in rows]
    else:
        lines.append("No images yet.")
    return str(create_markdown_artifact("\n".join(lines), key=key, description=title))
