"""The app's handlers called directly: results for good input, a clear message for every bad one,
and no exception escaping. A tiny random model stands in for the trained default."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import JOB_TIMEOUT_S, NORMAL_EXAMPLE as NORMAL, WASHER_EXAMPLE as WASHER, fit_memory
from vlmdiff import VLMDiffPipeline
from vlmdiff.app import (
    DetectorService, ServiceError, detect_tab, finetune_tab, refresh_views, reset_model, thresholds_tab,
)
from vlmdiff.app import cards
from vlmdiff.app import finetuning as finetuning_module
from vlmdiff.app.finetune_jobs import DONE, FAILED, DiffusionJob, generic_reconstruction
from vlmdiff.app.limits import FINETUNE_LIMITS, TEMP_FILES, WORK_SIDE
from app_harness import payload
from vlmdiff.model_folder import read_training_record
from vlmdiff.scoring import MEMORY, RECONSTRUCTION, AnomalyMapConfig
from vlmdiff.thresholds import Thresholds

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "brick_crack.png"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request


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


def test_the_strength_stops_at_the_noise_levels_the_denoiser_was_trained_on(service):
    pipeline = service.pipeline
    trained = pipeline.config.max_train_timestep / pipeline.scheduler.config.num_train_timesteps
    assert service.detector.max_strength == pytest.approx(trained) and service.detector.default_strength <= trained
    message = detect(service, payload(EXAMPLE), strength=round(trained + 0.05, 2))[3]
    assert f"between 0 and {service.detector.max_strength}" in message and "trained" in message
    assert "trained" not in detect(service, payload(EXAMPLE), strength=trained)[3]


def test_the_shipped_model_opens_on_its_trained_strength_and_names_its_captioner():
    detector = DetectorService(ROOT / "assets" / "vlmdiff-default").detector
    assert detector.max_strength == 0.6 and detector.default_strength == 0.6  # trained on t < 600 of 1000
    assert "not a VLM" in detector.captioner_title  # the offline tagger is no VLM


def test_detect_returns_caption_pictures_and_verdict(service):
    caption, reconstruction, overlay, verdict, score, state = detect(service, payload(EXAMPLE))
    assert "image shows" in caption
    assert reconstruction.size == overlay.size == Image.open(EXAMPLE).size == state.image.size
    assert np.isfinite(score) and "ANOMALOUS" in verdict and "strength 0.50" in verdict
    assert state.result.class_name == "brick"
    dimmer = detect_tab.reblend(state, 0.0)  # opacity 0: the input itself, no model run
    assert np.array_equal(np.asarray(dimmer), np.asarray(state.image.convert("RGB")))


def test_converted_modes_are_detected_as_their_rgb_content(service, tmp_path):
    rgb = Image.open(NORMAL).convert("RGB").resize((64, 64))
    gray = rgb.convert("L")
    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # the same grey levels in 16 bits
    scores = {}
    for name, image in [("rgb.png", rgb), ("gray.png", gray), ("rgba.png", rgb.convert("RGBA")), ("16bit.png", sixteen)]:
        _, reconstruction, overlay, verdict, scores[name], state = detect(service, payload(image_file(tmp_path, name, image)))
        assert reconstruction.size == overlay.size == (64, 64), (name, verdict)
        expected = gray.convert("RGB") if name in ("gray.png", "16bit.png") else rgb  # what the model should see
        assert np.array_equal(np.asarray(state.image.convert("RGB")), np.asarray(expected)), name
    assert scores["rgba.png"] == scores["rgb.png"] and scores["16bit.png"] == scores["gray.png"]


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

    monkeypatch.setattr(service.detector, "detect", explode)
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
    assert restarted.thresholds.get("washer").value == pytest.approx(0.123)
    # reset asks first, saying what it drops (the washer threshold, not brick's); then the shipped thresholds
    assert service.changes_summary() == "This drops the thresholds you saved for washer, for good; the shipped " \
                                        "model is used again."
    shipped = Thresholds.load(source / "thresholds.json").get("washer").value
    status, reset_button, *_ = reset_model(service)
    assert service.model_dir == source and not service.store.user_dir.exists()
    assert service.thresholds.get("washer").value == pytest.approx(shipped)
    assert reset_button["visible"] is False and "your changes" not in status


def test_app_changes_leave_the_shipped_model_byte_identical(tmp_path):
    """Saving a threshold and fine-tuning in the app on the embedded model write only to the user folder."""
    shipped = ROOT / "assets" / "vlmdiff-default"
    before = folder_digest(shipped)
    service = DetectorService(shipped, user_models_dir=tmp_path / "user-models")
    calibration = thresholds_tab.score_calibration(service, "brick")[3]
    assert "Saved threshold" in thresholds_tab.save(service, "brick", 1.5, "manual", calibration)[0]
    summary = finetune_tab.start_finetune(service, normal_uploads(tmp_path), "gravel2", steps=1)[0]
    assert "Class 'gravel2' is ready" in summary, summary
    assert service.finetuning.job().wait(JOB_TIMEOUT_S) and service.finetuning.job().state == DONE
    assert service.model_dir == service.store.user_dir
    assert service.thresholds.get("brick").value == pytest.approx(1.5)  # the saved threshold survived the fine-tune
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
    for steps in (-1, 2001, 1.5):
        message = finetune_tab.start_finetune(service, uploads, "gravel", steps=steps)[0]
        assert "whole number from 0 (memory and threshold only) to 2000" in message, steps


def held_diffusion(monkeypatch) -> threading.Event:
    """The diffusion phase waits until the returned event is set; the quick phase runs as usual."""
    release = threading.Event()
    real = finetuning_module.finetune

    def finetune(*args, config, **kwargs):
        if config.steps:
            assert release.wait(JOB_TIMEOUT_S)
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(finetuning_module, "finetune", finetune)
    return release


def last_finetune(folder: Path) -> dict:
    return read_training_record(folder)["finetunes"][-1]


def test_a_quick_phase_makes_the_class_usable_then_the_diffusion_phase_replaces_the_model(
        own_service, tmp_path, monkeypatch):
    service = own_service
    original = service.model_dir
    uploads = normal_uploads(tmp_path)
    release = held_diffusion(monkeypatch)
    calls = []
    summary = finetune_tab.start_finetune(service, uploads, "gravel", steps=2,
                                          progress=lambda fraction, desc=None: calls.append(fraction))[0]
    assert "Class 'gravel' is ready: memory and threshold from 4 images" in summary, summary
    assert "expected false-positive rate" in summary and "still the model's generic one" in summary
    assert "runs in the background" in summary and calls and calls[-1] == 1.0
    # the quick model is in use at once, with no restart: the selectors, detection, calibration and saving
    quick = service.pipeline
    assert service.model_dir == service.store.user_dir and last_finetune(service.model_dir)["steps"] == 0
    assert "gravel" in Thresholds.load(service.model_dir / "thresholds.json").classes
    assert "gravel" not in Thresholds.load(original / "thresholds.json").classes
    status, _, detect_choices, threshold_choices, card = refresh_views(service)
    assert "gravel" in detect_choices["choices"] and "gravel" in threshold_choices["choices"] and "| gravel |" in card
    verdict = detect(service, payload(NORMAL), class_name="gravel")[3]
    assert "<b>the model's generic one: the diffusion is not fine-tuned on 'gravel'" in verdict
    calibration = thresholds_tab.score_calibration(service, " Gravel ", uploads)[3]
    assert calibration.class_name == "gravel"
    # while the diffusion phase is pending: its progress, another fine-tune and a reset are refused, saves are kept
    assert "Diffusion fine-tune of class 'gravel'** (2 steps)" in finetune_tab.diffusion_progress(service)
    refused = finetune_tab.start_finetune(service, uploads, "sand", steps=0)[0]
    assert "The diffusion fine-tune of class 'gravel' is still" in refused, refused
    with pytest.raises(ServiceError, match="diffusion fine-tune of class 'gravel' is running; reset the model when"):
        service.reset_model()
    assert "Saved threshold 0.5" in thresholds_tab.save(service, "gravel", 0.5, "manual", calibration)[0]
    release.set()
    job = service.finetuning.job()
    assert job.wait(JOB_TIMEOUT_S) and job.state == DONE, job.message
    # the adapted model replaced the quick one; the threshold saved meanwhile survived
    assert service.pipeline is not quick and last_finetune(service.model_dir)["steps"] == 2
    assert service.thresholds.get("gravel").value == pytest.approx(0.5)
    assert "generic" not in detect(service, payload(NORMAL), class_name="gravel")[3]
    assert "finished. 2 steps in" in finetune_tab.diffusion_progress(service)
    assert "own reconstructions" in finetune_tab.diffusion_progress(service)
    # re-tuned under another spelling, memory and threshold only: the same class, and the summary says so
    summary = finetune_tab.start_finetune(service, uploads, "GRAVEL", steps=0, update_existing=True)[0]
    assert "'GRAVEL' is the class 'gravel'" in summary and "Class 'gravel' is ready" in summary
    assert "0 training steps" in summary and service.finetuning.job() is job  # no new diffusion phase
    assert service.classes().count("gravel") == 1 and "GRAVEL" not in service.classes()


def test_a_failed_diffusion_phase_keeps_the_quick_model_and_says_why(own_service, tmp_path, monkeypatch):
    service = own_service
    uploads = normal_uploads(tmp_path)
    real = finetuning_module.finetune

    def diffusion_fails(*args, config, **kwargs):
        if config.steps:
            raise RuntimeError("not enough memory for the diffusion. More details follow")
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(finetuning_module, "finetune", diffusion_fails)
    assert "Class 'gravel' is ready" in finetune_tab.start_finetune(service, uploads, "gravel", steps=3)[0]
    quick = service.pipeline
    job = service.finetuning.job()
    assert job.wait(JOB_TIMEOUT_S) and job.state == FAILED
    progress = finetune_tab.diffusion_progress(service)
    assert "failed. Reason: not enough memory for the diffusion." in progress and "More details" not in progress
    assert "generic reconstruction" in progress and "RuntimeError" not in progress
    assert service.pipeline is quick and "gravel" in service.classes()
    assert "generic one" in detect(service, payload(NORMAL), class_name="gravel")[3]
    # the next fine-tune is accepted; a failing quick phase leaves the model as it was

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(finetuning_module, "finetune", broken)
    summary = finetune_tab.start_finetune(service, uploads, "gravel", steps=1, update_existing=True)[0]
    assert "current model is unchanged" in summary and "disk full" in summary
    assert service.pipeline is quick and service.finetuning.job() is job


def test_a_diffusion_job_reports_the_training_steps():
    job = DiffusionJob("gravel", 5, [], Path("model"))
    assert "waiting for the worker" in job.describe() and "generic reconstruction" in job.describe()
    job.report(0.38, "training the diffusion, step 2 of 5")  # what finetune reports after each step
    assert "training the diffusion, step 2 of 5 (" in job.describe()
    job.report(0.8, "updating memory and threshold")
    assert "step" not in job.progress()
    job.finish(DONE, "5 steps in 3 s.")
    assert job.wait(0)
    assert job.describe() == "**Diffusion fine-tune of class 'gravel'** (5 steps): finished. 5 steps in 3 s."


@pytest.mark.parametrize("record, generic", [
    ({}, False),  # trained with the model, or no record: its own reconstruction
    ({"finetunes": [{"class_name": "gravel", "steps": 0}]}, True),
    ({"finetunes": [{"class_name": "gravel", "steps": 0}, {"class_name": "gravel", "steps": 20}]}, False),
    ({"finetunes": [{"class_name": "gravel", "steps": 20}, {"class_name": "gravel", "steps": 0}]}, False),
    ({"classes": ["gravel"], "finetunes": [{"class_name": "gravel", "steps": 0}]}, False),
    ({"finetunes": [{"class_name": "sand", "steps": 0}]}, False),
])
def test_generic_reconstruction_follows_the_training_record(tmp_path, record, generic):
    (tmp_path / "training.json").write_text(json.dumps(record))
    assert generic_reconstruction(tmp_path, "gravel") is generic


def memory_model(model_dir: Path, folder: Path) -> Path:
    """The tiny model with a normal-feature memory of brick and washer (rotated examples)."""
    pipeline = VLMDiffPipeline.from_pretrained(model_dir)
    images = {name: Image.open(path).convert("RGB") for name, path in (("brick", NORMAL), ("washer", WASHER))}
    names = [name for name in images for _ in range(4)]
    rotated = [images[name].rotate(90 * (i % 4)) for i, name in enumerate(names)]
    pipeline.memory = fit_memory(rotated, names, 200)
    pipeline.save_pretrained(folder)
    return folder


def test_auto_on_an_image_of_no_known_class_shows_the_class_match_and_no_verdict(model_dir, tmp_path):
    service = DetectorService(memory_model(model_dir, tmp_path / "model"), user_models_dir=tmp_path / "user")
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 128).astype(np.uint8), (128, 1))).convert("RGB")
    *_, verdict, score, state = detect(service, payload(image_file(tmp_path, "gradient.png", gradient)),
                                       class_name="auto")
    assert state.result.unknown_class and score is not None
    assert "UNKNOWN CLASS" in verdict and "<td>class match</td>" in verdict
    assert state.result.class_match.describe() in verdict
    assert "matches no known class; nearest" in verdict and ", then " in verdict
    assert "NORMAL" not in verdict and "ANOMALOUS" not in verdict and "<td>threshold</td><td><b>-</b>" in verdict
    # a known class guessed: the class match says how well it fits, and the verdict is there
    *_, verdict, _, state = detect(service, payload(NORMAL), class_name="auto")
    assert not state.result.unknown_class and "<td>class match</td><td><b>class brick: nearest brick" in verdict
    assert "NORMAL" in verdict or "ANOMALOUS" in verdict
    assert "class match" not in detect(service, payload(NORMAL), class_name="brick")[3]  # not guessed: no match


def test_the_display_captioner_falls_back_with_a_note(model_dir, tmp_path):
    missing = tmp_path / "no-such-vlm"  # a local folder id: nothing is fetched
    service = DetectorService(model_dir, user_models_dir=tmp_path / "user", captioner=str(missing))
    caption = detect(service, payload(NORMAL))[0]
    assert "image shows" in caption
    assert f"(The VLM '{missing}' could not be loaded (there is no folder {missing});" in caption
    assert caption.endswith("from the model's own captioner, 'offline-efficientnet'.)")
    assert detect(service, payload(EXAMPLE))[0].endswith("'offline-efficientnet'.)")  # loaded once, noted each time


# ---------------------------------------------------------------- about and command line


def test_model_card_and_arguments(own_service, monkeypatch):
    service = own_service
    card = service.model_card()
    assert "| brick |" in card and "has no MODEL_CARD.md" in card and str(service.model_dir) in card
    (service.model_dir / "MODEL_CARD.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny test model\n")
    card = service.model_card()
    assert card.startswith("# Tiny test model") and "| washer |" in card
    assert "| input vs reconstruction |" in card  # the tiny model's published scoring, for every class
    assert "The denoising strength changes the score of " + ", ".join(service.classes()) in card
    memory_only = replace(service.pipeline.config, anomaly=AnomalyMapConfig(weights={MEMORY: 1.0, RECONSTRUCTION: 0.0}))
    card = cards.model_card(service.model_dir, memory_only, service.pipeline.thresholds, ["brick"])
    assert "| brick | " in card and "| normal-feature memory |" in card
    assert "No class's score uses the reconstruction" in card
    assert detect(service, payload(EXAMPLE), class_name="washer")[3].count("(changes with the strength)") == 1

    app = import_app()
    for name in ("VLMDIFF_MODEL", "VLMDIFF_DATA_ROOT", "VLMDIFF_ADMIN_PASSWORD", "SPACE_ID", "VLMDIFF_CAPTIONER"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    assert args.share is args.public is False and args.data_root is args.admin_password is args.captioner is None
    assert not app.access_from(args).gated
    monkeypatch.setenv("VLMDIFF_MODEL", "org/bigger-model")
    monkeypatch.setenv("VLMDIFF_ADMIN_PASSWORD", "secret")
    monkeypatch.setenv("VLMDIFF_CAPTIONER", "org/a-vlm")
    args = app.parse_args([])
    assert args.model == "org/bigger-model" and app.access_from(args).admin_password == "secret"
    assert args.captioner == "org/a-vlm" and app.parse_args(["--captioner", "my/vlm"]).captioner == "my/vlm"
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
    assert {"detect", "finetune", "finetune_progress", "save_threshold", "score_calibration"} <= {
        fn.api_name for fn in demo.fns.values()}


def test_memory_guided_checkbox_changes_the_reconstruction_and_says_so(model_dir, tmp_path):
    service = DetectorService(memory_model(model_dir, tmp_path / "model"), user_models_dir=tmp_path / "user")
    assert service.detector.can_guide and not service.detector.memory_guided_default  # the model configures no guidance
    _, plain, _, plain_verdict, _, _ = detect(service, payload(WASHER), class_name="washer", memory_guided=False)
    _, guided, _, guided_verdict, _, state = detect(service, payload(WASHER), class_name="washer", memory_guided=True)
    assert state.memory_guided and "memory-guided" in guided_verdict and "memory-guided" not in plain_verdict
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))
    without_memory = DetectorService(model_dir, user_models_dir=tmp_path / "user2")
    assert not without_memory.detector.can_guide
    assert "memory-guided" not in detect(without_memory, payload(WASHER), memory_guided=True)[3]  # nothing to guide with
