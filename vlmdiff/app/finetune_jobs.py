"""The diffusion phase of a fine-tune, run after the quick phase by one background worker thread.

The quick phase (memory + threshold, seconds) makes a class usable at once with the model's generic
reconstruction; the diffusion phase (minutes) then adapts the reconstruction to the class. Jobs run
one at a time in a daemon thread, in the order they were queued; each job says how far it is.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PIL import Image

from vlmdiff.allocator import release_freed_memory
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.limits import MAX_DIFFUSION_JOBS
from vlmdiff.model_folder import read_training_record

if TYPE_CHECKING:
    from vlmdiff.app.session import Session

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, DROPPED = "queued", "running", "finished", "failed", "dropped"
QUEUE_FULL = (f"{MAX_DIFFUSION_JOBS} diffusion fine-tunes are queued or running, as many as the app takes; start "
              "yours when one has finished, or with 0 steps (memory and threshold only) now.")


def finetuned_classes(folder: Path) -> set[str]:
    """The classes the model in `folder` was fine-tuned on (its training record's `finetunes`)."""
    try:
        record = read_training_record(folder)
    except ValueError:
        return set()
    return {entry.get("class_name") for entry in record.get("finetunes", [])} - {None}


def generic_reconstruction(folder: Path, class_name: str) -> bool:
    """Whether the model in `folder` reconstructs `class_name` with its generic diffusion: the class came
    from fine-tunes that all stopped after the quick phase (0 steps in training.json's `finetunes`) and the
    diffusion was not trained on it from scratch."""
    try:
        record = read_training_record(folder)
    except ValueError:  # an unreadable record says nothing either way
        return False
    entries = [entry for entry in record.get("finetunes", []) if entry.get("class_name") == class_name]
    trained = class_name in record.get("classes", ()) or any(entry.get("steps") for entry in entries)
    return bool(entries) and not trained


class JobCancelled(Exception):
    """Raised from a job's progress report when its result is no longer wanted: training stops there."""


@dataclass(eq=False)
class DiffusionJob:
    """The diffusion phase of one fine-tune: what it trains, the quick-phase model it starts from, whose
    model it changes (`owner` None: the shared model; a visitor's session is held weakly, so a session
    the app has forgotten cancels its job) and how far it is."""

    class_name: str
    steps: int
    images: list[Image.Image]
    source: Path
    owner: InitVar[Session | None] = None
    state: str = QUEUED
    stage: str = "waiting for the worker"
    message: str = ""  # the outcome in plain words, once finished
    started: float | None = None
    _owner: weakref.ref | None = field(init=False, default=None, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self, owner: Session | None) -> None:
        self._owner = None if owner is None else weakref.ref(owner)

    @property
    def shared(self) -> bool:
        """Whether it changes the shared model (not a visitor's own)."""
        return self._owner is None

    @property
    def session(self) -> Session | None:
        """The visitor whose model it changes, while their session lives (None for the shared model)."""
        return None if self._owner is None else self._owner()

    @property
    def steps_text(self) -> str:
        return f"{self.steps} step{'s' * (self.steps != 1)}"

    @property
    def wanted(self) -> bool:
        """Whether its result is still wanted: the model it changes is still its source (a visitor may have
        dropped their changes or left meanwhile; the shared model cannot be reset while it runs)."""
        if self.shared:
            return True
        session = self.session
        return session is not None and session.model_dir == self.source

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or `timeout` seconds have passed (False)."""
        return self._finished.wait(timeout)

    def report(self, fraction: float, stage: str) -> None:
        """The library's progress callback (its stage names the training step); JobCancelled stops the
        training when the result is no longer wanted."""
        if not self.wanted:
            raise JobCancelled(self.class_name)
        self.state, self.stage = RUNNING, stage
        self.started = self.started or time.time()

    def finish(self, state: str, message: str) -> None:
        self.state, self.message, self.images = state, message, []  # the images are no longer needed
        self._finished.set()

    def progress(self) -> str:
        """Where the job is, in words."""
        if self.state != RUNNING:
            return self.stage
        return f"{self.stage} ({time.time() - self.started:.0f} s so far)"

    def describe(self) -> str:
        """Markdown for the Fine-tune tab and the /finetune_progress endpoint."""
        title = f"**Diffusion fine-tune of class {self.class_name!r}** ({self.steps_text})"
        if self.finished:
            return f"{title}: {self.state}. {self.message}"
        return (f"{title}: {self.progress()}. Until it finishes the class works with its memory and threshold "
                "and the model's generic reconstruction.")


class DiffusionWorker:
    """Runs queued jobs one at a time in a daemon thread (started with the first job; it ends with the app).
    `run` does the work and finishes the job; an error it lets through fails the job."""

    def __init__(self, run: Callable[[DiffusionJob], None], capacity: int = MAX_DIFFUSION_JOBS) -> None:
        self._run = run
        self.capacity = capacity
        self._queue: queue.Queue[DiffusionJob] = queue.Queue()
        self._jobs: list[DiffusionJob] = []  # queued or running
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def full(self) -> bool:
        """Whether `capacity` jobs are queued or running (a new one would be refused)."""
        with self._lock:
            self._jobs = [waiting for waiting in self._jobs if not waiting.finished]
            return len(self._jobs) >= self.capacity

    def submit(self, job: DiffusionJob) -> None:
        """Queue the job; ServiceError when `capacity` jobs are queued or running already."""
        with self._lock:
            self._jobs = [waiting for waiting in self._jobs if not waiting.finished]
            if len(self._jobs) >= self.capacity:
                raise ServiceError(QUEUE_FULL)
            if self._jobs:
                job.stage = f"queued behind {len(self._jobs)} other fine-tune(s); it starts when they have finished"
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vlmdiff-diffusion", daemon=True)
                self._thread.start()
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._run(job)
            except Exception as error:  # noqa: BLE001 - the worker outlives any one job
                log.exception("the diffusion phase of a fine-tune failed unexpectedly")
                job.finish(FAILED, f"Something went wrong: {error or 'no details'}.")
            finally:
                release_freed_memory()  # the training's buffers, freed with the job's images
