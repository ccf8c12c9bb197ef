"""A model folder: the files it holds, where it comes from (folder or hub id), and safe copies.

Layout (diffusers style): `model_index.json`, one subfolder per component (config +
safetensors), `pipeline_config.json`, `thresholds.json`, and the extra files that travel
with a model whenever it is copied, exported or fine-tuned: the training record, the
replay set of normal images and the model card.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

MODEL_INDEX = "model_index.json"
CONFIG_FILE = "pipeline_config.json"
THRESHOLDS_FILE = "thresholds.json"
TRAINING_FILE = "training.json"
REPLAY_FILE = "replay.safetensors"
CARD_FILES = ("MODEL_CARD.md", "README.md")  # the first one present is the model card
EXTRA_FILES = (TRAINING_FILE, REPLAY_FILE, *CARD_FILES)
JSON_FILES = (MODEL_INDEX, CONFIG_FILE, THRESHOLDS_FILE)  # what loading a model parses
STAGING_AREA = ".vlmdiff-staging"  # beside a model: the scratch folders of the runs that write it
LOCK_FILE = ".lock"  # in a scratch folder: locked while its run lives
UNLOCKED_SCRATCH_AGE_S = 3600  # a scratch folder without a lock file older than this was left by a killed run
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # safetensors names
_BACKUP_PREFIX = "previous-"  # in a scratch folder: the model being replaced, until the new one is in place
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
        return check_json_files(path)
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
    return check_json_files(folder)


def check_json_files(folder: Path) -> Path:
    """`folder` if each of its JSON files (those present) parses; else ValueError naming the file."""
    for path in (folder / name for name in JSON_FILES):
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not a JSON file (not UTF-8 text)") from error
        except json.JSONDecodeError as error:
            where = f"line {error.lineno}, column {error.colno}"
            raise ValueError(f"{path} is not valid JSON ({error.msg} at {where})") from error
    return folder


def check_output_folder(model: str | Path, source: Path, out: str | Path | None, overwrite: bool = False) -> Path:
    """Where a model derived from `model` (resolved to the folder `source`) may be written.

    `out` None (or the source folder itself) replaces the source in place, a local folder only.
    Otherwise ValueError, naming the folder, when writing `out` could lose data: it holds the
    source or lies inside it, it is a file, a folder that is not empty and holds no model (never
    replaced), or a model folder without `overwrite`.
    """
    target = source if out is None else Path(out).expanduser()
    real_source, real_target = source.resolve(), target.resolve()
    if real_target == real_source:
        if Path(model).expanduser().resolve() != real_source:
            raise ValueError(f"{model} is a hub model, not a local folder: give an output folder for the new model")
        return source
    if real_source.is_relative_to(real_target) or real_target.is_relative_to(real_source):
        where = "contains" if real_source.is_relative_to(real_target) else "is inside"
        raise ValueError(f"the output folder {target} {where} the source model {source}; choose another output folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"the output folder {target} is a file; choose another output folder")
    if target.is_dir() and any(target.iterdir()):
        if not (target / MODEL_INDEX).is_file():
            raise ValueError(f"the output folder {target} is not empty and holds no model; it is never replaced: "
                             "choose a new or empty folder")
        if not overwrite:
            raise ValueError(f"the output folder {target} already holds a model; pass --overwrite to replace it")
    return target


def weights_dtype(folder: Path) -> torch.dtype:
    """The dtype the folder stores its denoiser's weights in (float16 after `vlmdiff export`)."""
    import torch
    from safetensors import safe_open

    files = sorted((folder / "unet").glob("*.safetensors"))
    if files:
        with safe_open(files[0], framework="pt") as weights:
            for name in weights.keys():
                dtype = weights.get_slice(name).get_dtype()
                if dtype in _FLOAT_DTYPES:
                    return getattr(torch, _FLOAT_DTYPES[dtype])
    return torch.float32


def read_training_record(folder: Path) -> dict:
    """The folder's training record (empty if it has none); ValueError naming the file if it is not a JSON object."""
    path = folder / TRAINING_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the training record {path} is not valid JSON") from error
    if not isinstance(record, dict):
        raise ValueError(f"the training record {path} is not a JSON object")
    return record


def save_derived_model(pipeline, source: Path, target: Path, record: dict) -> None:
    """Save a model made from the one in `source` into `target`: in the source's weight dtype, with its
    extra files (replay set, model card) and `record` as the training record."""
    import torch

    dtype = weights_dtype(source)
    pipeline.save_pretrained(target, dtype=None if dtype == torch.float32 else dtype)
    copy_extra_files(source, target)
    (target / TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


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
    """A scratch folder for building `target`, removed afterwards (also on failure).

    Every scratch folder lives in `STAGING_AREA` beside the target (the same file system, so a
    finished folder can be renamed into place). Its run holds a lock on it; the scratch folders of
    runs that were killed are swept when the next one starts.
    """
    area = target.parent / STAGING_AREA
    sweep_stale_scratch(target)
    scratch = _new_scratch(area)
    try:
        with open(scratch / f"{LOCK_FILE}.new", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            os.rename(scratch / f"{LOCK_FILE}.new", scratch / LOCK_FILE)  # visible only once held
            yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with suppress(OSError):  # other runs still use it
            area.rmdir()


def _new_scratch(area: Path) -> Path:
    for _ in range(3):  # another run may remove the empty area between the two calls
        area.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            return Path(tempfile.mkdtemp(dir=area, prefix=f"{os.getpid()}-"))
    raise OSError(f"could not create a scratch folder in {area}")


def sweep_stale_scratch(target: Path) -> None:
    """Remove the scratch folders of killed runs beside `target`.

    A scratch folder is stale when no process holds its lock. A model that a killed run had moved
    aside to replace it is put back first. What earlier versions left beside `target` (scratch
    folders `.<name>.<random>`, the replaced model `.<name>.previous`) is handled the same way.
    """
    old_backup = target.with_name(f".{target.name}.previous")
    if old_backup.is_dir():
        _put_back(old_backup, target)
        shutil.rmtree(old_backup, ignore_errors=True)
    area = target.parent / STAGING_AREA
    stale = [folder for folder in sorted(area.iterdir()) if _is_stale(folder)] if area.is_dir() else []
    old_scratch = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}$")
    stale += [path for path in target.parent.glob(f".{target.name}.*") if old_scratch.match(path.name)]
    for folder in stale:
        for backup in folder.glob(f"{_BACKUP_PREFIX}*"):
            _put_back(backup, target.parent / backup.name.removeprefix(_BACKUP_PREFIX))
        shutil.rmtree(folder, ignore_errors=True)


def _put_back(backup: Path, original: Path) -> None:
    """Rename a model moved aside by a killed run back to its place, unless a model is there again."""
    if not original.exists():
        backup.rename(original)


def _is_stale(folder: Path) -> bool:
    """True when no run holds the scratch folder's lock (one still being created is left alone)."""
    try:
        lock = open(folder / LOCK_FILE)
    except OSError:  # created but not locked yet, killed right then, or not a folder
        return folder.is_dir() and time.time() - folder.stat().st_mtime > UNLOCKED_SCRATCH_AGE_S
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def replace_atomically(staged: Path, target: Path) -> None:
    """Move the complete folder `staged` to `target`; an existing target is swapped out only at the end.

    The old target is moved beside `staged` (into the scratch folder) and deleted once the new one
    is in place; if moving the new one in fails, the old one is put back.
    """
    _readable_by_all(staged)
    if not target.exists():
        staged.rename(target)
        return
    backup = staged.with_name(f"{_BACKUP_PREFIX}{target.name}")
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
