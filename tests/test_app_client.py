"""The running app (app.py in a subprocess, tiny random model) through gradio_client: detection,
a fine-tuned class usable by every endpoint at once and its diffusion phase followed to the end,
and, on a public app, two visitors whose saved thresholds stay apart."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import JOB_TIMEOUT_S
from app_harness import build_tiny_model, running_app

gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "washer_broken.png"
NORMAL = ROOT / "assets" / "examples" / "brick_good.png"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def app_url(model, tmp_path_factory):
    with running_app(ROOT / "app.py", model, tmp_path_factory.mktemp("app_client")) as url:
        yield url


@pytest.fixture(scope="module")
def public_url(model, tmp_path_factory):
    with running_app(ROOT / "app.py", model, tmp_path_factory.mktemp("public_app"), options=("--public",)) as url:
        yield url


def client(url: str):
    return gradio_client.Client(url, verbose=False)


def test_detect_endpoint_returns_caption_pictures_and_score(app_url, tmp_path):
    caption, reconstruction, overlay, verdict, score = client(app_url).predict(
        gradio_client.handle_file(str(EXAMPLE)), "washer", 0.6, 2, 0, 0.5, api_name="/detect")
    assert "image shows" in caption
    for picture in (reconstruction, overlay):
        assert Image.open(picture).size == Image.open(EXAMPLE).size
    assert isinstance(score, float) and "washer" in verdict and "strength 0.60" in verdict
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    caption, reconstruction, overlay, verdict, score = client(app_url).predict(
        gradio_client.handle_file(str(notes)), api_name="/detect")
    assert "not a readable image file" in verdict and reconstruction is None and score is None


def diffusion_progress(visitor, timeout: float = JOB_TIMEOUT_S) -> str:
    """/finetune_progress polled until the diffusion phase has finished."""
    deadline = time.time() + timeout
    while "Until it finishes" in (progress := visitor.predict(api_name="/finetune_progress")):
        assert time.time() < deadline, progress
        time.sleep(0.5)
    return progress


def test_a_fine_tuned_class_is_known_to_every_endpoint_without_a_restart(app_url, tmp_path):
    uploads = []
    for i in range(4):
        Image.open(NORMAL).rotate(90 * i).save(tmp_path / f"normal{i}.png")
        uploads.append(gradio_client.handle_file(str(tmp_path / f"normal{i}.png")))
    visitor = client(app_url)
    summary = visitor.predict(uploads, "gravel", 1, False, "", api_name="/finetune")
    assert "Class 'gravel' is ready" in summary and "runs in the background" in summary, summary
    progress = diffusion_progress(visitor)
    assert "Diffusion fine-tune of class 'gravel'** (1 step): finished" in progress, progress
    assert "generic" not in visitor.predict(gradio_client.handle_file(str(NORMAL)), "gravel", api_name="/detect")[3]
    plot, slider, info = visitor.predict("gravel", None, None, "", api_name="/score_calibration")
    assert "**gravel**" in info, info
    status, info = visitor.predict("gravel", 0.5, 0.99, "", api_name="/save_threshold")
    assert "Saved threshold 0.5 (manual) for gravel" in status, status
    verdict = client(app_url).predict(gradio_client.handle_file(str(NORMAL)), "gravel", api_name="/detect")[3]
    assert "gravel" in verdict and "<b>0.5</b>" in verdict  # another visitor: a private app shares changes


def test_on_a_public_app_a_visitors_save_does_not_reach_another(public_url):
    alice, bob = client(public_url), client(public_url)
    image = gradio_client.handle_file(str(EXAMPLE))
    before = bob.predict(image, "washer", api_name="/detect")[3]
    alice.predict("washer", None, None, "", api_name="/score_calibration")
    status, _ = alice.predict("washer", 12.5, 0.99, "", api_name="/save_threshold")
    assert "Saved threshold 12.5 (manual) for washer to your session only" in status, status
    assert "<b>12.5</b>" in alice.predict(image, "washer", api_name="/detect")[3]
    after = bob.predict(image, "washer", api_name="/detect")[3]
    assert after == before and "<b>12.5</b>" not in after
    outside = alice.predict("washer", None, None, "/etc", api_name="/score_calibration")[2]
    assert "reads no folders on its server" in outside
