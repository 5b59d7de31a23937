"""The served app under load and on errors: a real server on 127.0.0.1 (tiny preset), reached over
HTTP by Gradio's own client, and `editkit serve`'s flag checks."""

import logging
import os
import re
import socket
import threading
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from editkit.app.server import checked_port
from editkit.cli import main

CLIENTS = 4
ROUNDS = 5
REQUEST_TIMEOUT_S = 120  # one request on a busy 2-core machine; a hung request fails the test
ERROR_ID = re.compile(r"^something went wrong \(error id ([0-9a-f]{8})\); the server log has the details$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from editkit.app.actions import AppController, AppDefaults
    from editkit.app.limits import AppLimits
    from editkit.app.server import launch
    from editkit.infer.engine import Engine
    from editkit.models import load_model

    folder = tmp_path_factory.mktemp("app")
    engine = Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny")
    controller = AppController(engine, limits=AppLimits(max_file_mb=1), defaults=AppDefaults(steps=2),
                               output_dir=folder / "out")
    port = _free_port()
    blocks = launch(controller, host="127.0.0.1", port=port, block=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", controller=controller, folder=folder)
    blocks.close()


def _client(app, downloads):
    from gradio_client import Client

    # the client's own HTTP timeouts (httpx's default 5 s reads) would fail a request that is merely slow
    return Client(app.url, verbose=False, download_files=str(downloads),
                  httpx_kwargs={"timeout": REQUEST_TIMEOUT_S})


def _upload(client, path):
    from gradio_client import handle_file

    return client.submit([handle_file(str(path))], api_name="/on_sources").result(timeout=REQUEST_TIMEOUT_S)


def _noise_png(path, side=320):
    """A PNG larger than two of the server's 64 KiB send chunks (noise does not compress)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def _pixels(path):
    with Image.open(path) as img:
        img.load()  # a cut-off file fails here
        return np.asarray(img.convert("RGB"))


def test_clients_uploading_the_same_file_at_once_all_get_complete_images(app):
    source = _noise_png(app.folder / "same.png")
    expected = _pixels(source)
    failures, shown = [], []

    def one_client(k):
        try:
            client = _client(app, app.folder / f"downloads-{k}")
        except Exception as err:  # noqa: BLE001
            failures.append(repr(err))
            return
        for _ in range(ROUNDS):
            try:
                editor, _result, history, _download, _status = _upload(client, source)
                shown.extend([editor["background"], editor["composite"], history[0]["image"]])
            except Exception as err:  # noqa: BLE001 - every failure is collected and reported
                failures.append(repr(err))

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(shown) == 3 * CLIENTS * ROUNDS
    for path in shown:
        assert np.array_equal(_pixels(path), expected)


def test_an_internal_error_shows_only_an_error_id_and_the_log_has_the_details(app, monkeypatch, caplog, tmp_path):
    from gradio_client.exceptions import AppError

    def broken(paths):
        raise RuntimeError("secret detail from /srv/internal/module.py")

    monkeypatch.setattr(app.controller, "start", broken)
    with caplog.at_level(logging.ERROR, logger="editkit.app.layout"), pytest.raises(AppError) as err:
        _upload(_client(app, tmp_path), _noise_png(tmp_path / "a.png", side=32))
    message = str(err.value)
    match = ERROR_ID.match(message)
    assert match, message
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert len(logged) == 1 and "secret detail" in str(logged[0].exc_info[1])


def test_gradio_internal_errors_are_not_shown_to_the_browser(app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = _client(app, tmp_path)
    with pytest.raises(AppError) as err:  # a single file where the page sends a list
        client.submit(handle_file(str(_noise_png(tmp_path / "a.png", side=32))),
                      api_name="/on_sources").result(timeout=REQUEST_TIMEOUT_S)
    assert "validation error" not in str(err.value) and "ListFiles" not in str(err.value)


def test_bad_uploads_get_one_short_line(app, tmp_path):
    from gradio_client.exceptions import AppError

    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(AppError) as err:
        _upload(_client(app, tmp_path), fake)
    assert str(err.value) == "notes.png: source image 1 is not a readable image; re-export it as PNG or JPEG"

    big = _noise_png(tmp_path / "big.png", side=900)  # ~2.4 MB, over the 1 MB limit
    with big.open("rb") as f:
        response = httpx.post(app.url + "gradio_api/upload", files={"files": f}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 413
    assert response.text == "File size exceeded maximum allowed size of 1048576 bytes."


def _serve_error(capsys, *flags) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "tiny", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_port_out_of_range_is_one_line(capsys, port):
    assert _serve_error(capsys, "--port", port) == (
        f"editkit: error: --port {port}: not a TCP port; choose 1 to 65535, or 0 for any free port")


def test_port_0_picks_a_free_port():
    port = checked_port("127.0.0.1", 0)
    assert 0 < port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # it is free


def test_serve_bogus_device_is_one_line(capsys):
    assert "--device 'bogus'" in _serve_error(capsys, "--device", "bogus")


def test_serve_cuda_without_cuda_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "--device cuda: CUDA is not available" in _serve_error(capsys, "--device", "cuda")
