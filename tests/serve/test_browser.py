"""A real browser (Debian chromium driven by playwright) uses the demo: upload, ask, read the answer, screenshot."""

import os

import numpy as np
import pytest
from PIL import Image

from learnpruner_ext.tiny import random_image as make_image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def browser_session(url, image_path, question, screenshot, timeout_ms=60_000):
    """Upload ``image_path``, ask ``question``; returns (answer, status) and writes ``screenshot``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url, timeout=timeout_ms)
            page.locator("#image_input input[type=file]").set_input_files(str(image_path), timeout=timeout_ms)
            page.locator("#image_input img").first.wait_for(timeout=timeout_ms)  # upload preview shown
            page.locator("#question textarea").fill(question)
            page.locator("#ask").click()
            answer = page.locator("#answer textarea")
            page.wait_for_function(
                "() => { const t = document.querySelector('#answer textarea'); return t && t.value.length > 0; }",
                timeout=timeout_ms,
            )
            page.locator("#overlay img").first.wait_for(timeout=timeout_ms)
            page.wait_for_timeout(500)
            status = page.locator("#status textarea").input_value()
            text = answer.input_value()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return text, status


def test_browser_upload_ask_screenshot(demo_server, tmp_path):
    if not os.path.exists(CHROMIUM):
        print(f"SKIP reason: {CHROMIUM} is missing (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    image = tmp_path / "upload.png"
    make_image(3, size=(96, 64)).save(image)
    shot = tmp_path / "page.png"
    answer, status = browser_session(demo_server[1], image, "What color is the background?", shot)
    assert answer.strip(), "no answer on the page"
    assert status.startswith("OK"), status
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.var() > 100, "screenshot is blank"
