"""A model folder: the files it holds, where it comes from (folder or hub id), and safe copies.

Layout (diffusers style): `model_index.json`, one subfolder per component (config +
safetensors), `pipeline_config.json`, `thresholds.json`, and the extra files that travel
with a model whenever it is copied, exported or fine-tuned: the training record, the
replay set of normal images and the model card. These are the model's entries (`model_entries`);
anything else in the folder (a `.git/`, notes, data) is the user's and is never moved or deleted.

Writing a model folder (export, finetune, calibrate, the app) follows one rule
(`check_output_folder`, then `replace_model`): the target is absent, empty or a model folder;
a model folder is replaced entry by entry, crash-safe, keeping every other file; a folder
holding `READ_ONLY_MARKER` (the shipped model) is written only when named with overwrite.
"""
from __future__ import annotations

import fcntl
import hashlib
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
JOURNAL = "swap.json"  # in a scratch folder: the entries a swap moves; renamed to COMMITTED once all are in
COMMITTED = "swap.done"
READ_ONLY_MARKER = ".vlmdiff-read-only"  # in a model folder: never written unless named with overwrite
COMPONENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a model_index.json key naming a component subfolder
USER_MODELS_ENV = "VLMDIFF_USER_MODELS"  # the user model store (default: ~/.cache/vlmdiff/user-models)
UNLOCKED_SCRATCH_AGE_S = 3600  # a scratch folder without a lock file older than this was left by a killed run
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # safetensors names
_BACKUP = "previous"  # in a scratch folder: the replaced model's entries, until the new ones are in place
_BACKUP_PREFIX = "previous-"  # in scratch folders of earlier versions: a whole replaced model
_UMASK = os.umask(0o022)  # read once at import (setting it is process-wide: not from a request thread)
os.umask(_UMASK)


def resolve_model_folder(path_or_hub_id: str | Path) -> Path:
    """A local model folder for a folder path or a Hugging Face hub id (downloaded into the hub cache).

    A swap that a killed run left half done beside a local path is rolled back first
    (`sweep_stale_scratch`). FileNotFoundError with one clear line when it is neither.
    """
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    sweep_stale_scratch(path)
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
    """Where a model derived from `model` (resolved to the folder `source`) may be written: the one rule
    of export, finetune and calibrate.

    `out` None replaces the source in place (a local folder only). Writing a folder that already holds a
    model, the source included, needs `overwrite`; a read-only model folder (`READ_ONLY_MARKER`) is
    written only when `out` names it, with `overwrite`. ValueError, naming the folder, for the rest:
    `out` holds the source or lies inside it, is a file or a symbolic link, or a folder that is not
    empty and holds no model. A swap a killed run left half done there is rolled back first.
    """
    target = source if out is None else Path(out).expanduser()
    if target.is_symlink():
        raise ValueError(f"the output folder {target} is a symbolic link (to {os.readlink(target)}); "
                         "give the folder itself or a new one")
    sweep_stale_scratch(target)
    if (target / READ_ONLY_MARKER).exists() and (out is None or not overwrite):
        raise ValueError(f"the model folder {target} is read-only ({READ_ONLY_MARKER} in it): write the new model "
                         f"elsewhere with --out DIR, or name it with --out {target} --overwrite")
    real_source, real_target = source.resolve(), target.resolve()
    if real_target == real_source:
        if Path(model).expanduser().resolve() != real_source:
            raise ValueError(f"{model} is a hub model, not a local folder: give an output folder for the new model")
        if out is not None and not overwrite:
            raise ValueError(f"the output folder {target} is the source model; pass --overwrite to replace it in place")
    elif real_source.is_relative_to(real_target) or real_target.is_relative_to(real_source):
        where = "contains" if real_source.is_relative_to(real_target) else "is inside"
        raise ValueError(f"the output folder {target} {where} the source model {source}; choose another output folder")
    elif target.exists() and not target.is_dir():
        raise ValueError(f"the output folder {target} is a file; choose another output folder")
    elif target.is_dir() and any(target.iterdir()):
        if not (target / MODEL_INDEX).is_file():
            raise ValueError(f"the output folder {target} is not empty and holds no model; it is never replaced: "
                             "choose a new or empty folder")
        if not overwrite:
            raise ValueError(f"the output folder {target} already holds a model; pass --overwrite to replace it "
                             "(its other files are kept)")
    return target


