"""End to end in a real headless browser: upload an example, move the strength slider, see the outputs.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install chromium`) and the playwright
python package; skipped otherwise. Set VLMDIFF_APP_SCREENSHOT=path to keep the screenshot.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vlmdiff.app.testing import CHROMIUM, CHROMIUM_ARGS, build_tiny_model, detect_in_browser, running_app

if not CHROMIUM.exists():
    pytest.skip(f"chromium is not installed at {CHROMIUM}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "brick_crack.png"
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
