"""The app's handlers called directly: results for good input, a clear message for every bad one,
and no exception escaping. A tiny random model stands in for the trained default."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmdiff.app import DetectorService, finetune_tab, reset_model, thresholds_tab
from vlmdiff.app import detect_tab
from vlmdiff.app.testing import build_tiny_model
from vlmdiff.thresholds import Thresholds

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "brick_crack.png"
NORMAL = ROOT / "assets" / "examples" / "brick_good.png"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("app") / "model")


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory) -> DetectorService:
    return DetectorService(model_dir, user_models_dir=tmp_path_factory.mktemp("user-models"))


@pytest.fixture
def own_service(model_dir, tmp_path) -> DetectorService:
    """A service on a private copy of the model and its own user folder, for tests that change either."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return DetectorService(copy, user_models_dir=tmp_path / "user-models")


def folder_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file of a folder: its content hash and its mode."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def image_file(tmp_path: Path, name: str, image: Image.Image) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def import_app():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import app

    return app


def payload(path, orig_name: str | None = None) -> dict:
    """What Gradio hands a handler that runs with preprocess=False."""
    return {"path": str(path), "orig_name": orig_name or Path(path).name, "meta": {"_type": "gradio.FileData"}}


def detect(service, image, **settings):
    settings = {"class_name": "brick", "strength": 0.5, "steps": 2, "seed": 0, "opacity": 0.5, **settings}
    return detect_tab.detect(service, image, **settings)


# ---------------------------------------------------------------- detect


def test_detect_returns_caption_pictures_and_verdict(service):
    caption, reconstruction, overlay, verdict, score, state = detect(service, payload(EXAMPLE))
    assert "image shows" in caption
    assert reconstruction.size == overlay.size == Image.open(EXAMPLE).size
    assert np.isfinite(score) and "ANOMALOUS" in verdict and "strength 0.50" in verdict
    assert state.result.class_name == "brick"
    dimmer = detect_tab.reblend(state, 0.0)  # opacity 0: the input itself, no model run
    assert np.array_equal(np.asarray(dimmer), np.asarray(state.image.convert("RGB")))


def test_converted_modes_are_accepted(service, tmp_path):
    rgb = Image.open(NORMAL).convert("RGB").resize((64, 64))
    sixteen = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    for name, image in [("gray.png", rgb.convert("L")), ("rgba.png", rgb.convert("RGBA")), ("16bit.png", sixteen)]:
        _, reconstruction, overlay, verdict, score, _ = detect(service, payload(image_file(tmp_path, name, image)))
        assert reconstruction is not None and overlay is not None and score is not None, (name, verdict)


def bad_image_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(EXAMPLE.read_bytes()[:300])  # a truncated PNG
    return {
        "text file": (str(notes), "not a readable image file"),
        "corrupted": (str(broken), "not a readable image file"),
        "tiny": (image_file(tmp_path, "tiny.png", Image.new("RGB", (20, 40))), "at least 32 px"),
        "huge": (image_file(tmp_path, "huge.png", Image.new("L", (8001, 40))), "at most 8000 px"),
        "cmyk": (image_file(tmp_path, "cmyk.jpg", Image.new("CMYK", (64, 64))), "unsupported image mode"),
    }


def test_bad_images_get_a_message(service, tmp_path):
    for case, (path, expected) in bad_image_files(tmp_path).items():
        caption, reconstruction, overlay, verdict, score, state = detect(service, payload(path))
        assert expected in verdict, case
        assert reconstruction is overlay is score is state is None


@pytest.mark.parametrize("settings, expected", [
    ({"class_name": "bottle"}, "Unknown class"),
    ({"strength": 1.5}, "between 0 and 1"),
    ({"steps": 0}, "from 1 to 50"),
    ({"steps": 51}, "from 1 to 50"),
    ({"seed": -1}, "seed"),
    ({"strength": "strong"}, "must be numbers"),
])
def test_bad_settings_get_a_message(service, settings, expected):
    verdict = detect(service, payload(EXAMPLE), **settings)[3]
    assert expected in verdict


def test_no_image_and_no_model(service, tmp_path):
    assert "Upload an image" in detect(service, None)[3]
    assert detect_tab.reblend(None, 0.3)["__type__"] == "update"
    missing = DetectorService(tmp_path / "missing", fallback=tmp_path / "also-missing")
    assert not missing.ready and "No model loaded" in missing.status_markdown()
    assert "No model is loaded" in detect(missing, payload(EXAMPLE))[3]
    assert "No model" in finetune_tab.start_finetune(missing, [payload(NORMAL)] * 4, "bottle")
    assert "No model" in thresholds_tab.score_calibration(missing, None, thresholds_tab.STORED, "")[2]
    import_app().build_demo(missing)  # the app still starts and shows the message


