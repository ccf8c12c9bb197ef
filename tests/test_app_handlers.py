"""The app's handlers called directly: results for good input, a clear message for every bad one,
and no exception escaping. A tiny random model stands in for the trained default."""
from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmdiff.app import DetectorService, detect_tab, finetune_tab, refresh_views, reset_model, thresholds_tab
from vlmdiff.app.limits import FINETUNE_LIMITS, TEMP_FILES, WORK_SIDE
from vlmdiff.app.testing import build_tiny_model, payload
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


def detect(service, image, **settings):
    settings = {"class_name": "brick", "strength": 0.5, "steps": 2, "seed": 0, "opacity": 0.5, **settings}
    return detect_tab.detect(service, image, **settings)


# ---------------------------------------------------------------- detect


def test_detect_returns_caption_pictures_and_verdict(service):
    caption, reconstruction, overlay, verdict, score, state = detect(service, payload(EXAMPLE))
    assert "image shows" in caption
    assert reconstruction.size == overlay.size == Image.open(EXAMPLE).size == state.image.size
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
    assert "No model" in finetune_tab.start_finetune(missing, [payload(NORMAL)] * 4, "bottle")[0]
    assert "No model" in thresholds_tab.score_calibration(missing, None)[2]
    import_app().build_demo(missing)  # the app still starts and shows the message


def test_missing_model_falls_back_with_a_notice(model_dir, tmp_path):
    service = DetectorService(tmp_path / "missing", fallback=model_dir)
    assert service.ready and "could not load model" in service.status_markdown()


def test_unexpected_error_is_a_plain_message_not_a_traceback(service, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "detect", explode)
    verdict = detect(service, payload(EXAMPLE))[3]
    assert "Something went wrong: boom." in verdict
    assert "RuntimeError" not in verdict and "Traceback" not in verdict


