"""The Hugging Face Hub: push a model folder with a Hub model card, and deploy the app to a Space.

Both upload with huggingface_hub's `create_repo` + `upload_folder` (one commit over HTTP; the Hub
stores weights and pictures through LFS by itself) from a temporary folder laid out as the
repository: links to the files to upload plus the generated README.md with Hub metadata.
"""
from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from vlmdiff.captioning.base import error_reason
from vlmdiff.captioning.display import CAPTIONER_ENV
from vlmdiff.model_folder import CARD_FILES, model_card, resolve_model_folder

if TYPE_CHECKING:
    from huggingface_hub import CardData, HfApi, RepoCard

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # a source checkout: app.py beside the package
LIBRARY_NAME = "vlmdiff"
MODEL_TAGS = ("vlmdiff", "anomaly-detection", "visual-anomaly-detection", "diffusers", "latent-diffusion")
SPACE_PATHS = ("app.py", "requirements.txt", "vlmdiff", "assets", "docs")  # what the app (and its README) needs
MODEL_ENV = "VLMDIFF_MODEL"  # the app's --model
README = "README.md"  # the file the Hub reads metadata from


class HubError(ValueError):
    """The Hub refused an upload or could not be reached (login, permissions, network): one line."""


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is `OWNER/NAME` with characters the Hub accepts; else ValueError saying so."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a hub repository id: {error}") from error
    if repo_id.count("/") != 1:
        raise ValueError(f"give the repository as OWNER/NAME (e.g. your-name/{repo_id}), not {repo_id!r}")
    return repo_id


def upload_files(root: Path, paths: Sequence[str] = ("",)) -> dict[str, Path]:
    """Repository path -> local file for the files and folders `paths` under `root`, without hidden
    entries (scratch folders, locks, git files), Python caches and compiled files."""
    files = {}
    for name in paths:
        top = root / name
        if not top.exists():
            raise FileNotFoundError(f"{top} is missing")
        for path in sorted(top.rglob("*")) if top.is_dir() else [top]:
            relative = path.relative_to(root)
            if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in relative.parts) \
                    and path.suffix != ".pyc":
                files[relative.as_posix()] = path
    return files


@contextmanager
def staged_folder(files: dict[str, Path], texts: dict[str, str]) -> Iterator[Path]:
    """A temporary folder laid out as the repository: links to `files` (nothing is copied) and the
    generated `texts`, which replace a file of the same name."""
    with tempfile.TemporaryDirectory(prefix="vlmdiff-upload-") as scratch:
        root = Path(scratch)
        for name, content in {**files, **texts}.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                (root / name).write_text(content, encoding="utf-8")
            else:
                (root / name).symlink_to(content.resolve())
        yield root


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn what the Hub calls raise (no login, no permission, no network) into one HubError line."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - huggingface_hub's HTTP, auth and transport errors
        raise HubError(f"uploading to {repo_id} failed: {error_reason(error)}") from error


def _card(text: str, card_class: type[RepoCard]) -> tuple[CardData, str]:
    """(metadata, body) of a card: its YAML front matter parsed by huggingface_hub, or empty metadata."""
    if text.startswith("---"):
        card = card_class(text)
        return card.data, card.text
    return card_class.card_data_class(), text


def _render(data: CardData, body: str) -> str:
    return f"---\n{data.to_yaml()}\n---\n{body}"


