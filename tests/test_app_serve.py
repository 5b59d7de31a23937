"""`editkit serve` as a user runs it: a subprocess on the tiny preset, reached over HTTP."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

STARTUP_S = 180  # model load + Gradio start on a busy 2-core machine
STOP_S = 300  # Gradio's shutdown after Ctrl-C on a busy machine; only a hang guard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    # A test run started in the background (`make test &`, nohup) inherits SIGINT as ignored, and
    # Python then installs no KeyboardInterrupt handler: the server would not see the test's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _editkit(*args, **kwargs):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "editkit", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint, **kwargs)


@pytest.mark.slow
def test_serve_tiny_answers_on_localhost_and_stops_on_ctrl_c():
    port = _free_port()
    proc = _editkit("serve", "--model", "tiny", "--port", str(port))
    try:
        deadline = time.monotonic() + STARTUP_S
        page = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    page = json.loads(response.read())
                break
            except OSError:
                time.sleep(1)
        assert page is not None, proc.stderr.read() if proc.poll() is not None else "server did not start"
        assert page["title"] == "editkit"
        assert {"sources", "editor", "instruction", "run", "history", "download"} <= {
            c["props"].get("elem_id") for c in page["components"]}
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=STOP_S)
    assert f"open http://127.0.0.1:{port}" in out
    assert "Traceback" not in err


def test_missing_lora_file_is_one_line_and_exit_2(tmp_path):
    proc = _editkit("serve", "--model", "tiny", "--lora", str(tmp_path / "missing.safetensors:0.5"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "missing.safetensors" in err and "not found" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
