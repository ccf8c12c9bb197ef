"""End to end in a real headless browser: upload an example, move the strength slider, see the outputs.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install chromium`) and the playwright
python package; skipped otherwise. Set VLMDIFF_APP_SCREENSHOT=path to keep the screenshot.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vlmdiff.app.testing import build_tiny_model, running_app

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("chromium is not installed at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "brick_crack.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
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
    page.goto(app_url)
    page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#input-image img").first.wait_for(state="visible")
    verdict = page.locator("#verdict")
    sync_api.expect(verdict).to_contain_text("strength 1.00", timeout=TIMEOUT_MS)  # ran at the default strength

    number = page.locator("#strength input[data-testid=number-input]")
    number.fill("0.5")
    number.press("Tab")  # the number box losing focus fires the slider's release event
    sync_api.expect(verdict).to_contain_text("strength 0.50", timeout=TIMEOUT_MS)
    sync_api.expect(verdict).to_contain_text("score")

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
