"""Where the app's model lives: the shipped (or given) model, never written, and a user model folder.

Saved thresholds and fine-tuned classes go to the user folder, a copy of the source model made on
the first change. The app loads the user folder when it exists and can reset to the source.
The user folders live under `VLMDIFF_USER_MODELS` (default: ~/.cache/vlmdiff/user-models),
one per source model (`vlmdiff finetune` and `calibrate` write there too when given no --out).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from vlmdiff.model_folder import (  # noqa: F401 - USER_MODELS_ENV, default_user_models_dir: this module's API
    MODEL_INDEX, USER_MODELS_ENV, copy_model_folder, default_user_models_dir, resolve_model_folder, user_model_folder,
)


class ModelStore:
    """The source model (a folder or hub id, read-only) and its user copy (written by the app)."""

    def __init__(self, source: str | Path, user_models_dir: str | Path | None = None) -> None:
        self.source_id = str(source)
        self.source_dir = resolve_model_folder(source)  # FileNotFoundError with one clear line
        self.user_dir = user_model_folder(self.source_dir, user_models_dir)

    @property
    def has_user_changes(self) -> bool:
        return (self.user_dir / MODEL_INDEX).is_file()

    @property
    def active_dir(self) -> Path:
        """The folder the app loads: the user copy when there is one, else the source."""
        return self.user_dir if self.has_user_changes else self.source_dir

    def writable_dir(self) -> Path:
        """The user folder, first copied from the source when it does not exist yet."""
        if not self.has_user_changes:
            copy_model_folder(self.source_dir, self.user_dir)
        return self.user_dir

    def reset(self) -> None:
        """Drop the user's changes: the source model is active again."""
        if self.user_dir.exists():
            shutil.rmtree(self.user_dir)
