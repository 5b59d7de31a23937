"""Multi-turn sessions: each turn edits the last result; undo; save writes PNGs + history.json."""

import json

import numpy as np
import pytest
from PIL import Image

from editkit.errors import UserError
from editkit.infer.engine import Engine
from editkit.infer.outputs import read_settings
from editkit.infer.session import EditSession


@pytest.fixture(scope="module")
def engine():
    from editkit.models import load_model

    return Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny")


def test_turns_chain_undo_and_save(engine, tmp_path):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    session = EditSession(engine, [source], steps=2, seed=3)
    first = session.turn("make it blue")
    assert session.request("again").images[0] is first  # the next turn edits the last result
    second = session.turn("add a circle", true_cfg_scale=2.0)
    assert [t.prompt for t in session.history] == ["make it blue", "add a circle"]
    assert session.history[1].settings["true_cfg_scale"] == 2.0 and session.history[1].settings["turn"] == 2
    assert session.current is second
    assert session.undo() is first and len(session.history) == 1
    third = session.turn("add a square")

    folder = session.save(tmp_path / "chat")
    history = json.loads((folder / "history.json").read_text())
    assert [t["prompt"] for t in history["turns"]] == ["make it blue", "add a square"]
    assert read_settings(folder / "turn-02.png")["prompt"] == "add a square"
    assert np.array_equal(np.asarray(Image.open(folder / "turn-02.png")), np.asarray(third))
    assert np.array_equal(np.asarray(Image.open(folder / "source-0.png")), np.asarray(source))

    session.undo()
    session.save(folder)  # saving again replaces the folder: the undone turn's file is gone
    assert not (folder / "turn-02.png").exists() and (folder / "turn-01.png").exists()


def test_session_errors(engine, tmp_path):
    source = Image.new("RGB", (64, 64))
    with pytest.raises(UserError, match="source image"):
        EditSession(engine, [])
    with pytest.raises(UserError, match="unknown edit setting"):
        EditSession(engine, [source], cfg=4)
    session = EditSession(engine, [source])
    with pytest.raises(UserError, match="nothing to undo"):
        session.undo()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an editkit session folder"):
        session.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
