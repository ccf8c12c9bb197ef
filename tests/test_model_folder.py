"""Model folders: resolving a folder or hub id, the files that travel with a model, copies, scratch folders
swept after a kill, outputs that could lose data refused, and the swap that replaces only a model's own
entries (a kill at any step leaves the old model or the new one, with the folder's other files)."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmdiff import model_folder
from vlmdiff.model_folder import (
    EXTRA_FILES, LOCK_FILE, MODEL_INDEX, READ_ONLY_MARKER, STAGING_AREA, THRESHOLDS_FILE, UNLOCKED_SCRATCH_AGE_S,
    check_output_folder, copy_extra_files, copy_model_folder, model_card, model_entries, resolve_model_folder, staging_folder, store_output_folder, sweep_stale_scratch, weights_dtype,
)


def fake_model(folder, extra=("training.json",), components=("unet",), version=1):
    """A model folder of `components` (each a subfolder with a config) and `extra` files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_INDEX).write_text(json.dumps({"_class_name": "VLMDiffPipeline",
                                                  **{name: ["diffusers", "Model"] for name in components}}))
    for name in components:
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(f'{{"a": {version}}}')
    for name in extra:
        (folder / name).write_text(json.dumps(f"{name} {version}"))  # valid JSON for the .json ones
    return folder


def user_files(folder):
    """Files that are not part of a model: a git repository, notes, data."""
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("keep me")
    (folder / "data").mkdir()
    (folder / "data" / "a.png").write_bytes(b"png")
    return folder


