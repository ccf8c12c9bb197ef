"""A public app under abuse stays bounded: password guessing slows down and tells nothing, one decode
budget for all requests, a bounded diffusion queue whose jobs stop when their visitor leaves, visitors'
models evicted least recently used first instead of a lockout, and nothing left on disk by sessions
Gradio forgets or by a stopped app."""
from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import JOB_TIMEOUT_S, NORMAL_EXAMPLE as NORMAL
from vlmdiff.app import DetectorService, finetune_tab, thresholds_tab
from vlmdiff.app import finetuning as finetuning_module
from vlmdiff.app import uploads as uploads_module
from vlmdiff.app.access import FREE_GUESSES, REJECTED, Access, PasswordGuard
from vlmdiff.app.calibration import Calibration
from vlmdiff.app.detect_tab import RecentDetections
from vlmdiff.app.finetune_jobs import DROPPED, QUEUE_FULL, DiffusionJob, JobCancelled
from vlmdiff.app.limits import FINETUNE_LIMITS, PUBLIC_FINETUNE_LIMITS
from vlmdiff.app.session import EVICTED, LOCK_NAME, SESSIONS_PREFIX, Session, SessionFolders, sweep_abandoned_roots
from app_harness import app_process, payload
from vlmdiff.app.uploads import DecodeBudget, Upload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request
ROOT = Path(__file__).resolve().parents[1]


def gated(model_dir: Path, tmp_path: Path, **access) -> DetectorService:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return DetectorService(copy, user_models_dir=tmp_path / "user-models", access=Access(**access))


def normal_uploads(tmp_path: Path, count: int = 4) -> list[dict]:
    base = Image.open(NORMAL).convert("RGB").resize((96, 96))
    paths = []
    for i in range(count):
        path = tmp_path / f"normal{i}.png"
        base.rotate(90 * i).save(path)
        paths.append(payload(path))
    return paths


# ---------------------------------------------------------------- the admin password
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_password_guesses_slow_down_after_five_failures_and_a_right_guess_then_waits_too():
    clock = Clock()
    guard = PasswordGuard(clock)
    assert not any(guard.check("s3cret", f"guess{i}", "10.0.0.1") for i in range(FREE_GUESSES))
    assert not guard.check("s3cret", "s3cret", "10.0.0.1")  # waiting out 1 s: not even compared
    assert guard.check("s3cret", "s3cret", "10.0.0.2")  # another client is not held up
    clock.now += 1.0
    assert not guard.check("s3cret", "wrong", "10.0.0.1")  # evaluated: the delay doubles to 2 s
    clock.now += 1.5
    assert not guard.check("s3cret", "s3cret", "10.0.0.1")
    clock.now += 0.5
    assert guard.check("s3cret", "s3cret", "10.0.0.1")  # and a right guess clears the count
    assert guard.check("s3cret", "s3cret", "10.0.0.1")
    evaluated, clock.now = 0, 5000.0
    for _ in range(60):  # 3 s of guessing, 20 a second: the free guesses, then at most one a second
        clock.now += 0.05
        before = dict(guard._failures)
        guard.check("s3cret", "nope", "10.0.0.3")
        evaluated += guard._failures != before
    assert evaluated <= FREE_GUESSES + 3


def test_a_wrong_and_a_right_password_get_the_same_reply_to_an_invalid_request(model_dir, tmp_path):
    service = gated(model_dir, tmp_path, admin_password="s3cret")
    for password in ("s3cret", "guess"):
        assert "Upload at least 4 normal images" in finetune_tab.start_finetune(service, [], "sand",
                                                                              password=password)[0]
        assert "Score calibration images first" in thresholds_tab.save(service, "washer", 0.3, "manual", None,
                                                                       password=password, session=Session())[0]
    uploads = normal_uploads(tmp_path)
    wrong = [finetune_tab.start_finetune(service, uploads, "sand", steps=0, password=f"guess{i}", session=Session(),
                                         client="attacker")[0] for i in range(FREE_GUESSES)]
    right = finetune_tab.start_finetune(service, uploads, "sand", steps=0, password="s3cret", session=Session(),
                                        client="attacker")[0]  # at once after five failures: refused unread
    assert len(set(wrong)) == 1 and REJECTED in right and right == wrong[0]
    assert "sand" not in service.classes()


