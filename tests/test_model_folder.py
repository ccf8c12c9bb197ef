"""Model folders: resolving a folder or hub id, the files that travel with a model, atomic copies, scratch
folders swept after a kill, outputs that could lose data refused."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmdiff import model_folder
from vlmdiff.model_folder import (
    EXTRA_FILES, LOCK_FILE, MODEL_INDEX, STAGING_AREA, THRESHOLDS_FILE, UNLOCKED_SCRATCH_AGE_S, check_output_folder,
    copy_extra_files, copy_model_folder, model_card, replace_atomically, resolve_model_folder, staging_folder,
    sweep_stale_scratch, weights_dtype,
)


def fake_model(folder, extra=("training.json",)):
    (folder / "unet").mkdir(parents=True)
    (folder / MODEL_INDEX).write_text("{}")
    (folder / "unet" / "config.json").write_text('{"a": 1}')
    for name in extra:
        (folder / name).write_text(name)
    return folder


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


def test_copy_is_exact_and_readable_and_replaces_atomically(tmp_path):
    source = fake_model(tmp_path / "a")
    target = tmp_path / "copy"
    copy_model_folder(source, target)
    assert (target / "unet" / "config.json").read_text() == '{"a": 1}' and (target / "training.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 & ~umask  # not mkdtemp's 0700
    assert stat.S_IMODE((target / MODEL_INDEX).stat().st_mode) == 0o644 & ~umask
    (source / "unet" / "config.json").write_text('{"a": 2}')
    copy_model_folder(source, target)  # an existing copy is swapped out
    assert (target / "unet" / "config.json").read_text() == '{"a": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "copy"]  # no scratch or backup left


def test_a_failed_replace_keeps_the_old_folder(tmp_path, monkeypatch):
    target = fake_model(tmp_path / "model")
    with staging_folder(target) as scratch:
        staged = fake_model(scratch / "new", extra=())
        real_rename = type(staged).rename

        def failing(self, destination):
            if self == staged:
                raise OSError("disk full")
            return real_rename(self, destination)

        monkeypatch.setattr(type(staged), "rename", failing)
        with pytest.raises(OSError, match="disk full"):
            replace_atomically(staged, target)
    assert (target / "training.json").is_file()  # the old model is back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


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


def test_a_model_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    """Killed between moving the old model aside and the new one in: the sweep restores the old one."""
    scratch = tmp_path / STAGING_AREA / "123-dead"
    fake_model(scratch / "previous-model")
    (scratch / LOCK_FILE).write_text("")  # nobody holds it: the run is gone
    fake_model(tmp_path / ".model.previous")  # what earlier versions left: the replaced model beside it ...
    (tmp_path / ".model.k2j4_x9q").mkdir()  # ... and their scratch folders
    (tmp_path / ".keep.k2j4_x9q").mkdir()  # another model's name: not touched
    sweep_stale_scratch(tmp_path / "model")
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
    assert check_output_folder(source, source, source) == source
    assert check_output_folder(source, source, tmp_path / "new") == tmp_path / "new"
    assert check_output_folder(source, source, tmp_path / "empty") == tmp_path / "empty"
    assert check_output_folder(source, source, tmp_path / "models" / "other", True) == tmp_path / "models" / "other"
    monkeypatch.chdir(tmp_path / "models")
    with pytest.raises(ValueError, match="contains the source model"):  # by another spelling
        check_output_folder(source, source, Path("../models/."))
    for out in (None, source):
        with pytest.raises(ValueError, match="org/model is a hub model, not a local folder"):
            check_output_folder("org/model", source, out)


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