def contents(folder):
    """Every file below `folder` (relative path -> bytes), staging areas excluded."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and STAGING_AREA not in p.parts}


def test_resolve_names_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_folder(fake_model(tmp_path / "m")) == tmp_path / "m"
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        resolve_model_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"not a vlmdiff model folder \\(no {MODEL_INDEX}\\)"):
        resolve_model_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no hub model 'nobody/nothing' could be fetched"):
        resolve_model_folder("nobody/nothing")


def test_extra_files_travel_and_the_card_is_found(tmp_path):
    source = fake_model(tmp_path / "a", extra=EXTRA_FILES[:3])
    target = tmp_path / "b"
    target.mkdir()
    copy_extra_files(source, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(EXTRA_FILES[:3])
    assert model_card(source) == source / "MODEL_CARD.md" and model_card(tmp_path / "b") == target / "MODEL_CARD.md"


def test_copy_holds_the_model_readable_by_all_and_replaces_only_its_entries(tmp_path):
    source = user_files(fake_model(tmp_path / "a"))
    (source / READ_ONLY_MARKER).write_text("")
    target = tmp_path / "copy"
    copy_model_folder(source, target)
    assert contents(target) == {k: v for k, v in contents(source).items()
                                if k.split("/")[0] in model_entries(source)}  # no marker, notes or .git
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 & ~umask  # not mkdtemp's 0700
    assert stat.S_IMODE((target / MODEL_INDEX).stat().st_mode) == 0o644 & ~umask
    user_files(target)
    copy_model_folder(fake_model(tmp_path / "b", extra=(), components=("unet", "memory"), version=2), target)
    assert (target / "unet" / "config.json").read_text() == '{"a": 2}' and (target / "memory").is_dir()
    assert not (target / "training.json").exists()  # the replaced model's own file went with it
    assert (target / "notes.txt").read_text() == "keep me" and (target / ".git" / "HEAD").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "copy"]  # no scratch or backup left


def test_model_entries_are_the_known_files_and_the_indexed_components(tmp_path):
    folder = user_files(fake_model(tmp_path / "m", extra=EXTRA_FILES, components=("unet", "memory")))
    (folder / "unindexed").mkdir()
    assert model_entries(folder) == {MODEL_INDEX, *EXTRA_FILES, "unet", "memory"}
    (folder / MODEL_INDEX).write_text('{".git": ["x", "y"], "../up": ["x", "y"], "_class_name": "x", "unet": [1, 2]}')
    assert model_entries(folder) == {MODEL_INDEX, *EXTRA_FILES, "unet"}  # never a hidden or outside name


def test_a_failed_replace_keeps_the_old_model_and_the_other_files(tmp_path, monkeypatch):
    target = user_files(fake_model(tmp_path / "model"))
    before = contents(target)
    real_move, failures = model_folder._move, []

    def failing(source, destination):
        if Path(destination) == target / "unet" and not failures:  # moving the new one in, once
            failures.append(destination)
            raise OSError("disk full")
        real_move(source, destination)

    monkeypatch.setattr(model_folder, "_move", failing)
    with pytest.raises(OSError, match="disk full"):
        copy_model_folder(fake_model(tmp_path / "new", version=2), target)
    assert contents(target) == before  # the old model is back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]


def test_a_user_file_named_like_a_new_component_is_never_replaced(tmp_path):
    target = fake_model(tmp_path / "model")
    (target / "memory").mkdir()
    (target / "memory" / "mine.txt").write_text("mine")  # not in the model's index: the user's
    before = contents(target)
    with pytest.raises(ValueError, match=f"{re.escape(str(target / 'memory'))} is not part of the model"):
        copy_model_folder(fake_model(tmp_path / "new", components=("unet", "memory"), version=2), target)
    assert contents(target) == before


# ---------------------------------------------------------------- scratch folders: one place, swept after a kill
def test_scratch_lives_in_the_staging_area_and_is_removed_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"):
        with staging_folder(target) as scratch:
            assert scratch.parent == tmp_path / STAGING_AREA and (scratch / LOCK_FILE).is_file()
            (scratch / "run").mkdir()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the scratch folder nor the empty area is left


def test_a_killed_runs_scratch_is_swept_by_the_next_run_and_a_live_one_is_kept(tmp_path):
    target = tmp_path / "model"
    holder = (  # loads only the module file (no torch): the run starts in a blink
        "import importlib.util, sys, time\n"
        "from pathlib import Path\n"
        "spec = importlib.util.spec_from_file_location('model_folder', sys.argv[2])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "with module.staging_folder(Path(sys.argv[1])) as scratch:\n"
        "    (scratch / 'big').write_bytes(b'x' * 1000)\n"
        "    print(scratch, flush=True)\n"
        "    time.sleep(120)\n"
    )
    command = [sys.executable, "-c", holder, str(target), model_folder.__file__]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        killed = Path(run.stdout.readline().strip())
        assert (killed / "big").is_file()
        with staging_folder(target) as live:  # the other run still lives: its folder is kept
            assert killed.is_dir()
            with staging_folder(tmp_path / "other") as second:  # this run's own folder is kept too
                assert live.is_dir() and second.is_dir()
            run.kill()
            run.wait()
            sweep_stale_scratch(target)
            assert not killed.exists() and live.is_dir()
    finally:
        run.kill()
        run.wait()
        run.stdout.close()
    assert list(tmp_path.iterdir()) == []


def test_a_model_moved_aside_by_an_earlier_version_is_put_back_when_the_folder_is_opened(tmp_path):
    """Earlier versions swapped whole folders: a run killed between moving the old model aside and the
    new one in left it in the scratch folder only. Opening the folder puts it back."""
    scratch = tmp_path / STAGING_AREA / "123-dead"
    fake_model(scratch / "previous-model")
    (scratch / LOCK_FILE).write_text("")  # nobody holds it: the run is gone
    fake_model(tmp_path / ".model.previous")  # what earlier versions left: the replaced model beside it ...
    (tmp_path / ".model.k2j4_x9q").mkdir()  # ... and their scratch folders
    (tmp_path / ".keep.k2j4_x9q").mkdir()  # another model's name: not touched
    assert resolve_model_folder(tmp_path / "model") == tmp_path / "model"
    assert (tmp_path / "model" / "training.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.k2j4_x9q", STAGING_AREA, "model"]
    assert list((tmp_path / STAGING_AREA).iterdir()) == []


def test_a_scratch_folder_being_created_is_not_swept(tmp_path):
    fresh = tmp_path / STAGING_AREA / "1-new"
    fresh.mkdir(parents=True)  # no lock file yet
    sweep_stale_scratch(tmp_path / "model")
    assert fresh.is_dir()
    old = time.time() - UNLOCKED_SCRATCH_AGE_S - 60
    os.utime(fresh, (old, old))
    sweep_stale_scratch(tmp_path / "model")
    assert not fresh.exists()


# ---------------------------------------------------------------- where a derived model may be written
@pytest.mark.parametrize(("out", "overwrite", "message"), [
    ("models", True, "contains the source model"),
    ("models/base/unet", True, "is inside the source model"),
    ("models/other", False, "already holds a model; pass --overwrite"),
    ("models/base", False, "is the source model; pass --overwrite to replace it in place"),
    ("notes", True, "is not empty and holds no model; it is never replaced"),
    ("notes/a.txt", True, "is a file"),
])
def test_outputs_that_could_lose_data_are_refused(out, overwrite, message, tmp_path):
    source = fake_model(tmp_path / "models" / "base")
    fake_model(tmp_path / "models" / "other")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(ValueError, match=f"^the output folder {re.escape(str(tmp_path / out))} {message}"):
        check_output_folder(source, source, tmp_path / out, overwrite)


def test_safe_outputs_are_accepted(tmp_path, monkeypatch):
    source = fake_model(tmp_path / "models" / "base")
    fake_model(tmp_path / "models" / "other")
    (tmp_path / "empty").mkdir()
    assert check_output_folder(source, source, None) == source  # in place
    assert check_output_folder(source, source, source, True) == source
    assert check_output_folder(source, source, tmp_path / "new") == tmp_path / "new"
    assert check_output_folder(source, source, tmp_path / "empty") == tmp_path / "empty"
    assert check_output_folder(source, source, tmp_path / "models" / "other", True) == tmp_path / "models" / "other"
    monkeypatch.chdir(tmp_path / "models")
    with pytest.raises(ValueError, match="contains the source model"):  # by another spelling
        check_output_folder(source, source, Path("../models/."))
    for out in (None, source):
        with pytest.raises(ValueError, match="org/model is a hub model, not a local folder"):
            check_output_folder("org/model", source, out)


def test_a_read_only_model_is_written_only_when_named_with_overwrite(tmp_path):
    shipped = user_files(fake_model(tmp_path / "shipped"))
    (shipped / READ_ONLY_MARKER).write_text("")
    refused = f"^the model folder {re.escape(str(shipped))} is read-only .* --out {re.escape(str(shipped))} --overwrite"
    for out, overwrite in ((None, False), (None, True), (shipped, False)):
        with pytest.raises(ValueError, match=refused):
            check_output_folder(shipped, shipped, out, overwrite)
    other = tmp_path / "other"
    shutil.copytree(shipped, other)  # a copy with the marker: read-only too, from any source
    with pytest.raises(ValueError, match=f"^the model folder {re.escape(str(other))} is read-only"):
        check_output_folder(shipped, shipped, other)
    assert check_output_folder(shipped, shipped, shipped, True) == shipped
    assert check_output_folder(shipped, shipped, other, True) == other
    copy_model_folder(fake_model(tmp_path / "new", version=2), shipped)  # named with overwrite: the marker stays
    assert (shipped / READ_ONLY_MARKER).is_file() and (shipped / "notes.txt").is_file()


def test_the_shipped_model_is_marked_read_only():
    shipped = Path(__file__).resolve().parents[1] / "assets" / "vlmdiff-default"
    with pytest.raises(ValueError, match="is read-only"):
        check_output_folder(shipped, shipped, None)


@pytest.mark.parametrize("points_to", ["model", "missing"])
def test_a_symbolic_link_output_is_refused_in_one_line(points_to, tmp_path):
    source = fake_model(tmp_path / "base")
    fake_model(tmp_path / "model")
    (tmp_path / "link").symlink_to(tmp_path / points_to)
    with pytest.raises(ValueError, match=f"^the output folder {re.escape(str(tmp_path / 'link'))} is a symbolic link"):
        check_output_folder(source, source, tmp_path / "link", True)


def test_without_out_the_user_store_is_the_output_and_its_models_are_written_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMDIFF_USER_MODELS", str(tmp_path / "store"))
    source = fake_model(tmp_path / "base")
    [folder] = [store_output_folder(source)]
    assert folder.parent == tmp_path / "store" and folder.name.startswith("base-")
    copy_model_folder(source, folder)
    assert store_output_folder(folder) is None  # a model of the store: in place
    assert store_output_folder(source) == folder  # one folder per source


# ---------------------------------------------------------------- a kill at any step of a swap
SWAP_KILLER = (  # loads only the module file (no torch); exits (as a kill would) after the k-th rename
    "import importlib.util, os, sys\n"
    "from pathlib import Path\n"
    "spec = importlib.util.spec_from_file_location('model_folder', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "rename, stop, done = module._move, int(sys.argv[2]), 0\n"
    "def move(source, destination):\n"
    "    global done\n"
    "    if stop == 0:\n"
    "        os._exit(9)\n"
    "    rename(source, destination)\n"
    "    done += 1\n"
    "    if done == stop:\n"
    "        os._exit(9)\n"
    "module._move = move\n"
    "if sys.argv[3] == 'copy':\n"
    "    module.copy_model_folder(Path(sys.argv[4]), Path(sys.argv[5]))\n"
    "else:\n"
    "    module.sweep_stale_scratch(Path(sys.argv[4]))\n"
)


def killed_after(moves: int, *command: Path | str) -> None:
    run = subprocess.run([sys.executable, "-c", SWAP_KILLER, model_folder.__file__, str(moves), *map(str, command)])
    assert run.returncode == 9


def swap_case(root: Path) -> tuple[Path, Path]:
    """(target, new): a model folder with the user's files, and a model with other components and files."""
    target = user_files(fake_model(root / "models" / "model", components=("unet", "memory")))
    return target, fake_model(root / "new", extra=("replay.safetensors", THRESHOLDS_FILE), version=2)


