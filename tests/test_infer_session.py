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


def test_run_chat_drives_a_session_from_lines(engine, tmp_path):
    from editkit.infer.chat import run_chat

    rng = np.random.default_rng(1)
    session = EditSession(engine, [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))],
                          steps=2, seed=0)
    messages, bars = [], []

    def echo(text, err=False):
        messages.append((text, err))

    def new_progress():
        bars.append([])
        return lambda step, total: bars[-1].append((step, total))

    lines = ["make it blue\n", "/bogus arg\n", "   \n", "add a circle\n", "/undo\n", "/save\n",
             f"/save {tmp_path / 'copy'}\n", "add a square\n", "/quit\n", "never run\n"]
    folder = run_chat(session, lines, tmp_path / "chat", echo, new_progress=new_progress)

    assert folder == tmp_path / "chat"
    assert [t.prompt for t in session.history] == ["make it blue", "add a square"]  # nothing after /quit
    history = json.loads((folder / "history.json").read_text())
    assert [t["prompt"] for t in history["turns"]] == ["make it blue", "add a square"]
    copy = json.loads((tmp_path / "copy" / "history.json").read_text())  # /save DIR: the session as it was
    assert [t["prompt"] for t in copy["turns"]] == ["make it blue"]
    errors = [text for text, err in messages if err]
    assert len(errors) == 2 and "unknown command /bogus" in errors[0] and "/save needs a folder" in errors[1]
    assert all(text.startswith("editkit: error: ") for text in errors)
    assert "undone; 1 turn(s) left" in [text for text, err in messages if not err]
    assert messages[-1] == (f"session saved to {folder} (2 turn(s))", False)
    assert len(bars) == 3 and all(bar[-1] == (2, 2) for bar in bars)  # a fresh progress callback per turn


def test_run_chat_keeps_going_after_a_bad_undo(engine, tmp_path):
    from editkit.infer.chat import run_chat

    session = EditSession(engine, [Image.new("RGB", (64, 64))], steps=2)
    messages = []
    run_chat(session, ["/undo"], tmp_path / "chat", lambda text, err=False: messages.append((text, err)))
    assert "nothing to undo" in messages[0][0] and messages[0][1]
    assert (tmp_path / "chat" / "history.json").is_file()  # saved at the end, even with no turn
