"""The served app in a real browser: Playwright drives Debian's chromium against 127.0.0.1.

Uploads an image, paints a mask, runs two turns, downloads the PNG, undoes, trips a limit, and
saves screenshots under the test's tmp folder. Every request to anything but the app's own
address is blocked and recorded: the page must not need the network.
"""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000  # the CI machine is shared; edits on the tiny preset take seconds

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from editkit.app.actions import AppController, AppDefaults
    from editkit.app.server import launch
    from editkit.infer.engine import Engine
    from editkit.models import load_model

    engine = Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny")
    controller = AppController(engine, defaults=AppDefaults(steps=2),
                               output_dir=tmp_path_factory.mktemp("app-out"))
    port = _free_port()
    blocks = launch(controller, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}"
    blocks.close()


@pytest.fixture
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200}, accept_downloads=True)
        page.set_default_timeout(TIMEOUT_MS)
        page.outside_requests = []
        page.route(lambda url: not url.startswith(app_url),
                   lambda route: (page.outside_requests.append(route.request.url), route.abort()))
        page.goto(app_url)
        yield page
        browser.close()


def _history_count(page) -> int:
    return page.locator("#history img").count()


def _wait_history(page, n: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#history img').length === {n}", timeout=TIMEOUT_MS)


def _wait_status(page, text: str) -> None:
    page.locator("#status", has_text=text).wait_for(timeout=TIMEOUT_MS)


def _paint_stroke(page) -> None:
    """Drag the brush across the left part of the editor's canvas."""
    canvas = page.locator("#editor canvas").first
    canvas.wait_for()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x, y + box["height"] * 0.06 * i, steps=2)
    page.mouse.up()


def test_upload_paint_edit_twice_download_undo(page, tmp_path):
    source = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source)

    page.locator("#sources input[type=file]").set_input_files(str(source))
    _wait_history(page, 1)
    _wait_status(page, "Loaded 1 source image")

    _paint_stroke(page)
    page.locator("#instruction textarea").fill("make the sky red")
    page.locator("#run").click()
    _wait_history(page, 2)
    _wait_status(page, "Turn 1 done")
    _wait_status(page, "mask covers")  # the painted stroke reached the server as a mask
    page.locator("#result img").wait_for()

    page.locator("#instruction textarea").fill("把天空变成晚霞")
    page.locator("#run").click()
    _wait_history(page, 3)
    _wait_status(page, "Turn 2 done")
    page.wait_for_timeout(500)  # let the gallery finish painting before the screenshot
    page.screenshot(path=str(tmp_path / "after-two-turns.png"), full_page=True)

    with page.expect_download() as download_info:
        page.locator("#download").click()
    saved = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(saved)
    with Image.open(saved) as png:
        settings = json.loads(png.text["editkit"])
    assert settings["prompt"] == "把天空变成晚霞" and settings["turn"] == 2

    page.locator("#undo").click()
    _wait_history(page, 2)
    _wait_status(page, "back to turn 1")
    assert page.outside_requests == []


def test_limits_show_clear_messages(page, tmp_path):
    source = tmp_path / "photo.png"
    Image.new("RGB", (48, 48), (20, 120, 200)).save(source)
    page.locator("#run").click()
    page.get_by_text("upload one first").wait_for()

    page.locator("#sources input[type=file]").set_input_files(str(source))
    _wait_history(page, 1)
    page.locator("#instruction textarea").fill("   ")
    page.locator("#run").click()
    page.get_by_text("The instruction is empty").wait_for()
    page.screenshot(path=str(tmp_path / "empty-instruction.png"), full_page=True)
    assert _history_count(page) == 1
    assert page.outside_requests == []