def renames_of_a_swap(tmp_path, monkeypatch) -> tuple[int, dict, dict]:
    """(renames, old contents, new contents) of an uninterrupted swap of `swap_case`."""
    target, new = swap_case(tmp_path / "counted")
    old, moves = contents(target), []
    real_move = model_folder._move
    monkeypatch.setattr(model_folder, "_move", lambda a, b: (moves.append(b), real_move(a, b)))
    copy_model_folder(new, target)
    monkeypatch.undo()
    return len(moves), old, contents(target)


def test_a_kill_at_any_step_of_a_swap_leaves_the_old_or_the_new_model_and_every_other_file(tmp_path, monkeypatch):
    total, old, new = renames_of_a_swap(tmp_path, monkeypatch)
    assert total == 1 + 4 + 4 + 1  # journal, the 4 old entries out, the 4 new ones in, commit
    assert old["notes.txt"] == new["notes.txt"] and ".git/HEAD" in new and "memory/config.json" not in new
    for moves in range(total + 1):
        target, source = swap_case(tmp_path / str(moves))
        killed_after(moves, "copy", source, target)
        assert resolve_model_folder(target) == target  # opening the folder finishes the interrupted swap
        assert contents(target) == (new if moves == total else old), moves  # committed by the last rename
        assert list((target.parent / STAGING_AREA).iterdir()) == []