def hub_model_card(folder: Path, repo_id: str, license: str | None = None, datasets: Sequence[str] = ()) -> str:
    """README.md for a model repository: the folder's model card (or a short one) under Hub metadata
    (library_name vlmdiff, the licence, tags, training datasets), plus how to serve it."""
    from huggingface_hub import ModelCard

    path = model_card(folder)
    text = path.read_text(encoding="utf-8") if path else f"# {repo_id}\n\nA vlmdiff anomaly detection model.\n"
    data, body = _card(text, ModelCard)
    data.license = license or data.license
    if not data.license:
        raise ValueError("the model card names no licence: pass --license with a Hub licence id (e.g. apache-2.0, "
                         "or cc-by-nc-sa-4.0 for a model trained on MVTec data)")
    data.library_name = LIBRARY_NAME
    data.tags = list(dict.fromkeys([*(data.tags or []), *MODEL_TAGS]))
    if datasets:
        data.datasets = list(dict.fromkeys([*(data.datasets or []), *datasets]))
    if f"--model {repo_id}" not in body:
        body = body.rstrip("\n") + (
            f"\n\n## Use\n\nServe it in the vlmdiff app, locally or on a Hugging Face Space (Space variable "
            f"`{MODEL_ENV}={repo_id}`):\n\n```bash\npython app.py --model {repo_id}\n```\n\nor from Python:\n\n"
            f"```python\nfrom vlmdiff import VLMDiffPipeline\n\npipe = VLMDiffPipeline.from_pretrained(\"{repo_id}\")\n"
            "result = pipe(\"image.png\")[0]\n```\n"
        )
    return _render(data, body)


def space_readme(project: Path, model: str | None = None) -> str:
    """README.md for the app's Space: the project README under Space metadata (gradio SDK at the
    installed version, app.py, this Python), linked to the served hub model when given."""
    from huggingface_hub import SpaceCard

    path = project / README
    data, body = _card(path.read_text(encoding="utf-8") if path.is_file() else "# vlmdiff\n", SpaceCard)
    data.title = data.title or "vlmdiff"
    data.sdk, data.sdk_version, data.app_file = "gradio", version("gradio"), "app.py"
    data.python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if model:
        data.models = list(dict.fromkeys([*(data.models or []), model]))
    return _render(data, body)


def push_model(model: str | Path, repo_id: str, private: bool = False, license: str | None = None,
               datasets: Sequence[str] = (), token: str | None = None, api: HfApi | None = None) -> str:
    """Upload a model folder (or hub model) to the model repository `repo_id` (created if missing)
    with a Hub model card as README.md; returns the repository's URL."""
    from huggingface_hub import HfApi

    folder = resolve_model_folder(model)
    card = hub_model_card(folder, check_repo_id(repo_id), license, datasets)
    files = {name: path for name, path in upload_files(folder).items() if name not in CARD_FILES}
    api = api or HfApi(token=token)
    with staged_folder(files, {README: card}) as staged, hub_errors(repo_id):
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=staged, repo_type="model",
                          commit_message=f"Upload vlmdiff model {folder.name}")
    return str(url)


def deploy_space(space_id: str, project: Path = PROJECT_ROOT, model: str | None = None, captioner: str | None = None,
                 private: bool = False, token: str | None = None, api: HfApi | None = None) -> str:
    """Deploy the app to the Gradio Space `space_id` (created if missing): the project files it needs
    and a README with Space metadata; `model` (a hub id) and `captioner` become the Space variables
    the app reads. Returns the Space's URL."""
    from huggingface_hub import HfApi

    check_repo_id(space_id)
    if model:
        if Path(model).expanduser().exists():
            raise ValueError(f"--model {model} is a local folder: a Space serves hub models, push it first "
                             f"(vlmdiff push-to-hub {model} OWNER/NAME)")
        check_repo_id(model)
    if not (project / "app.py").is_file():
        raise FileNotFoundError(f"no app.py in {project}: deploy from a source checkout of vlmdiff (--project DIR)")
    files = upload_files(project, SPACE_PATHS)
    variables = {key: value for key, value in ((MODEL_ENV, model), (CAPTIONER_ENV, captioner)) if value}
    api = api or HfApi(token=token)
    with staged_folder(files, {README: space_readme(project, model)}) as staged, hub_errors(space_id):
        url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        for key, value in variables.items():  # set before the upload, so the first build uses them
            api.add_space_variable(space_id, key, value)
        api.upload_folder(repo_id=space_id, folder_path=staged, repo_type="space",
                          commit_message="Deploy the vlmdiff app")
    return str(url)