def model_entries(folder: Path) -> set[str]:
    """The names in `folder` that are part of its model (those present): the JSON files, the component
    subfolders its model_index.json names, and the extra files. Everything else there is the user's."""
    names = {*JSON_FILES, *EXTRA_FILES, *_component_names(folder)}
    return {name for name in names if _present(folder / name)}


def _component_names(folder: Path) -> list[str]:
    """The component subfolders model_index.json names (none when it is missing or unreadable)."""
    try:
        index = json.loads((folder / MODEL_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [name for name in index if COMPONENT_NAME.match(name)] if isinstance(index, dict) else []


def _present(path: Path) -> bool:
    """True for anything at `path`, a dangling link included."""
    return os.path.lexists(path)


def default_user_models_dir() -> Path:
    """The user model store: `$VLMDIFF_USER_MODELS`, else the per-user cache folder."""
    if os.environ.get(USER_MODELS_ENV):
        return Path(os.environ[USER_MODELS_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vlmdiff" / "user-models"


def user_model_folder(source: Path, user_models_dir: str | Path | None = None) -> Path:
    """The folder of the model in `source` in the user model store: one per source folder, named after it."""
    root = Path(user_models_dir) if user_models_dir else default_user_models_dir()
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return root / f"{source.name or 'model'}-{key}"


def store_output_folder(model: str | Path) -> Path | None:
    """Where `vlmdiff finetune` and `calibrate` write without --out: the model's folder in the user model
    store (None, in place, for a model that is itself in the store)."""
    source = resolve_model_folder(model)
    return None if source.resolve().is_relative_to(default_user_models_dir().resolve()) else user_model_folder(source)


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
    finished model can be renamed into place). Its run holds a lock on it; the scratch folders of
    runs that were killed are swept when the next one starts. One holding a swap that could not be
    rolled back is left for the next sweep (it holds the replaced model's entries).
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
        if not (scratch / JOURNAL).exists():
            shutil.rmtree(scratch, ignore_errors=True)
        with suppress(OSError):  # other runs still use it
            area.rmdir()


def _new_scratch(area: Path) -> Path:
    for _ in range(3):  # another run may remove the empty area between the two calls
        area.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            return Path(tempfile.mkdtemp(dir=area, prefix=f"{os.getpid()}-"))
    raise OSError(f"could not create a scratch folder in {area}")


def replace_model(staged: Path, target: Path) -> None:
    """Put the model saved in `staged` (a folder in a scratch folder) into `target`, keeping every file
    of `target` that is not part of its model.

    An absent target is the staged folder, renamed. Otherwise the scratch folder gets a journal of the
    swap, the old model's entries are moved into it, the new ones moved in, the journal is marked
    committed and the old entries deleted. A failure is rolled back at once, a kill by the next command
    that opens the folder (`sweep_stale_scratch`): the folder holds the old model or the new one.
    """
    _readable_by_all(staged)
    if not _present(target):
        _move(staged, target)
        return
    scratch, old, new = staged.parent, sorted(model_entries(target)), sorted(model_entries(staged))
    clash = next((name for name in new if _present(target / name) and name not in old), None)
    if clash:
        raise ValueError(f"{target / clash} is not part of the model in {target}, but the new model needs that "
                         "name: move it elsewhere and run again")
    (scratch / _BACKUP).mkdir()
    journal = {"target": target.name, "staged": staged.name, "old": old, "new": new}
    (scratch / f"{JOURNAL}.new").write_text(json.dumps(journal), encoding="utf-8")
    _move(scratch / f"{JOURNAL}.new", scratch / JOURNAL)
    try:
        for name in old:
            _move(target / name, scratch / _BACKUP / name)
        for name in new:
            _move(staged / name, target / name)
    except BaseException:
        _roll_back(scratch, target.parent)
        raise
    _move(scratch / JOURNAL, scratch / COMMITTED)
    shutil.rmtree(scratch / _BACKUP)


def _roll_back(scratch: Path, parent: Path) -> None:
    """Undo the uncommitted swap journaled in `scratch` (into a folder of `parent`), if any: the new
    entries go back to the staged folder, the old ones back in place. Safe to repeat after a kill."""
    if not (scratch / JOURNAL).is_file():
        return
    journal = json.loads((scratch / JOURNAL).read_text(encoding="utf-8"))
    target, staged, backup = parent / journal["target"], scratch / journal["staged"], scratch / _BACKUP
    target.mkdir(exist_ok=True)
    staged.mkdir(exist_ok=True)
    for name in journal["new"]:  # a new entry in the target: moved in (an old one is in the backup first)
        if _present(target / name) and (name not in journal["old"] or _present(backup / name)):
            _move(target / name, staged / name)
    for name in journal["old"]:
        if _present(backup / name):
            _move(backup / name, target / name)
    (scratch / JOURNAL).unlink()


def _move(source: Path, destination: Path) -> None:
    """One rename: each step of a swap is one call (the kill tests stop a run after any of them)."""
    os.rename(source, destination)


def sweep_stale_scratch(target: Path) -> None:
    """Finish what killed runs left beside `target`: roll back their interrupted swaps, then remove their
    scratch folders.

    A scratch folder is stale when no process holds its lock; the sweep holds it while it works. What
    earlier versions left is handled too: a whole replaced model (`previous-<name>` in a scratch folder,
    `.<name>.previous` beside it) is put back, their scratch folders `.<name>.<random>` removed.
    """
    target = Path(os.path.abspath(target))
    if not target.name:
        return
    old_backup = target.with_name(f".{target.name}.previous")
    if old_backup.is_dir():
        _put_back(old_backup, target)
        shutil.rmtree(old_backup, ignore_errors=True)
    for folder in _scratch_folders(target.parent / STAGING_AREA):
        with _claimed(folder) as stale:
            if stale:
                _roll_back(folder, target.parent)
                for backup in folder.glob(f"{_BACKUP_PREFIX}*"):
                    _put_back(backup, target.parent / backup.name.removeprefix(_BACKUP_PREFIX))
                shutil.rmtree(folder, ignore_errors=True)
    old_scratch = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}$")
    for path in target.parent.glob(f".{target.name}.*"):
        if old_scratch.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _scratch_folders(area: Path) -> list[Path]:
    try:
        return sorted(area.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # no area, or another run just removed it
        return []


def _put_back(backup: Path, original: Path) -> None:
    """Rename a model moved aside by a killed run back to its place, unless a model is there again."""
    if not original.exists():
        backup.rename(original)


@contextmanager
def _claimed(folder: Path) -> Iterator[bool]:
    """True while this process holds the lock of a scratch folder that no run holds (or, with no lock
    file, of one older than UNLOCKED_SCRATCH_AGE_S: killed before it was locked)."""
    try:
        lock = open(folder / LOCK_FILE)
    except OSError:  # created but not locked yet, killed right then, or not a folder
        yield _old_folder(folder)
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        yield held


def _old_folder(path: Path) -> bool:
    try:
        return path.is_dir() and time.time() - path.stat().st_mtime > UNLOCKED_SCRATCH_AGE_S
    except FileNotFoundError:
        return False


def copy_model_folder(source: Path, target: Path) -> None:
    """A copy of the model in `source` (its entries only, following the hub cache's links) put into
    `target` with `replace_model`."""
    with staging_folder(target) as scratch:
        staged = scratch / "model"
        staged.mkdir()
        for name in model_entries(source):
            if (source / name).is_dir():
                shutil.copytree(source / name, staged / name, copy_function=shutil.copyfile)
            else:
                shutil.copyfile(source / name, staged / name)
        replace_model(staged, target)


def _readable_by_all(folder: Path) -> None:
    """Folders 0755 and files 0644 (minus the umask), as any saved model: mkdtemp makes 0700 folders."""
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o755 if path.is_dir() else 0o644) & ~_UMASK)