def test_a_kill_while_rolling_back_is_rolled_back_by_the_next_command(tmp_path):
    for moves in range(2 + 4):  # the rollback's renames: the two new entries out, the four old ones in
        target, source = swap_case(tmp_path / str(moves))
        old = contents(target)
        killed_after(1 + 4 + 2, "copy", source, target)  # journal, the old entries out, two new ones in
        killed_after(moves, "sweep", target)
        assert resolve_model_folder(target) == target and contents(target) == old, moves


# ---------------------------------------------------------------- what a folder stores
def test_invalid_json_is_named(tmp_path):
    folder = fake_model(tmp_path / "m")
    (folder / THRESHOLDS_FILE).write_text('{"version": 1, ')
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / THRESHOLDS_FILE))} is not valid JSON"):
        resolve_model_folder(folder)
    (folder / THRESHOLDS_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=f"{THRESHOLDS_FILE} is not a JSON file \\(not UTF-8 text\\)"):
        resolve_model_folder(folder)


def test_weights_dtype_is_the_denoisers(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = fake_model(tmp_path / "m")
    assert weights_dtype(folder) == torch.float32  # no weights file: loaded as float32
    tensors = {"a.step": torch.zeros(1, dtype=torch.int64), "b.weight": torch.zeros(2, dtype=torch.float16)}
    save_file(tensors, folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights_dtype(folder) == torch.float16
