"""The served app in a real browser: Playwright drives Debian's chromium against 127.0.0.1.

Uploads an image, paints a mask, runs two turns, downloads the PNG, undoes, trips a limit, and
saves screenshots under the test's tmp folder. Every request to anything but the app's own
address is blocked and recorded: the page must not need the network.
"""

import json
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

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


class GatedEngine:
    """The real engine, except that an edit pauses after its first step until `gate` is set.

    Lets a test look at a running edit (progress bar) and a waiting one (queue position)
    without depending on how fast the machine is.
    """

    def __init__(self, engine):
        self.engine = engine
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def edit(self, requests, progress=None, **kwargs):
        def paused(done, total):
            progress(done, total)
            if done == 1:
                self.gate.wait(TIMEOUT_MS / 1000)

        return self.engine.edit(requests, progress=paused, **kwargs)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from editkit.app.actions import AppController, AppDefaults
    from editkit.app.server import launch
    from editkit.infer.engine import Engine
    from editkit.models import load_model

    engine = GatedEngine(Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny"))
    controller = AppController(engine, defaults=AppDefaults(steps=2),
                               output_dir=tmp_path_factory.mktemp("app-out"))
    port = _free_port()
    blocks = launch(controller, host="127.0.0.1", port=port, block=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=engine)
    engine.gate.set()
    blocks.close()


@pytest.fixture
def new_page(app):
    """Opens pages on the app; each records (and blocks) requests that leave 127.0.0.1:port."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)

        def open_page():
            page = browser.new_page(viewport={"width": 1400, "height": 1200}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            page.outside_requests = []
            page.route(lambda url: not url.startswith(app.url),
                       lambda route: (page.outside_requests.append(route.request.url), route.abort()))
            page.goto(app.url)
            return page

        yield open_page
        browser.close()


@pytest.fixture
def page(new_page):
    return new_page()


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
    page.locator("#random-seed").click()
    page.wait_for_function("document.querySelector('#seed input').value !== '0'")
    page.screenshot(path=str(tmp_path / "empty-instruction.png"), full_page=True)
    assert _history_count(page) == 1
    assert page.outside_requests == []


def _upload_and_describe(page, source, instruction):
    page.locator("#sources input[type=file]").set_input_files(str(source))
    _wait_history(page, 1)
    page.locator("#instruction textarea").fill(instruction)


def test_one_edit_at_a_time_with_progress_and_queue_position(app, new_page, tmp_path):
    source = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 120, 20)).save(source)
    first, second = new_page(), new_page()
    _upload_and_describe(first, source, "make it blue")
    _upload_and_describe(second, source, "make it green")

    app.engine.gate.clear()  # edits pause after their first step
    try:
        first.locator("#run").click()
        first.locator("#result", has_text="Denoising").wait_for()  # the progress bar follows the steps
        first.locator("#result", has_text="1/2 steps").wait_for()
        second.locator("#run").click()
        second.locator("#result", has_text="queue: 1/1").wait_for()  # waiting behind the running edit
        first.screenshot(path=str(tmp_path / "running-edit.png"), full_page=True)
        second.screenshot(path=str(tmp_path / "queued-edit.png"), full_page=True)
        assert _history_count(second) == 1
    finally:
        app.engine.gate.set()
    _wait_history(first, 2)
    _wait_history(second, 2)
    assert first.outside_requests == [] and second.outside_requests == []
