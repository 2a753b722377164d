"""Live progress of a run: every item a stage process stores is reported once, as it happens.

The engine counts the items per stage and passes each report on to the listeners of this process
(the CLI's progress bars) and to one Prefect progress artifact per flow run, whose description reads
"k/N images". Torch-free; Prefect is imported only inside a flow run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from stagediff.jobs import STAGES

ARTIFACT_UPDATE_SECONDS = 1.0  # at most one progress-artifact write a second (plus the last one)
LOG_SECONDS = 10.0  # inside a flow run, a progress line in the run's log this often while items are stored

log = logging.getLogger(__name__)


@dataclass
class StageCount:
    total: int = 0  # items this stage has been given to compute so far (grows chunk by chunk)
    done: int = 0
    started: float | None = None  # when its first process started


@dataclass
class Snapshot:
    """What a listener is told: the stage that moved, every stage's counts and the run's images."""

    stage: str
    stages: dict[str, StageCount]
    images: int  # images of the run in the store (reused or computed)
    total_images: int


Listener = Callable[[Snapshot], None]
_listeners: list[Listener] = []


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener` with every progress report of the runs in this process while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


@dataclass
class Progress:
    """One run's progress: `todo` when a stage is handed items, `stored` as each is stored."""

    total_images: int
    stages: dict[str, StageCount] = field(default_factory=lambda: {stage: StageCount() for stage in STAGES})
    images: int = 0
    seen: set[tuple[str, int]] = field(default_factory=set)
    artifact: object | None = None  # the Prefect progress artifact's id, inside a flow run
    last_update: float = 0.0
    logger: logging.Logger | logging.LoggerAdapter | None = None  # the flow run's, inside a flow run
    last_log: float = 0.0
    latest: tuple[str, int] | None = None  # the last (stage, item index) stored

    def start(self) -> None:
        """Create the flow run's progress artifact (outside a flow run there is none)."""
        from prefect.artifacts import create_progress_artifact
        from prefect.runtime import flow_run

        if flow_run.id is not None:
            from prefect import get_run_logger

            self.artifact = create_progress_artifact(0.0, key="progress", description=self.description)
            self.last_update = self.last_log = time.monotonic()
            self.logger = get_run_logger()

    @property
    def description(self) -> str:
        return f"{self.images}/{self.total_images} images"

    def new_chunk(self) -> None:
        """Forget which items were reported: each chunk's stage processes report their own (bounded memory)."""
        self.seen.clear()

    def todo(self, stage: str, count: int) -> None:
        counts = self.stages[stage]
        counts.total += count
        if counts.started is None and count:
            counts.started = time.monotonic()

    def reused(self, count: int) -> None:
        """Images the store already had."""
        self.images += count
        self._update(force=False)
        self._log()

    def gathered(self, stage: str, computed: int, images: int) -> None:
        """A replica's journal segment, gathered: `computed` items of `stage` it computed (the rest it found
        stored), `images` of the run's images."""
        self.todo(stage, computed)
        self.stages[stage].done += computed
        self.images += images
        self._update(force=False)
        self._log()

    def stored(self, stage: str, index: int) -> None:
        """A stage process stored item `index` (each item is counted once per stage, whatever repeats)."""
        if (stage, index) in self.seen:
            return
        self.seen.add((stage, index))
        self.stages[stage].done += 1
        if stage == "decode":
            self.images += 1
        self.latest = (stage, index)
        snapshot = Snapshot(stage, self.stages, self.images, self.total_images)
        for listener in list(_listeners):
            listener(snapshot)
        self._update(force=False)
        self._log()

    def _log(self) -> None:
        """Every LOG_SECONDS: the run's images, each stage's items and the item stored last, in one line."""
        now = time.monotonic()
        if self.logger is None or now - self.last_log < LOG_SECONDS:
            return
        self.last_log = now
        stages = ", ".join(f"{stage} {c.done}/{c.total}" for stage, c in self.stages.items() if c.total)
        latest = f"; latest: item {self.latest[1]} ({self.latest[0]})" if self.latest else ""
        self.logger.info("progress: %d/%d images (items computed: %s)%s", self.images, self.total_images,
                         stages or "none yet", latest)  # fmt: skip

    def finish(self) -> None:
        self._update(force=True)

    def _update(self, force: bool) -> None:
        if self.artifact is None:
            return
        now = time.monotonic()
        if not force and now - self.last_update < ARTIFACT_UPDATE_SECONDS and self.images < self.total_images:
            return
        from prefect.artifacts import update_progress_artifact

        self.last_update = now
        value = 100.0 * self.images / max(1, self.total_images)
        try:
            update_progress_artifact(self.artifact, value, description=self.description)
        except Exception as exc:  # progress is a view: a failed update never fails the run
            log.warning("could not update the progress artifact: %s", exc)
