"""Model folders: resolving a folder or hub id, the files that travel with a model, atomic copies."""
from __future__ import annotations

import os
import stat

import pytest

from vlmdiff.model_folder import (
    EXTRA_FILES, MODEL_INDEX, copy_extra_files, copy_model_folder, model_card, replace_atomically,
    resolve_model_folder, staging_folder,
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