def test_every_invalid_request_gets_the_same_reply_with_a_wrong_or_a_right_password(model_dir, tmp_path):
    service = gated(model_dir, tmp_path, admin_password="s3cret")
    uploads = normal_uploads(tmp_path)
    washer_threshold = service.thresholds.get("washer").value
    scored = Calibration("washer", np.array([0.2, 0.3, 0.4]), np.zeros(3, dtype=np.int64), "uploaded images")
    requests = {
        "threshold nan": lambda password, client: thresholds_tab.save(
            service, "washer", "nan", "manual", scored, password=password, session=Session(), client=client)[0],
        "threshold inf": lambda password, client: thresholds_tab.save(
            service, "washer", float("inf"), "manual", scored, password=password, session=Session(), client=client)[0],
        "known class, no update": lambda password, client: finetune_tab.start_finetune(
            service, uploads, "washer", steps=0, password=password, session=Session(), client=client)[0],
        "bad class name": lambda password, client: finetune_tab.start_finetune(
            service, uploads, "no/such class!", steps=0, password=password, session=Session(), client=client)[0],
    }
    for name, request in requests.items():
        right, wrong = request("s3cret", f"{name}-a"), request("guess", f"{name}-b")
        assert right == wrong and REJECTED not in right, name
    assert service.thresholds.get("washer").value == washer_threshold  # nothing was changed


def test_visitors_of_a_gated_app_get_the_public_caps_and_the_admin_the_full_ones(model_dir, tmp_path):
    from app import listens_beyond_localhost

    access = Access(admin_password="s3cret")
    assert access.finetune_limits() == PUBLIC_FINETUNE_LIMITS
    assert access.finetune_limits(for_everyone=True) == FINETUNE_LIMITS
    assert Access().finetune_limits() == FINETUNE_LIMITS  # a private app on localhost
    assert listens_beyond_localhost("0.0.0.0") and not listens_beyond_localhost("127.0.0.1")
    service = gated(model_dir, tmp_path, admin_password="s3cret")
    uploads = normal_uploads(tmp_path) * 7  # 28 images: over the public cap, under the full one
    refused = finetune_tab.start_finetune(service, uploads, "sand", steps=0, session=Session())[0]
    assert f"at most {PUBLIC_FINETUNE_LIMITS.images} images" in refused