def test_a_large_upload_is_worked_on_at_the_working_size(service, tmp_path):
    large = Image.open(NORMAL).convert("RGB").resize((4 * WORK_SIDE, 2 * WORK_SIDE))
    *_, score, state = detect(service, payload(image_file(tmp_path, "large.png", large)))
    assert score is not None
    assert state.image.size == state.result.reconstruction.size == (WORK_SIDE, WORK_SIDE // 2)
    assert state.result.anomaly_map.shape == (WORK_SIDE // 2, WORK_SIDE)


def test_replacing_the_image_runs_one_detection():
    """`change` fires twice when an image is replaced in the browser, `input` once: /detect listens to `input`."""
    demo = import_app().build_demo(DetectorService(None))
    [dependency] = [d for d in demo.config["dependencies"] if d.get("api_name") == "detect"]
    image_id = next(key for key, block in demo.blocks.items() if getattr(block, "elem_id", None) == "input-image")
    events = {event for target, event in dependency["targets"] if target == image_id}
    assert events == {"input"}
    assert demo.delete_cache == TEMP_FILES  # Gradio deletes old uploads and result pictures


# ---------------------------------------------------------------- thresholds


def test_thresholds_from_uploads_saved_and_used_by_detect(own_service, tmp_path):
    service = own_service
    normal = normal_uploads(tmp_path, 2)
    defective = [payload(image_file(tmp_path, f"crack{i}.png", Image.open(EXAMPLE).rotate(90 * i))) for i in range(2)]
    plot, slider, info, calibration, method = thresholds_tab.score_calibration(service, "brick", normal, defective)
    assert isinstance(plot, Image.Image) and "2 normal and 2 anomalous images (uploaded images)" in info
    assert slider["minimum"] <= slider["value"] <= slider["maximum"]
    slider, plot, info, method = thresholds_tab.suggest(service, "f1", calibration)
    assert method == "f1" and isinstance(plot, Image.Image)
    status, info, _ = thresholds_tab.save(service, "brick", slider["value"], method, calibration)
    assert "Saved threshold" in status and "(f1)" in status
    assert "Saved threshold: " in info and "(f1)" in info  # the summary follows the save
    assert Thresholds.load(service.model_dir / "thresholds.json").get("brick").method == "f1"
    # moved by hand above every score: the Detect tab says normal at once, the summary and the card follow
    high = float(calibration.scores.max()) + 1.0
    plot, info, method = thresholds_tab.move_threshold(service, calibration, high)
    assert method == "manual" and "0 of 2 normal images flagged" in info
    status, info, _ = thresholds_tab.save(service, "brick", high, method, calibration)
    assert f"Saved threshold: {high:.4g} (manual)" in info
    assert f"| brick | {high:.4g} | manual |" in refresh_views(service)[-1]
    assert "NORMAL" in detect(service, payload(NORMAL))[3]


def test_thresholds_bad_requests_get_a_message(own_service, tmp_path):
    service = own_service
    plot, slider, info, calibration, _ = thresholds_tab.score_calibration(service, "washer")
    assert "3 normal and 0 anomalous" in info
    assert "needs defective images" in thresholds_tab.suggest(service, "f1", calibration)[2]
    assert "quantile must be between" in thresholds_tab.suggest(service, "quantile", calibration, 1.5)[2]
    assert thresholds_tab.suggest(service, "quantile", calibration, 0.9)[3] == "quantile"
    assert "score images of 'brick'" in thresholds_tab.save(service, "brick", 0.5, "manual", calibration)[0]
    assert "Score calibration images first" in thresholds_tab.save(service, "brick", 0.5, "manual", None)[0]
    assert "Choose a class first" in thresholds_tab.score_calibration(service, None)[2]
    assert "Unknown class 'bottle'" in thresholds_tab.score_calibration(service, "bottle")[2]
    defective_only = [payload(image_file(tmp_path, "crack.png", Image.open(EXAMPLE)))]
    assert "Upload normal images" in thresholds_tab.score_calibration(service, "brick", None, defective_only)[2]


def test_saved_threshold_goes_to_the_user_folder_and_reset_drops_it(own_service):
    service = own_service
    source = service.model_dir
    before = folder_digest(source)
    assert not service.has_user_changes and "your changes" not in service.status_markdown()
    calibration = thresholds_tab.score_calibration(service, "washer")[3]
    status = thresholds_tab.save(service, "washer", 0.123, "manual", calibration)[0]
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
    calibration = thresholds_tab.score_calibration(service, "brick")[3]
    assert "Saved threshold" in thresholds_tab.save(service, "brick", 1.5, "manual", calibration)[0]
    summary = finetune_tab.start_finetune(service, normal_uploads(tmp_path), "gravel2", steps=1)[0]
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


def png_claiming_size(path: Path, width: int, height: int) -> dict:
    """A small PNG whose header claims width x height: what a huge upload looks like before decoding."""
    data = bytearray(Path(image_file(path.parent, path.name, Image.new("L", (40, 40)))).read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    path.write_bytes(bytes(data))
    return payload(path)


def test_finetune_bad_requests_get_a_message(service, tmp_path):
    notes = tmp_path / "tmp_abc.txt"
    notes.write_text("hello")
    uploads = normal_uploads(tmp_path)
    posters = [png_claiming_size(tmp_path / f"poster{i}.png", 7000, 7000) for i in range(9)]  # 441 megapixels
    cases = [
        (None, "gravel", "Upload at least 4"),
        ([], "gravel", "Upload at least 4"),
        (uploads[:3], "gravel", "at least 4 normal images; got 3"),
        (uploads * 26, "gravel", f"at most {FINETUNE_LIMITS.images} images per fine-tune; got 104"),
        (posters, "gravel", f"441 megapixels in all; one request may send at most {FINETUNE_LIMITS.megapixels}"),
        (uploads, "bad name!", "Invalid class name"),
        (uploads, "", "Invalid class name"),
        (uploads, "auto", "'auto' is a reserved name"),
        (uploads, " Auto ", "'Auto' is a reserved name ('auto' lets the model guess the class)"),
        (uploads, "unknown", "'unknown' is a reserved name"),
        (uploads, "brick", "already knows class 'brick'"),
        (uploads, " Brick ", "' Brick ' is the class 'brick': class names ignore case and surrounding spaces. "
                             "The model already knows class 'brick'"),
        (uploads[:3] + [payload(notes, "holiday.txt")], "gravel", "holiday.txt cannot be used"),
    ]
    for files, name, expected in cases:
        assert expected in finetune_tab.start_finetune(service, files, name, steps=1)[0], (name, expected)
    assert "whole number from 1 to 2000" in finetune_tab.start_finetune(service, uploads, "gravel", steps=0)[0]


def test_finetune_adds_a_class_and_a_failure_keeps_the_model(own_service, tmp_path, monkeypatch):
    service = own_service
    original = service.model_dir
    uploads = normal_uploads(tmp_path)
    calls = []
    summary = finetune_tab.start_finetune(service, uploads, "gravel", steps=1,
                                          progress=lambda fraction, desc=None: calls.append(fraction))[0]
    assert "Fine-tuned class 'gravel' on 4 images" in summary and "New threshold" in summary
    assert "gravel" in service.classes() and calls and calls[-1] == 1.0
    # the source model folder is untouched; the service switched to the fine-tuned user copy
    assert service.model_dir == service.store.user_dir
    assert "gravel" in Thresholds.load(service.model_dir / "thresholds.json").classes
    assert "gravel" not in Thresholds.load(original / "thresholds.json").classes
    # at once, with no restart: the selectors, detection, calibration and saving know the class
    status, _, detect_choices, threshold_choices, card = refresh_views(service)
    assert "gravel" in detect_choices["choices"] and "gravel" in threshold_choices["choices"] and "| gravel |" in card
    assert "gravel" in detect(service, payload(NORMAL), class_name="gravel")[3]
    calibration = thresholds_tab.score_calibration(service, " Gravel ")[3]
    assert calibration.class_name == "gravel"
    assert "Saved threshold 0.5" in thresholds_tab.save(service, "gravel", 0.5, "manual", calibration)[0]
    # re-tuned under another spelling: the same class, and the summary says so
    summary = finetune_tab.start_finetune(service, uploads, "GRAVEL", steps=1, update_existing=True)[0]
    assert "'GRAVEL' is the class 'gravel'" in summary and "Fine-tuned class 'gravel'" in summary
    assert service.classes().count("gravel") == 1 and "GRAVEL" not in service.classes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("vlmdiff.app.service.finetune", broken)
    pipeline = service.pipeline
    summary = finetune_tab.start_finetune(service, uploads, "gravel", steps=1, update_existing=True)[0]
    assert "current model is unchanged" in summary and "disk full" in summary
    assert service.pipeline is pipeline


# ---------------------------------------------------------------- about and command line


def test_model_card_and_arguments(own_service, monkeypatch):
    service = own_service
    card = service.model_card()
    assert "| brick |" in card and "has no MODEL_CARD.md" in card and str(service.model_dir) in card
    (service.model_dir / "MODEL_CARD.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny test model\n")
    card = service.model_card()
    assert card.startswith("# Tiny test model") and "| washer |" in card

    app = import_app()
    for name in ("VLMDIFF_MODEL", "VLMDIFF_DATA_ROOT", "VLMDIFF_ADMIN_PASSWORD", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    assert args.share is args.public is False and args.data_root is args.admin_password is None
    assert not app.access_from(args).gated
    monkeypatch.setenv("VLMDIFF_MODEL", "org/bigger-model")
    monkeypatch.setenv("VLMDIFF_ADMIN_PASSWORD", "secret")
    args = app.parse_args([])
    assert args.model == "org/bigger-model" and app.access_from(args).admin_password == "secret"
    args = app.parse_args(["--model", "x", "--share", "--server-name", "0.0.0.0", "--server-port", "7861",
                           "--data-root", "/data"])
    assert (args.model, args.share, args.server_name, args.server_port, args.data_root) == (
        "x", True, "0.0.0.0", 7861, "/data")
    assert app.access_from(args).public  # a share link is public
    monkeypatch.setenv("SPACE_ID", "org/space")
    assert app.access_from(app.parse_args([])).public
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo = app.build_demo(service)
    assert {"detect", "finetune", "save_threshold", "score_calibration"} <= {fn.api_name for fn in demo.fns.values()}
