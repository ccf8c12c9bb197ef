"""A model folder: the files it holds, where it comes from (folder or hub id), and safe copies.

Layout (diffusers style): `model_index.json`, one subfolder per component (config +
safetensors), `pipeline_config.json`, `thresholds.json`, and the extra files that travel
with a model whenever it is copied, exported or fine-tuned: the training record, the
replay set of normal images and the model card.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MODEL_INDEX = "model_index.json"
CONFIG_FILE = "pipeline_config.json"
THRESHOLDS_FILE = "thresholds.json"
TRAINING_FILE = "training.json"
REPLAY_FILE = "replay.safetensors"
CARD_FILES = ("MODEL_CARD.md", "README.md")  # the first one present is the model card
EXTRA_FILES = (TRAINING_FILE, REPLAY_FILE, *CARD_FILES)
_UMASK = os.umask(0o022)  # read once at import (setting it is process-wide: not from a request thread)
os.umask(_UMASK)


def resolve_model_folder(path_or_hub_id: str | Path) -> Path:
    """A local model folder for a folder path or a Hugging Face hub id (downloaded into the hub cache).

    FileNotFoundError with one clear line when it is neither.
    """
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / MODEL_INDEX).is_file():
            raise FileNotFoundError(f"{path} is not a vlmdiff model folder (no {MODEL_INDEX})")
        return path
    if path.is_absolute() or text.startswith(".") or text.count("/") != 1:
        raise FileNotFoundError(f"no model folder at {path}")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(text))
    except Exception as error:  # noqa: BLE001 - offline, unknown repository, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"no model folder at {path}, and no hub model {text!r} could be fetched ({reason})"
        ) from error
    if not (folder / MODEL_INDEX).is_file():
        raise FileNotFoundError(f"hub repository {text!r} is not a vlmdiff model (no {MODEL_INDEX})")
    return folder


def model_card(folder: Path) -> Path | None:
    """The folder's model card file, if it has one."""
    return next((folder / name for name in CARD_FILES if (folder / name).is_file()), None)


def copy_extra_files(source: Path, target: Path) -> None:
    """Copy the training record, replay set and model card (those present) from `source` to `target`."""
    for name in EXTRA_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A scratch folder beside `target` (same file system, so it can be renamed into place); removed afterwards."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def replace_atomically(staged: Path, target: Path) -> None:
    """Move the complete folder `staged` to `target`; an existing target is swapped out only at the end."""
    _readable_by_all(staged)
    if not target.exists():
        staged.rename(target)
        return
    backup = target.with_name(f".{target.name}.previous")
    if backup.exists():
        shutil.rmtree(backup)
    target.rename(backup)
    try:
        staged.rename(target)
    except OSError:
        backup.rename(target)
        raise
    shutil.rmtree(backup)


def copy_model_folder(source: Path, target: Path) -> None:
    """An exact copy of a model folder (following the hub cache's links), put in place atomically."""
    with staging_folder(target) as scratch:
        staged = scratch / "model"
        shutil.copytree(source, staged, copy_function=shutil.copyfile)
        replace_atomically(staged, target)


def _readable_by_all(folder: Path) -> None:
    """Folders 0755 and files 0644 (minus the umask), as any saved model: mkdtemp makes 0700 folders."""
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o755 if path.is_dir() else 0o644) & ~_UMASK)