# ---------------------------------------------------------------- decoding
def test_one_decode_budget_makes_huge_images_take_turns(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"big{i}.png")
        Image.new("RGB", (600, 500)).save(paths[-1])
    in_flight, peak, lock = [0], [0], threading.Lock()
    real = uploads_module.load_image

    def slow(path, max_side=None):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return real(path, max_side=max_side)

    monkeypatch.setattr(uploads_module, "load_image", slow)
    budget = DecodeBudget(megapixels=0.5)  # one 0.3-megapixel image at a time
    threads = [threading.Thread(target=budget.load, args=(Upload(path, path.name),)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 1
    assert DecodeBudget(megapixels=1).load(Upload(paths[0], "big0.png")).size == (600, 500)


def test_a_large_decode_hands_its_freed_memory_back(tmp_path, monkeypatch):
    releases = []
    monkeypatch.setattr(uploads_module, "release_freed_memory", lambda: releases.append(1))
    budget = DecodeBudget(megapixels=50)
    for side, name in ((500, "small.png"), (2100, "large.png")):  # 0.25 and 4.4 megapixels
        Image.new("RGB", (side, side)).save(tmp_path / name)
        budget.load(Upload(tmp_path / name, name))
    assert len(releases) == 1


def test_recent_detections_are_bounded_for_all_visitors_together():
    recent = RecentDetections(capacity=3)
    keys = [recent.add(object()) for _ in range(5)]
    assert [recent.get(key) is not None for key in keys] == [False, False, True, True, True]
    assert recent.get("not-a-key") is None and recent.get(None) is None and recent.add(None) is None


# ---------------------------------------------------------------- visitors' models and the diffusion queue
def test_a_full_app_evicts_the_least_recently_used_visitors_model_instead_of_locking_out(model_dir, tmp_path):
    service = gated(model_dir, tmp_path, public=True)
    service.session_folders.capacity = 2
    visitors = [Session() for _ in range(3)]
    for name, visitor in zip(("sand", "gravel"), visitors):
        assert "is ready" in finetune_tab.start_finetune(service, normal_uploads(tmp_path), name, steps=0,
                                                       session=visitor)[0]
    service.classes(visitors[0])  # the first visitor comes back: the second is now the least recent
    assert "is ready" in finetune_tab.start_finetune(service, normal_uploads(tmp_path), "clay", steps=0,
                                                   session=visitors[2])[0]
    assert visitors[0].model_dir.is_dir() and visitors[2].model_dir.is_dir()
    assert visitors[1].model_dir is None and visitors[1].notice == EVICTED
    assert EVICTED in service.status_markdown(visitors[1])
    assert service.session_folders.count() == 2


def test_a_session_gradio_forgets_leaves_no_model_and_cancels_its_job(model_dir, tmp_path, monkeypatch):
    service = gated(model_dir, tmp_path, public=True)
    visitor = Session()
    finetune_tab.start_finetune(service, normal_uploads(tmp_path), "sand", steps=0, session=visitor)
    folder = visitor.model_dir
    job = DiffusionJob("sand", 10, [], folder, visitor)
    job.report(0.1, "step 1")  # wanted: no error
    del visitor
    gc.collect()
    assert not folder.parent.exists() and service.session_folders.count() == 0
    assert not job.wanted
    with pytest.raises(JobCancelled):
        job.report(0.2, "step 2")


def test_dropping_changes_stops_a_running_diffusion_phase(model_dir, tmp_path, monkeypatch):
    service = gated(model_dir, tmp_path, public=True)
    visitor = Session()
    steps_run, dropped = [], threading.Event()
    real = finetuning_module.finetune

    def watched(*args, config, progress=None, **kwargs):
        def report(fraction, stage):
            if "step" in stage:
                steps_run.append(stage)
                if len(steps_run) == 2:
                    visitor.clear()  # 'Drop my changes' while it trains
            progress(fraction, stage)
        return real(*args, config=config, progress=report, **kwargs)

    monkeypatch.setattr(finetuning_module, "finetune", watched)
    finetune_tab.start_finetune(service, normal_uploads(tmp_path), "sand", steps=50, session=visitor)
    job = visitor.finetune_job
    assert job.wait(JOB_TIMEOUT_S) and job.state == DROPPED
    assert len(steps_run) <= 3  # stopped at the next step, not after 50
    assert service.session_folders.count() == 0


def test_the_diffusion_queue_is_bounded(model_dir, tmp_path, monkeypatch):
    service = gated(model_dir, tmp_path, public=True)
    release = threading.Event()
    monkeypatch.setattr(service.finetuning.worker, "_run",
                        lambda job: (release.wait(JOB_TIMEOUT_S), job.finish("finished", "")))
    visitors = [Session() for _ in range(service.finetuning.worker.capacity + 1)]
    try:
        replies = [finetune_tab.start_finetune(service, normal_uploads(tmp_path), "sand", steps=5, session=visitor)[0]
                   for visitor in visitors]
    finally:
        release.set()
    assert all("is ready" in reply for reply in replies[:-1])
    assert QUEUE_FULL.split(";")[0] in replies[-1] and visitors[-1].model_dir is None  # refused before any work


# ---------------------------------------------------------------- leftovers on disk
def test_the_folders_of_a_killed_app_are_swept_and_a_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    abandoned = tmp_path / f"{SESSIONS_PREFIX}dead"
    (abandoned / "x").mkdir(parents=True)
    (abandoned / LOCK_NAME).touch()
    live = SessionFolders()
    sweep_abandoned_roots()
    assert not abandoned.exists() and live.root.is_dir()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_public_app_leaves_no_session_folder(model_dir, tmp_path, monkeypatch, stop):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    with app_process(ROOT / "app.py", model_dir, tmp_path, options=("--public",)) as (_, process):
        assert len(list(temp.glob(f"{SESSIONS_PREFIX}*"))) == 1
        os.kill(process.pid, stop)
        process.wait(60)
    if stop == signal.SIGKILL:  # nothing can run then: the next app to start sweeps it
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        sweep_abandoned_roots()
    assert list(temp.glob(f"{SESSIONS_PREFIX}*")) == []


# ---------------------------------------------------------------- memory returned
FRAGMENTING_ALLOCATIONS = """
import numpy as np, sys
from vlmdiff.allocator import release_freed_memory
def rss_mb(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024
np.ones(16 << 20, np.uint8)  # a large buffer, freed at once: glibc raises its mmap threshold to 16 MB
before, arrays, small = rss_mb(), [], []
for _ in range(40):  # image-sized buffers with small allocations between them
    arrays.append(np.ones(6 << 20, np.uint8))
    small.append(bytearray(100_000))
peak = rss_mb()
del arrays
if sys.argv[1] == 'release':
    assert release_freed_memory()
print(peak - before, rss_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or os.uname().sysname != "Linux", reason="glibc on Linux")
def test_freed_image_buffers_go_back_to_the_system():
    def held_mb(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", FRAGMENTING_ALLOCATIONS, mode], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout.split()
        return int(out[0]), int(out[1])

    peak, held = held_mb("default")
    assert peak >= 200 and held >= peak // 2  # glibc alone keeps them
    peak, held = held_mb("release")
    assert peak >= 200 and held <= 30
