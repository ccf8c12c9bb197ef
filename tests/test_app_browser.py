"""End to end in a real headless browser: upload an example, move the strength slider, see the outputs;
fine-tune a class and watch its diffusion phase finish.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install chromium`) and the playwright
python package; skipped otherwise. Set VLMDIFF_APP_SCREENSHOT=path to keep the screenshot.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from app_harness import CHROMIUM, CHROMIUM_ARGS, build_tiny_model, detect_in_browser, running_app

if not CHROMIUM.exists():
    pytest.skip(f"chromium is not installed at {CHROMIUM}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "brick_crack.png"
NORMAL = ROOT / "assets" / "examples" / "brick_good.png"
TIMEOUT_MS = 90_000  # model runs take seconds on a busy 2-core machine


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("app_browser")
    model = build_tiny_model(workdir / "model")
    with running_app(ROOT / "app.py", model, workdir) as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def test_upload_move_strength_and_see_outputs(page, app_url, tmp_path):
    # the tiny model's default strength is 1.0: the result at 0.5 proves the slider's release ran the model
    detect_in_browser(page, app_url, EXAMPLE, strength=0.5, timeout_ms=TIMEOUT_MS)
    sync_api.expect(page.locator("#verdict")).to_contain_text("score")
    assert "image shows" in page.locator("#caption textarea").input_value()
    for elem_id in ("reconstruction", "overlay"):
        picture = page.locator(f"#{elem_id} img").first
        sync_api.expect(picture).to_be_visible()
        assert picture.evaluate("img => img.complete && img.naturalWidth") > 0, elem_id
    screenshot = tmp_path / "app.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("VLMDIFF_APP_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["VLMDIFF_APP_SCREENSHOT"])


def test_fine_tune_shows_the_quick_phase_then_the_diffusion_progress(page, app_url, tmp_path):
    from PIL import Image

    images = []
    for i in range(4):
        Image.open(NORMAL).rotate(90 * i).save(tmp_path / f"normal{i}.png")
        images.append(str(tmp_path / f"normal{i}.png"))
    page.goto(app_url)
    page.get_by_role("tab", name="Fine-tune").click()
    page.locator("#finetune-files input[type=file]").set_input_files(images)
    sync_api.expect(page.locator("#finetune-files")).to_contain_text("normal3", timeout=TIMEOUT_MS)  # uploaded
    page.locator("#finetune-class").locator("textarea, input").first.fill("gravel")
    steps = page.locator("#finetune-steps input[data-testid=number-input]")
    steps.fill("1")
    steps.press("Tab")
    page.locator("#finetune-start").click()
    summary, progress = page.locator("#finetune-summary"), page.locator("#finetune-progress")
    sync_api.expect(summary).to_contain_text("Class 'gravel' is ready", timeout=TIMEOUT_MS)
    # the timer refreshes the progress until the diffusion phase has finished; no click needed
    sync_api.expect(progress).to_contain_text("(1 step): finished", timeout=TIMEOUT_MS)

    # the fine-tune changed the model: Reset asks first, says what it drops, and 'Keep them' keeps them
    page.goto(app_url)
    page.locator("#reset-model").click()
    confirm = page.locator("#reset-confirm")
    sync_api.expect(confirm).to_contain_text("classes you fine-tuned (gravel)", timeout=TIMEOUT_MS)
    page.locator("#reset-no").click()
    sync_api.expect(confirm).to_be_hidden(timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("#model-status")).to_contain_text("gravel")


def test_clicking_an_example_detects_it(page, app_url):
    # an example is not an upload: Gradio copies it into its upload folder, the only one the app reads from
    page.goto(app_url)
    page.locator(".gallery-item, button.gallery-item, [data-testid='gallery-item']").first.click()
    verdict = page.locator("#verdict")
    sync_api.expect(verdict).to_contain_text("score", timeout=TIMEOUT_MS)
    assert "not uploaded" not in verdict.inner_text()