def test_missing_model_falls_back_with_a_notice(model_dir, tmp_path):
    service = DetectorService(tmp_path / "missing", fallback=model_dir)
    assert service.ready and "could not load model" in service.status_markdown()


def test_unexpected_error_is_a_message_not_a_traceback(service, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "detect", explode)
    verdict = detect(service, payload(EXAMPLE))[3]
    assert "Something went wrong (RuntimeError: boom)" in verdict and "Traceback" not in verdict


# ---------------------------------------------------------------- thresholds


def mvtec_folder(tmp_path: Path) -> Path:
    """brick/test/good and brick/test/crack (with masks), two images each."""
    root = tmp_path / "calibration" / "brick"
    for defect, source in (("good", NORMAL), ("crack", EXAMPLE)):
        (root / "test" / defect).mkdir(parents=True)
        (root / "ground_truth" / defect).mkdir(parents=True)
        for i in range(2):
            Image.open(source).rotate(90 * i).resize((64, 64)).save(root / "test" / defect / f"{i:03d}.png")
            Image.new("L", (64, 64)).save(root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root.parent


def test_thresholds_from_a_folder_saved_and_used_by_detect(own_service, tmp_path):
    service = own_service
    plot, slider, info, calibration, method = thresholds_tab.score_calibration(
        service, "brick", thresholds_tab.FOLDER, str(mvtec_folder(tmp_path)))
    assert isinstance(plot, Image.Image) and "2 normal and 2 anomalous" in info
    assert slider["minimum"] <= slider["value"] <= slider["maximum"]
    slider, plot, info, method = thresholds_tab.suggest(service, "f1", calibration)
    assert method == "f1" and isinstance(plot, Image.Image)
    status = thresholds_tab.save(service, "brick", slider["value"], method, calibration)
    assert "Saved threshold" in status and "(f1)" in status
    assert Thresholds.load(service.model_dir / "thresholds.json").get("brick").method == "f1"
    # moved by hand above every score: the Detect tab says normal at once
    high = float(calibration.scores.max()) + 1.0
    plot, info, method = thresholds_tab.move_threshold(service, calibration, high)
    assert method == "manual" and "0 of 2 normal images flagged" in info
    assert "Saved threshold" in thresholds_tab.save(service, "brick", high, method, calibration)
    assert "NORMAL" in detect(service, payload(NORMAL))[3]


def test_thresholds_bad_requests_get_a_message(own_service, tmp_path):
    service = own_service
    plot, slider, info, calibration, _ = thresholds_tab.score_calibration(service, "washer", thresholds_tab.STORED, "")
    assert "3 normal and 0 anomalous" in info
    assert "needs anomalous images" in thresholds_tab.suggest(service, "f1", calibration)[2]
    assert "quantile must be between" in thresholds_tab.suggest(service, "quantile", calibration, 1.5)[2]
    assert thresholds_tab.suggest(service, "quantile", calibration, 0.9)[3] == "quantile"
    assert "score images of 'brick'" in thresholds_tab.save(service, "brick", 0.5, "manual", calibration)
    assert "Score calibration images first" in thresholds_tab.save(service, "brick", 0.5, "manual", None)
    for source, folder, expected in [
        (thresholds_tab.FOLDER, str(tmp_path / "nowhere"), "No calibration folder"),
        (thresholds_tab.FOLDER, str(tmp_path), "Cannot read the calibration folder"),
        (thresholds_tab.STORED, "", "Choose a class first"),
    ]:
        class_name = None if expected == "Choose a class first" else "brick"
        assert expected in thresholds_tab.score_calibration(service, class_name, source, folder)[2]


def test_saved_threshold_goes_to_the_user_folder_and_reset_drops_it(own_service):
    service = own_service
    source = service.model_dir
    before = folder_digest(source)
    assert not service.has_user_changes and "your changes" not in service.status_markdown()
    calibration = thresholds_tab.score_calibration(service, "washer", thresholds_tab.STORED, "")[3]
    status = thresholds_tab.save(service, "washer", 0.123, "manual", calibration)
    assert "Saved threshold 0.123" in status and str(service.store.user_dir) in status
    assert service.model_dir == service.store.user_dir and service.has_user_changes
    assert str(service.store.user_dir) in service.status_markdown()
    assert folder_digest(source) == before  # the source model is never written
    assert Thresholds.load(service.model_dir / "thresholds.json").get("washer").value == pytest.approx(0.123)
    # a restart finds the user's changes
    restarted = DetectorService(source, user_models_dir=service.store.user_dir.parent)
    assert restarted.threshold("washer").value == pytest.approx(0.123)
    # reset: back to the shipped thresholds, the user folder gone
    shipped = Thresholds.load(source / "thresholds.json").get("washer").value
    status, reset_button, *_ = reset_model(service)
    assert service.model_dir == source and not service.store.user_dir.exists()
    assert service.threshold("washer").value == pytest.approx(shipped)
    assert reset_button["visible"] is False and "your changes" not in status


def test_app_changes_leave_the_shipped_model_byte_identical(tmp_path):
    """Saving a threshold and fine-tuning in the app on the embedded model write only to the user folder."""
    shipped = ROOT / "assets" / "vlmdiff-default"
    before = folder_digest(shipped)
    service = DetectorService(shipped, user_models_dir=tmp_path / "user-models")
    calibration = thresholds_tab.score_calibration(service, "brick", thresholds_tab.STORED, "")[3]
    assert "Saved threshold" in thresholds_tab.save(service, "brick", 1.5, "manual", calibration)
    summary = finetune_tab.start_finetune(service, normal_uploads(tmp_path), "gravel2", steps=1)
    assert "Fine-tuned class 'gravel2'" in summary, summary
    assert service.model_dir == service.store.user_dir
    assert service.threshold("brick").value == pytest.approx(1.5)  # the saved threshold survived the fine-tune
    assert folder_digest(shipped) == before
    status = subprocess.run(["git", "status", "--porcelain", "assets"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode == 0:  # a git checkout
        assert status.stdout == ""


# ---------------------------------------------------------------- fine-tune


def normal_uploads(tmp_path: Path, count: int = 4) -> list[dict]:
    base = Image.open(NORMAL).convert("RGB")
    return [payload(image_file(tmp_path, f"upload{i}.png", base.rotate(90 * i)), f"normal_{i}.png")
            for i in range(count)]


def test_finetune_bad_requests_get_a_message(service, tmp_path):
    notes = tmp_path / "tmp_abc.txt"
    notes.write_text("hello")
    uploads = normal_uploads(tmp_path)
    cases = [
        (None, "gravel", "Upload at least 4"),
        ([], "gravel", "Upload at least 4"),
        (uploads[:3], "gravel", "at least 4 normal images; got 3"),
        (uploads, "bad name!", "Invalid class name"),
        (uploads, "", "Invalid class name"),
        (uploads, "auto", "Invalid class name"),
        (uploads, "brick", "already knows class 'brick'"),
        (uploads[:3] + [payload(notes, "holiday.txt")], "gravel", "holiday.txt cannot be used"),
    ]
    for files, name, expected in cases:
        assert expected in finetune_tab.start_finetune(service, files, name, steps=1), (name, expected)
    assert "whole number from 1 to 2000" in finetune_tab.start_finetune(service, uploads, "gravel", steps=0)


def test_finetune_adds_a_class_and_a_failure_keeps_the_model(own_service, tmp_path, monkeypatch):
    service = own_service
    original = service.model_dir
    uploads = normal_uploads(tmp_path)
    calls = []
    summary = finetune_tab.start_finetune(service, uploads, "gravel", steps=1,
                                          progress=lambda fraction, desc=None: calls.append(fraction))
    assert "Fine-tuned class 'gravel' on 4 images" in summary and "New threshold" in summary
    assert "gravel" in service.classes and calls and calls[-1] == 1.0
    # the source model folder is untouched; the service switched to the fine-tuned user copy
    assert service.model_dir == service.store.user_dir
    assert "gravel" in Thresholds.load(service.model_dir / "thresholds.json").classes
    assert "gravel" not in Thresholds.load(original / "thresholds.json").classes
    assert "gravel" in detect(service, payload(NORMAL), class_name="gravel")[3]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("vlmdiff.app.service.finetune", broken)
    pipeline = service.pipeline
    summary = finetune_tab.start_finetune(service, uploads, "gravel", steps=1, update_existing=True)
    assert "current model is unchanged" in summary and "disk full" in summary
    assert service.pipeline is pipeline


# ---------------------------------------------------------------- about and command line


def test_model_card_and_arguments(own_service, monkeypatch):
    service = own_service
    card = service.model_card()
    assert "| brick |" in card and "has no MODEL_CARD.md" in card
    (service.model_dir / "MODEL_CARD.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny test model\n")
    card = service.model_card()
    assert card.startswith("# Tiny test model") and "| washer |" in card

    app = import_app()
    monkeypatch.setenv("VLMDIFF_MODEL", "org/bigger-model")
    args = app.parse_args([])
    assert args.model == "org/bigger-model" and args.share is False
    args = app.parse_args(["--model", "x", "--share", "--server-name", "0.0.0.0", "--server-port", "7861"])
    assert (args.model, args.share, args.server_name, args.server_port) == ("x", True, "0.0.0.0", 7861)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo = app.build_demo(service)
    assert {"detect", "finetune", "save_threshold"} <= {fn.api_name for fn in demo.fns.values()}
