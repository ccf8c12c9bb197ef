"""The running app (app.py in a subprocess, tiny random model) through gradio_client."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlmdiff.app.testing import build_tiny_model, running_app

gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "washer_broken.png"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("app_client")
    model = build_tiny_model(workdir / "model")
    with running_app(ROOT / "app.py", model, workdir) as url:
        yield url


def test_detect_endpoint_returns_caption_pictures_and_score(app_url, tmp_path):
    client = gradio_client.Client(app_url, verbose=False)
    caption, reconstruction, overlay, verdict, score = client.predict(
        gradio_client.handle_file(str(EXAMPLE)), "washer", 0.6, 2, 0, 0.5, api_name="/detect")
    assert "image shows" in caption
    for picture in (reconstruction, overlay):
        assert Image.open(picture).size == Image.open(EXAMPLE).size
    assert isinstance(score, float) and "washer" in verdict and "strength 0.60" in verdict
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    caption, reconstruction, overlay, verdict, score = client.predict(
        gradio_client.handle_file(str(notes)), api_name="/detect")
    assert "not a readable image file" in verdict and reconstruction is None and score is None
