"""A gated app (public, or with an admin password): a visitor's saved thresholds and fine-tuned
classes stay in their session, only the admin password changes the model for everyone, and a
public app caps fine-tunes. Two sessions stand for two visitors."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from vlmdiff.app import DetectorService, detect_tab, finetune_tab, refresh_views, reset_model, thresholds_tab
from vlmdiff.app import finetuning as finetuning_module
from vlmdiff.app.access import REJECTED, Access
from vlmdiff.app.finetune_jobs import DONE, DROPPED
from vlmdiff.app.limits import PUBLIC_FINETUNE_LIMITS
from vlmdiff.app.detection import Detection
from vlmdiff.app.session import Session, close_session
from vlmdiff.memory import ClassMatch
from vlmdiff.pipeline import DetectionResult, judge
from conftest import JOB_TIMEOUT_S, NORMAL_EXAMPLE as NORMAL, WASHER_EXAMPLE as WASHER
from app_harness import payload
from vlmdiff.thresholds import Thresholds


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request


def gated(model_dir: Path, tmp_path: Path, **access) -> DetectorService:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return DetectorService(copy, user_models_dir=tmp_path / "user-models", access=Access(**access))


def save(service, session, class_name, value, password=None) -> str:
    calibration = thresholds_tab.score_calibration(service, class_name, session=session)[3]
    return thresholds_tab.save(service, class_name, value, "manual", calibration, password=password,
                               session=session)[0]


def threshold_seen(service, session, class_name="washer") -> float:
    state = detect_tab.detect(service, payload(WASHER), class_name, 0.5, 2, 0, 0.5, session)[-1]
    return state.result.threshold


def normal_uploads(tmp_path: Path, count: int = 4) -> list[dict]:
    base = Image.open(NORMAL).convert("RGB")
    paths = []
    for i in range(count):
        base.rotate(90 * i).save(tmp_path / f"normal{i}.png")
        paths.append(payload(tmp_path / f"normal{i}.png"))
    return paths


def test_a_visitors_threshold_does_not_reach_another_session(model_dir, tmp_path):
    service = gated(model_dir, tmp_path, public=True)
    alice, bob = Session(), Session()
    shipped = Thresholds.load(service.model_dir / "thresholds.json").get("washer").value
    status = save(service, alice, "washer", 0.123)
    assert "your session only" in status and str(tmp_path) not in status
    assert threshold_seen(service, alice) == pytest.approx(0.123)
    assert threshold_seen(service, bob) == pytest.approx(shipped)
    assert service.thresholds.get("washer", bob).value == pytest.approx(shipped)
    assert not service.has_user_changes and not service.store.user_dir.exists()  # nothing written for everyone
    assert "| washer | 0.123 |" in refresh_views(service, alice)[-1]
    assert "| washer | 0.123 |" not in refresh_views(service, bob)[-1]
    # 'Drop my changes' clears Alice's session only
    status, reset_button, *_ = reset_model(service, alice)
    assert not alice.has_changes and reset_button["visible"] is False
    assert threshold_seen(service, alice) == pytest.approx(shipped)


def test_a_visitors_fine_tuned_class_is_theirs_alone(model_dir, tmp_path):
    service = gated(model_dir, tmp_path, public=True)
    alice, bob = Session(), Session()
    summary, returned = finetune_tab.start_finetune(service, normal_uploads(tmp_path), "gravel", steps=1,
                                                    session=alice)
    assert "Class 'gravel' is ready" in summary and "in this session" in summary and str(tmp_path) not in summary
    assert returned is alice and alice.model_dir.is_dir()
    quick = alice.model_dir
    # the diffusion phase replaces Alice's quick model with another private folder; Bob follows no job
    assert alice.finetune_job.wait(JOB_TIMEOUT_S) and alice.finetune_job.state == DONE, alice.finetune_job.message
    assert alice.model_dir != quick and alice.model_dir.is_dir() and not quick.exists()
    assert "finished" in finetune_tab.diffusion_progress(service, alice)
    assert finetune_tab.diffusion_progress(service, bob) == finetune_tab.NO_JOB
    assert "gravel" in service.classes(alice) and "gravel" not in service.classes(bob)
    assert "gravel" not in service.classes() and not service.store.user_dir.exists()
    assert "gravel" in refresh_views(service, alice)[2]["choices"]
    assert "gravel" not in refresh_views(service, bob)[2]["choices"]
    assert "gravel" in detect_tab.detect(service, payload(NORMAL), "gravel", session=alice)[3]
    assert "Unknown class 'gravel'" in detect_tab.detect(service, payload(NORMAL), "gravel", session=bob)[3]
    # Alice's own threshold for her class; 'Drop my changes' would drop both; then the session ends
    assert "your session only" in save(service, alice, "gravel", 0.5)
    assert "thresholds you saved for gravel and the classes you fine-tuned (gravel)" in service.changes_summary(alice)
    assert service.changes_summary(bob) == "There are no changes to drop."
    folder = alice.model_dir
    close_session(alice)
    assert not folder.exists() and not alice.has_changes


def test_dropping_my_changes_during_the_diffusion_phase_drops_its_model(model_dir, tmp_path, monkeypatch):
    service = gated(model_dir, tmp_path, public=True)
    alice = Session()
    started, release = threading.Event(), threading.Event()
    real = finetuning_module.finetune

    def held(*args, config, **kwargs):
        if config.steps:
            started.set()
            assert release.wait(JOB_TIMEOUT_S)
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(finetuning_module, "finetune", held)
    finetune_tab.start_finetune(service, normal_uploads(tmp_path), "gravel", steps=1, session=alice)
    assert started.wait(JOB_TIMEOUT_S)
    refused = finetune_tab.start_finetune(service, normal_uploads(tmp_path), "sand", steps=0, session=alice)[0]
    assert "The diffusion fine-tune of class 'gravel' is still" in refused  # one job per model at a time
    other = finetune_tab.start_finetune(service, normal_uploads(tmp_path), "sand", steps=0, session=Session())[0]
    assert "Class 'sand' is ready" in other  # another visitor's model is another model
    reset_model(service, alice)  # 'Drop my changes'
    release.set()
    job = alice.finetune_job
    assert job.wait(JOB_TIMEOUT_S) and job.state == DROPPED
    assert alice.model_dir is None and "gravel" not in service.classes(alice)
    assert sum(1 for _ in service.session_folders.root.iterdir()) == 1  # only the other visitor's model is left


def test_a_public_app_caps_fine_tunes(model_dir, tmp_path):
    service = gated(model_dir, tmp_path, public=True)
    uploads = normal_uploads(tmp_path)
    too_many = finetune_tab.start_finetune(service, uploads * 7, "gravel", steps=1, session=Session())[0]
    assert f"at most {PUBLIC_FINETUNE_LIMITS.images} images per fine-tune; got 28" in too_many
    too_long = finetune_tab.start_finetune(service, uploads, "gravel", steps=PUBLIC_FINETUNE_LIMITS.steps + 1,
                                           session=Session())[0]
    assert f"whole number from 0 (memory and threshold only) to {PUBLIC_FINETUNE_LIMITS.steps}" in too_long
    assert "This app has no admin password" in save(service, Session(), "washer", 0.3, password="guess")


def test_only_the_admin_password_changes_the_model_for_everyone(model_dir, tmp_path):
    service = gated(model_dir, tmp_path, admin_password="s3cret")
    alice, bob = Session(), Session()
    assert REJECTED in save(service, alice, "washer", 0.3, password="guess")
    assert not alice.has_changes and not service.has_user_changes
    assert "for everyone" in save(service, alice, "washer", 0.3, password="s3cret")
    assert threshold_seen(service, bob) == pytest.approx(0.3)
    assert Thresholds.load(service.store.user_dir / "thresholds.json").get("washer").value == pytest.approx(0.3)
    # the public views never show the server's folders
    assert str(tmp_path) not in service.status_markdown(bob) and "Model folder" not in service.model_card(bob)


def test_a_private_app_shares_changes_whatever_the_session(model_dir, tmp_path):
    service = gated(model_dir, tmp_path)  # no --public, no password
    assert str(service.store.user_dir) in save(service, Session(), "washer", 0.25)
    assert threshold_seen(service, Session()) == pytest.approx(0.25)


def test_an_image_of_no_known_class_gets_no_verdict_under_a_visitors_threshold(model_dir, tmp_path):
    service = gated(model_dir, tmp_path, public=True)
    alice = Session()
    save(service, alice, "washer", 0.2)
    guess = ClassMatch("washer", distance=50.0, runner_up="brick", runner_up_distance=60.0)  # far from every class
    result = judge(DetectionResult(None, None, 0.9, "washer", class_match=guess), service.view(alice).thresholds)
    assert result.threshold is result.is_anomalous is None
    verdict = detect_tab.verdict_html(Detection("", "Caption", None, result, 0.5, 2, 0))
    assert "UNKNOWN CLASS" in verdict and "matches no known class" in verdict
