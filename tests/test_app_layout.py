"""The page's wiring and the server's launch settings, without a model or a browser."""

import inspect
import os
import socket
from types import SimpleNamespace

import gradio as gr
import pytest

from editkit.app.actions import AppController, AppDefaults, LoraChoice
from editkit.app.commands import serve
from editkit.app.layout import build_blocks
from editkit.app.limits import AppLimits
from editkit.app.server import launch
from editkit.errors import UserError

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def _controller(tmp_path, loras=()):
    # The page only reads the engine's name; no model is needed to build it.
    engine = SimpleNamespace(model_name="stub", model=None, load_loras=lambda specs: None)
    return AppController(engine, limits=AppLimits(max_sources=2),
                         loras=list(loras), defaults=AppDefaults(steps=7, true_cfg_scale=2.5, seed=11),
                         output_dir=tmp_path)


def _components(blocks):
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_only_the_edit_waits_for_the_gpu_one_job_at_a_time(tmp_path):
    blocks = build_blocks(_controller(tmp_path))
    fns = list(blocks.fns.values())
    gpu = [f for f in fns if f.concurrency_id == "gpu"]
    assert {f.name for f in gpu} == {"on_edit"} and len(gpu) == 2  # the Edit button and Enter
    assert all(f.concurrency_limit == 1 for f in gpu)
    assert all(f.concurrency_limit is None for f in fns if f.concurrency_id != "gpu")
    assert all(f.queue is not False for f in gpu)  # queued: waiting users see their position


def test_page_starts_from_the_controller_defaults(tmp_path):
    choices = [LoraChoice("style", "style.safetensors", 0.7), LoraChoice("detail", "d.safetensors", 1.0)]
    c = _components(build_blocks(_controller(tmp_path, choices)))
    assert (c["steps"].value, c["cfg"].value, c["seed"].value) == (7, 2.5, 11)
    assert c["fusion"].value == "off"
    assert [c["lora-0"].value, c["lora-1"].value] == [0.7, 1.0]
    assert "style" in c["lora-0"].label and "detail" in c["lora-1"].label
    assert "up to 2" in c["sources"].label
    assert isinstance(c["editor"], gr.ImageEditor) and c["editor"].type == "pil"


def test_serve_binds_to_localhost_by_default():
    params = inspect.signature(serve).parameters
    assert params["host"].default == "127.0.0.1"
    assert params["port"].default == 7999


def test_busy_port_is_a_user_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"--port {port}: cannot listen there"):
            launch(_controller(tmp_path), host="127.0.0.1", port=port, block=False)
