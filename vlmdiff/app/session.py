"""A visitor's own changes on a gated app (see `access`): thresholds they saved and the model they
fine-tuned (and the diffusion phase of that fine-tune, which they follow). They live in the
visitor's Gradio session (`gr.State`), apply to their requests only, and are deleted with the
session: when it closes or expires (the delete callback), when Gradio drops it from a full session
store (the object is then freed), or when the app needs room for another visitor's model
(least recently used first)."""
from __future__ import annotations

import atexit
import fcntl
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vlmdiff.app.errors import ServiceError
from vlmdiff.thresholds import ClassThreshold

if TYPE_CHECKING:
    from vlmdiff.app.finetune_jobs import DiffusionJob

MAX_SESSION_MODELS = 16  # visitors' fine-tuned models kept on disk at once
SESSIONS_PREFIX = "vlmdiff-sessions-"  # the app's folder of visitors' models, in the temporary folder
LOCK_NAME = ".alive"  # in that folder: locked while its app runs
EVICTED = ("Your fine-tuned model was removed to make room for other visitors' (the app keeps "
           f"{MAX_SESSION_MODELS}); fine-tune again to get it back.")


@dataclass(eq=False)
class Session:
    thresholds: dict[str, ClassThreshold] = field(default_factory=dict)  # saved by this visitor
    model_dir: Path | None = None  # this visitor's fine-tuned model, in a private folder
    finetune_job: DiffusionJob | None = None  # the diffusion phase of this visitor's last fine-tune
    notice: str | None = None  # something the app did to this visitor's changes, said once
    last_used: float = field(default_factory=time.monotonic)

    @property
    def has_changes(self) -> bool:
        return bool(self.thresholds) or self.model_dir is not None

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def use_model(self, folder: Path | None) -> None:
        """Switch to a newly fine-tuned model folder; the previous one is deleted."""
        previous, self.model_dir = self.model_dir, folder
        discard_model_folder(previous)

    def clear(self) -> None:
        """Forget every change and delete the private model folder."""
        self.thresholds.clear()
        self.use_model(None)

    def __del__(self) -> None:  # a session dropped without its delete callback leaves nothing on disk
        discard_model_folder(self.model_dir)


def close_session(session: Session | None) -> None:
    """`gr.State`'s delete callback: a closed or expired session leaves nothing on disk."""
    if session is not None:
        session.clear()


def discard_model_folder(model_dir: Path | None) -> None:
    """Delete a model folder made by `SessionFolders.new`, with its private parent folder."""
    if model_dir is not None:
        shutil.rmtree(model_dir.parent, ignore_errors=True)


class SessionFolders:
    """Where visitors' fine-tuned models are written: one temporary root per app process, removed at exit
    (and, after a kill, by the next app to start). At most `capacity` models at once: a new one takes the
    place of the least recently used visitor's model."""

    def __init__(self, capacity: int = MAX_SESSION_MODELS) -> None:
        sweep_abandoned_roots()
        self.capacity = capacity
        self.root = Path(tempfile.mkdtemp(prefix=SESSIONS_PREFIX))
        self._alive = open(self.root / LOCK_NAME, "w")  # held until the process ends, however it ends
        fcntl.flock(self._alive, fcntl.LOCK_EX)
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)
        self._owners: dict[Path, weakref.ref[Session]] = {}  # private folder -> the visitor it is made for
        self._lock = threading.Lock()

    def new(self, owner: Session) -> Path:
        """A model folder path (not created yet) in a new private folder for `owner`."""
        with self._lock:
            self._forget_deleted()
            while len(self._owners) >= self.capacity:
                self._evict_least_recent(owner)
            folder = Path(tempfile.mkdtemp(dir=self.root))
            self._owners[folder] = weakref.ref(owner)
            return folder / "model"

    def count(self) -> int:
        """Visitors' model folders on disk now."""
        with self._lock:
            self._forget_deleted()
            return len(self._owners)

    def _forget_deleted(self) -> None:
        for folder in [folder for folder in self._owners if not folder.exists()]:
            del self._owners[folder]

    def _evict_least_recent(self, asking: Session) -> None:
        """Drop the model of the visitor who used the app least recently (never the one asking)."""
        installed = [(owner, folder) for folder, ref in self._owners.items()
                     if (owner := ref()) is not None and owner is not asking and owner.model_dir is not None
                     and owner.model_dir.parent == folder]
        if not installed:
            raise ServiceError("The app is building as many fine-tuned models as it can hold; try again in a minute.")
        owner, folder = min(installed, key=lambda pair: pair[0].last_used)
        owner.use_model(None)
        owner.notice = EVICTED
        self._owners.pop(folder, None)


def sweep_abandoned_roots() -> None:
    """Remove the visitors' model folders of apps that were killed (no process holds their lock)."""
    for root in Path(tempfile.gettempdir()).glob(f"{SESSIONS_PREFIX}*"):
        try:
            with open(root / LOCK_NAME) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a running app's
        except OSError:
            if time.time() - root.stat().st_mtime < 60:  # created a moment ago, not locked yet
                continue
        shutil.rmtree(root, ignore_errors=True)
