"""push-to-hub and deploy-space against a recording stand-in for huggingface_hub's HfApi: what would be
uploaded (files, README metadata), to which kind of repository, with which Space settings; no network."""
from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl, SpaceCard

from vlmdiff.cli import main
from vlmdiff.hub import HubError, PROJECT_ROOT, deploy_space, push_model

DEFAULT_MODEL = PROJECT_ROOT / "assets" / "vlmdiff-default"


class RecordingHub:
    """The HfApi calls push-to-hub and deploy-space make, recorded; an upload keeps the files it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.files: dict[str, bytes] = {}
        self.folder: Path | None = None  # the temporary folder uploaded last

    def create_repo(self, repo_id: str, **options) -> RepoUrl:
        self.calls.append(("create_repo", repo_id, options))
        kind = options.get("repo_type")
        return RepoUrl(f"https://huggingface.co/{'spaces/' if kind == 'space' else ''}{repo_id}")

    def add_space_variable(self, repo_id: str, key: str, value: str) -> None:
        self.calls.append(("add_space_variable", repo_id, {key: value}))

    def upload_folder(self, *, repo_id: str, folder_path: Path, **options) -> None:
        self.calls.append(("upload_folder", repo_id, options))
        root = self.folder = Path(folder_path)
        self.files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def card(self, card_class=ModelCard):
        return card_class(self.files["README.md"].decode())


def _model_folder(folder: Path, card: str | None) -> Path:
    """A small model folder: the files a loader checks, a weights file, clutter that must stay home."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "VLMDiffPipeline"}))
    (folder / "pipeline_config.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
    (folder / ".vlmdiff-staging" / "1-abc").mkdir(parents=True)
    (folder / ".vlmdiff-staging" / "1-abc" / "scratch.bin").write_bytes(b"x")
    if card is not None:
        (folder / "MODEL_CARD.md").write_text(card)
    return folder


def test_push_uploads_the_model_with_a_hub_card(tmp_path: Path) -> None:
    hub = RecordingHub()
    url = push_model(DEFAULT_MODEL, "me/vlmdiff-tire", license="cc-by-nc-sa-4.0", datasets=["me/tire-data"], api=hub)
    assert url == "https://huggingface.co/me/vlmdiff-tire"
    assert [call[:2] for call in hub.calls] == [("create_repo", "me/vlmdiff-tire"),
                                                ("upload_folder", "me/vlmdiff-tire")]
    assert hub.calls[0][2] == {"repo_type": "model", "private": False, "exist_ok": True}
    assert hub.calls[1][2]["repo_type"] == "model"
    shipped = {p.relative_to(DEFAULT_MODEL).as_posix() for p in DEFAULT_MODEL.rglob("*")
               if p.is_file() and not p.name.startswith(".")}  # hidden files (the read-only marker) stay local
    assert set(hub.files) == shipped - {"MODEL_CARD.md"} | {"README.md"}  # the card becomes the Hub's README
    weights = "memory/diffusion_pytorch_model.safetensors"
    assert hub.files[weights] == (DEFAULT_MODEL / weights).read_bytes()
    card = hub.card()
    assert card.data.library_name == "vlmdiff" and card.data.license == "cc-by-nc-sa-4.0"
    assert {"vlmdiff", "anomaly-detection", "diffusers"} <= set(card.data.tags)
    assert card.data.datasets == ["me/tire-data"]
    assert card.text.startswith((DEFAULT_MODEL / "MODEL_CARD.md").read_text()[:200])
    assert "python app.py --model me/vlmdiff-tire" in card.text
    assert not (DEFAULT_MODEL / "README.md").exists()  # the shipped folder is left as it was


def test_push_keeps_the_cards_metadata_and_leaves_clutter_home(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "model", "---\nlicense: mit\ntags:\n- tire\n---\n# My model\n")
    hub = RecordingHub()
    push_model(folder, "me/m", private=True, api=hub)
    assert hub.calls[0][2]["private"] is True
    assert sorted(hub.files) == ["README.md", "model_index.json", "pipeline_config.json",
                                 "unet/diffusion_pytorch_model.safetensors"]
    card = hub.card()
    assert card.data.license == "mit" and card.data.tags[:2] == ["tire", "vlmdiff"]
    assert card.text.startswith("# My model")
    assert not hub.folder.exists() and (folder / "MODEL_CARD.md").is_file()  # the upload folder is gone, the model kept


def test_push_without_a_licence_or_with_a_bad_id_uploads_nothing(tmp_path: Path) -> None:
    folder, hub = _model_folder(tmp_path / "model", None), RecordingHub()
    with pytest.raises(ValueError, match="names no licence: pass --license"):
        push_model(folder, "me/m", api=hub)
    with pytest.raises(ValueError, match="OWNER/NAME"):
        push_model(folder, "m", license="mit", api=hub)
    assert hub.calls == []
    push_model(folder, "me/m", license="apache-2.0", api=hub)  # a folder without a card gets a short one
    assert hub.card().text.startswith("# me/m\n") and hub.card().data.license == "apache-2.0"


def test_deploy_space_uploads_the_app_with_space_metadata() -> None:
    hub = RecordingHub()
    url = deploy_space("me/vlmdiff", model="me/vlmdiff-tire", captioner="Salesforce/blip-image-captioning-base",
                       api=hub)
    assert url == "https://huggingface.co/spaces/me/vlmdiff"
    create, *variables, upload = hub.calls
    assert create == ("create_repo", "me/vlmdiff",
                      {"repo_type": "space", "space_sdk": "gradio", "private": False, "exist_ok": True})
    assert [v[2] for v in variables] == [{"VLMDIFF_MODEL": "me/vlmdiff-tire"},
                                         {"VLMDIFF_CAPTIONER": "Salesforce/blip-image-captioning-base"}]
    assert upload[0] == "upload_folder" and upload[2]["repo_type"] == "space"
    assert {"app.py", "requirements.txt", "README.md", "vlmdiff/hub.py", "assets/examples/tire_good.png",
            "assets/vlmdiff-default/unet/diffusion_pytorch_model.safetensors", "docs/app.md"} <= set(hub.files)
    assert {name.split("/")[0] for name in hub.files} == {"app.py", "requirements.txt", "README.md", "vlmdiff",
                                                          "assets", "docs"}  # no runs/, tests/, benchmarks/
    assert not [name for name in hub.files if "__pycache__" in name or name.endswith(".pyc")]
    readme = hub.card(SpaceCard)
    assert (readme.data.sdk, readme.data.app_file, readme.data.sdk_version) == ("gradio", "app.py", version("gradio"))
    assert readme.data.models == ["me/vlmdiff-tire"] and readme.text.lstrip().startswith("# vlmdiff")


def test_deploy_space_refuses_a_local_model_before_any_call() -> None:
    hub = RecordingHub()
    with pytest.raises(ValueError, match="is a local folder: a Space serves hub models"):
        deploy_space("me/vlmdiff", model=str(DEFAULT_MODEL), api=hub)
    assert hub.calls == []


def _project(root: Path) -> Path:
    """A checkout with the app's files, a README without metadata, and what a Space must not get."""
    for name in ("app.py", "requirements.txt", "vlmdiff/__init__.py", "vlmdiff/__pycache__/cli.cpython-311.pyc",
                 "assets/examples/a.png", "docs/app.md", "runs/big.bin", "tests/test_x.py", ".git/HEAD"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "README.md").write_text("# my fork\n")
    return root


def test_cli_commands_call_hfapi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    hub = RecordingHub()
    for name in ("create_repo", "add_space_variable", "upload_folder"):
        monkeypatch.setattr(HfApi, name, lambda self, *args, _name=name, **kwargs: getattr(hub, _name)(*args, **kwargs))
    folder = _model_folder(tmp_path / "model", None)
    assert main(["push-to-hub", str(folder), "me/m", "--license", "mit", "--dataset", "me/d", "--private"]) == 0
    assert hub.calls[0] == ("create_repo", "me/m", {"repo_type": "model", "private": True, "exist_ok": True})
    assert hub.card().data.datasets == ["me/d"] and "python app.py --model me/m" in capsys.readouterr().out

    hub.calls.clear()
    assert main(["deploy-space", "me/space", "--project", str(_project(tmp_path / "checkout"))]) == 0
    assert [call[0] for call in hub.calls] == ["create_repo", "upload_folder"]  # no variables without options
    assert sorted(hub.files) == ["README.md", "app.py", "assets/examples/a.png", "docs/app.md", "requirements.txt",
                                 "vlmdiff/__init__.py"]
    readme = hub.card(SpaceCard)
    assert readme.data.title == "vlmdiff" and readme.data.sdk == "gradio" and readme.text == "# my fork\n"
    assert "spaces/me/space" in capsys.readouterr().out


def test_hub_failures_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def refuse(self, repo_id, **options):
        raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n\nBad token")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(HubError, match="uploading to me/m failed: 401 Client Error: Unauthorized"):
        push_model(_model_folder(tmp_path / "model", None), "me/m", license="mit")
    assert main(["deploy-space", "me/space", "--project", str(_project(tmp_path / "checkout"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmdiff deploy-space: error: uploading to me/space failed: 401") and err.count("\n") == 1
