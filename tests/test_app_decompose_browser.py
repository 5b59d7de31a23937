"""The Decompose tab in a real browser (Playwright + Debian's chromium against 127.0.0.1), served with
the tiny Qwen-Image-Layered model: upload, choose layers, steps and seed, see the layers and the
recomposite, download the ZIP and the PSD; a bad request and an internal error show one short
line (never the internal text). Requests leaving the app's address are blocked and recorded."""

import io
import os
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _free_port

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]
SECRET = "internal detail /srv/secret/path"


class BreakableModel:
    """The tiny layered model; `decompose` raises an internal error while `broken` is set."""

    def __init__(self, model):
        self.model = model
        self.broken = False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def decompose(self, *args, **kwargs):
        if self.broken:
            raise RuntimeError(SECRET)
        return self.model.decompose(*args, **kwargs)


class EngineOf:
    """The real engine with the breakable model as the model the app serves."""

    def __init__(self, engine, model):
        self.engine, self.model = engine, model

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from editkit.app.actions import AppController, AppDefaults
    from editkit.app.server import launch
    from editkit.infer.engine import Engine
    from editkit.models import load_model

    loaded = load_model("tiny:qwen-image-layered", dtype="fp32", device="cpu")
    model = BreakableModel(loaded)
    controller = AppController(EngineOf(Engine(loaded, model_name="tiny:qwen-image-layered"), model),
                               defaults=AppDefaults(steps=2, true_cfg_scale=1.0),
                               output_dir=tmp_path_factory.mktemp("app-out"))
    port = _free_port()
    blocks = launch(controller, host="127.0.0.1", port=port, block=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", model=model)
    blocks.close()


@pytest.fixture
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200}, accept_downloads=True)
        page.set_default_timeout(TIMEOUT_MS)
        page.outside_requests = []
        page.route(lambda url: not url.startswith(app.url),
                   lambda route: (page.outside_requests.append(route.request.url), route.abort()))
        page.goto(app.url)
        yield page
        browser.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _download(page, elem_id: str, tmp_path):
    with page.expect_download() as info:
        page.locator(f"#{elem_id}").click()
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    return saved


def test_upload_decompose_see_layers_and_download(page, tmp_path):
    from psd_tools import PSDImage

    source = tmp_path / "poster.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(source)
    page.locator("#decompose-tab").wait_for()
    assert not page.locator("#run").is_visible()  # the edit controls are not shown for a decomposer

    page.locator("#decompose-image input[type=file]").set_input_files(str(source))
    page.locator("#decompose-prompt textarea").fill("a poster of coloured noise")
    _set_number(page, "decompose-layers", 3)
    _set_number(page, "decompose-seed", 7)
    page.locator("#decompose-run").click()
    page.locator("#decompose-status", has_text="3 layers (seed 7)").wait_for()
    page.wait_for_function("document.querySelectorAll('#decompose-gallery img').length === 3")
    page.locator("#decompose-recomposite img").wait_for()
    page.wait_for_timeout(500)  # let the gallery finish painting before the screenshot
    page.screenshot(path=str(tmp_path / "decomposed.png"), full_page=True)

    archive = _download(page, "decompose-zip", tmp_path)
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["layer_00.png", "layer_01.png", "layer_02.png", "layers.psd"]
        with Image.open(io.BytesIO(zf.read("layer_00.png"))) as layer:
            assert layer.mode == "RGBA"
    psd = PSDImage.open(_download(page, "decompose-psd", tmp_path))
    assert [layer.name for layer in psd] == ["layer_00", "layer_01", "layer_02"]
    assert page.outside_requests == []


def test_mistakes_and_internal_errors_are_one_short_line(app, page, tmp_path):
    page.locator("#decompose-run").click()
    page.get_by_text("No image: upload the image to decompose first").wait_for()

    source = tmp_path / "small.png"
    Image.new("RGB", (48, 48), (20, 120, 200)).save(source)
    page.locator("#decompose-image input[type=file]").set_input_files(str(source))
    page.locator("#decompose-prompt textarea").fill("a blue square")
    app.model.broken = True
    try:
        page.locator("#decompose-run").click()
        page.get_by_text("something went wrong (error id").wait_for()
    finally:
        app.model.broken = False
    assert SECRET not in page.content()
    page.screenshot(path=str(tmp_path / "internal-error.png"), full_page=True)
    assert page.outside_requests == []
