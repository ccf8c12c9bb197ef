"""A visitor's own changes on a gated app (see `access`): thresholds they saved and the model they
fine-tuned (and the diffusion phase of that fine-tune, which they follow). They live in the
visitor's Gradio session (`gr.State`), apply to their requests only, and are deleted with the
session."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vlmdiff.app.errors import ServiceError
from vlmdiff.thresholds import ClassThreshold

if TYPE_CHECKING:
    from vlmdiff.app.finetune_jobs import DiffusionJob

MAX_SESSION_MODELS = 16  # visitors' fine-tuned models kept on disk at once


@dataclass
class Session:
    thresholds: dict[str, ClassThreshold] = field(default_factory=dict)  # saved by this visitor
    model_dir: Path | None = None  # this visitor's fine-tuned model, in a private folder
    finetune_job: DiffusionJob | None = None  # the diffusion phase of this visitor's last fine-tune

    @property
    def has_changes(self) -> bool:
        return bool(self.thresholds) or self.model_dir is not None

    def use_model(self, folder: Path | None) -> None:
        """Switch to a newly fine-tuned model folder; the previous one is deleted."""
        previous, self.model_dir = self.model_dir, folder
        discard_model_folder(previous)

    def clear(self) -> None:
        """Forget every change and delete the private model folder."""
        self.thresholds.clear()
        self.use_model(None)


def close_session(session: Session | None) -> None:
    """`gr.State`'s delete callback: a closed or expired session leaves nothing on disk."""
    if session is not None:
        session.clear()


def discard_model_folder(model_dir: Path | None) -> None:
    """Delete a model folder made by `SessionFolders.new`, with its private parent folder."""
    if model_dir is not None:
        shutil.rmtree(model_dir.parent, ignore_errors=True)


class SessionFolders:
    """Where visitors' fine-tuned models are written: one temporary root per app process, removed at exit."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vlmdiff-sessions-"))
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)

    def new(self) -> Path:
        """A model folder path (not created yet) in a new private folder."""
        if sum(1 for _ in self.root.iterdir()) >= MAX_SESSION_MODELS:
            raise ServiceError("The app holds as many visitors' fine-tuned models as it can; try again later.")
        return Path(tempfile.mkdtemp(dir=self.root)) / "model"
