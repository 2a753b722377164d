"""The CLI's view of a run's progress: a bar per stage (items, rate, ETA) on a terminal, plain lines otherwise."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TextIO

from stagediff.progress import Snapshot, listening

LINE_SECONDS = 5.0  # plain lines: at most one per stage this often (and the stage's last item)


def rate_and_eta(done: int, total: int, started: float | None) -> tuple[float, float | None]:
    elapsed = time.monotonic() - (started or time.monotonic())
    rate = done / elapsed if elapsed > 0 else 0.0
    return rate, ((total - done) / rate if rate > 0 else None)


@contextlib.contextmanager
def progress_view(stream: TextIO) -> Iterator[None]:
    if stream.isatty():
        with _bars(stream):
            yield
        return
    last: dict[str, float] = {}

    def line(snapshot: Snapshot) -> None:
        counts = snapshot.stages[snapshot.stage]
        now = time.monotonic()
        if counts.done < counts.total and now - last.get(snapshot.stage, 0.0) < LINE_SECONDS:
            return
        last[snapshot.stage] = now
        rate, eta = rate_and_eta(counts.done, counts.total, counts.started)
        left = f", ETA {eta:.0f} s" if eta is not None and counts.done < counts.total else ""
        print(
            f"{snapshot.stage}: {counts.done}/{counts.total} items, {rate:.2f} items/s{left}", file=stream, flush=True
        )

    with listening(line):
        yield


@contextlib.contextmanager
def _bars(stream: TextIO) -> Iterator[None]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description:8s}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=Console(file=stream), transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(snapshot: Snapshot) -> None:
            counts = snapshot.stages[snapshot.stage]
            if snapshot.stage not in tasks:
                tasks[snapshot.stage] = bars.add_task(snapshot.stage, total=counts.total, rate="")
            rate, _ = rate_and_eta(counts.done, counts.total, counts.started)
            bars.update(tasks[snapshot.stage], total=counts.total, completed=counts.done, rate=f"{rate:.2f} items/s")

        with listening(update):
            yield
