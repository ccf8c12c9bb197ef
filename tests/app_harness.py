"""Test helpers for the app: a tiny random model folder, and the app running in a subprocess."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

TINY_CLASSES = ("brick", "washer")


def build_tiny_model(directory: str | Path, classes: tuple[str, ...] = TINY_CLASSES, resolution: int = 64) -> Path:
    """A random tiny-kl model (fast on a CPU) with thresholds and stored normal images for `classes`."""
    from vlmdiff import VLMDiffPipeline
    from vlmdiff.training.data import TrainingSet
    from vlmdiff.training.replay import save_replay

    torch.manual_seed(0)
    pipeline = VLMDiffPipeline.from_preset("tiny-kl", resolution=resolution, num_inference_steps=2)
    for name in classes:
        pipeline.thresholds.fit_quantile(name, [0.1, 0.2, 0.3])
    pipeline.config.classes = tuple(classes)
    directory = Path(directory)
    pipeline.save_pretrained(directory)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3 * len(classes), 3, resolution, resolution), dtype=np.uint8))
    names = [name for name in classes for _ in range(3)]
    save_replay(TrainingSet(images, [""] * len(names), names), directory)
    return directory


def payload(path: str | Path, orig_name: str | None = None) -> dict:
    """What Gradio hands a handler that runs with preprocess=False for an uploaded file: the file is
    copied into Gradio's upload folder first, as an upload is (a path that does not exist stays missing)."""
    from gradio.utils import get_upload_folder

    root = Path(get_upload_folder())
    root.mkdir(parents=True, exist_ok=True)
    stored = Path(tempfile.mkdtemp(dir=root)) / Path(path).name
    if Path(path).is_file():
        shutil.copyfile(path, stored)
    return {"path": str(stored), "orig_name": orig_name or Path(path).name, "meta": {"_type": "gradio.FileData"}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def app_process(app_file: str | Path, model: str | Path, workdir: str | Path, timeout: float = 180,
                options: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `python app_file --model model [options]` on a free local port, offline, with its files
    (log, Gradio uploads, user models) in `workdir`; yield (URL, process); stop it afterwards."""
    port = free_port()
    workdir = Path(workdir)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(workdir / "gradio"),
           "VLMDIFF_USER_MODELS": str(workdir / "user-models"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    log = open(workdir / "app.log", "w")
    process = subprocess.Popen(
        [sys.executable, str(app_file), "--model", str(model), "--server-name", "127.0.0.1",
         "--server-port", str(port), *options],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(app_file).parent,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with {process.returncode}:\n{(workdir / 'app.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"the app did not answer within {timeout} s:\n{(workdir / 'app.log').read_text()}")
            time.sleep(0.5)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextmanager
def running_app(app_file: str | Path, model: str | Path, workdir: str | Path, timeout: float = 180,
                options: tuple[str, ...] = ()) -> Iterator[str]:
    """`app_process`, yielding the URL only."""
    with app_process(app_file, model, workdir, timeout, options) as (url, _):
        yield url


# ---------------------------------------------------------------- browser
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def detect_in_browser(page, url: str, image: str | Path, strength: float | None, timeout_ms: int = 90_000) -> None:
    """Open the app, upload `image`, wait for the first result (at the model's strength); with `strength`,
    set it (number box + Tab fires the slider's release event) and wait for the result at that strength."""
    from playwright.sync_api import expect

    page.goto(url)
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    page.locator("#input-image img").first.wait_for(state="visible", timeout=timeout_ms)
    verdict = page.locator("#verdict")
    expect(verdict).to_contain_text("strength", timeout=timeout_ms)
    if strength is None:
        return
    number = page.locator("#strength input[data-testid=number-input]")
    number.fill(f"{strength:g}")
    number.press("Tab")
    expect(verdict).to_contain_text(f"strength {strength:.2f}", timeout=timeout_ms)


def screenshot(model: str | Path, image: str | Path, out: str | Path, strength: float | None = None) -> Path:
    """A screenshot of the Detect tab for the README: the app on `model`, `image` uploaded, at the model's
    default strength unless `strength` is given."""
    from playwright.sync_api import sync_playwright

    app_file = Path(__file__).resolve().parents[1] / "app.py"
    with tempfile.TemporaryDirectory() as workdir, running_app(app_file, model, workdir) as url:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            detect_in_browser(page, url, image, strength)
            page.locator("#verdict").scroll_into_view_if_needed()
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    return Path(out)


if __name__ == "__main__":  # python tests/app_harness.py MODEL IMAGE OUT.png
    import argparse

    parser = argparse.ArgumentParser(description="screenshot of the app's Detect tab (needs /usr/bin/chromium)")
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("out")
    parser.add_argument("--strength", type=float, help="denoising strength (default: the model's)")
    args = parser.parse_args()
    print(screenshot(args.model, args.image, args.out, args.strength))
