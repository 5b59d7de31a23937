"""`editkit chat` takes the sampling options of `editkit edit`: --sampler (an LBM bridge chat),
--mask/--fusion/--feather (kept at every turn), --width/--height."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.cli_run import run_cli

TINY = ["--model", "tiny", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture()
def source(tmp_path):
    path = tmp_path / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def left_mask(tmp_path):
    """White (edit) on the left 16 columns of a 64x64 source."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :16] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    return path


def _chat(capsys, monkeypatch, *args, lines=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return run_cli(capsys, "chat", *TINY, *args)


def test_an_lbm_bridge_chat_with_a_mask_at_another_output_size(tmp_path, source, left_mask, capsys, monkeypatch):
    folder = tmp_path / "session"
    code, out, err = _chat(capsys, monkeypatch, "--image", source, "--save", folder, "--sampler", "bridge",
                           "--mask", left_mask, "--fusion", "pixel-mask", "--feather", "2",
                           "--width", "96", "--height", "64", lines="make it blue\nmake it red\n")
    assert code == 0, err
    turns = json.loads((folder / "history.json").read_text())["turns"]
    assert [t["prompt"] for t in turns] == ["make it blue", "make it red"]
    for turn in turns:
        settings = turn["settings"]
        assert settings["sampler"] == "bridge" and settings["fusion"] == "pixel-mask"
        assert (settings["width"], settings["height"]) == (96, 64)
    first = np.asarray(Image.open(folder / "turn-01.png").convert("RGB"))
    second = np.asarray(Image.open(folder / "turn-02.png").convert("RGB"))
    assert first.shape == second.shape == (64, 96, 3)
    # turn 2 edits turn 1's 96x64 image with the mask resized to it (left 24 columns): the background
    # far from the edit region is turn 1's, bit for bit
    assert np.array_equal(second[:, 40:], first[:, 40:])
    assert not np.array_equal(second[:, :24], first[:, :24])


@pytest.mark.parametrize("args, message", [
    (["--fusion", "pixel-mask"], "fusion 'pixel-mask' needs a mask"),
    (["--sampler", "euler"], "--sampler 'euler' is unknown"),
    (["--width", "100"], "--width 100: output sides must be multiples of 16"),
])
def test_bad_chat_options_are_one_line_and_exit_2(tmp_path, source, capsys, monkeypatch, args, message):
    code, _, err = _chat(capsys, monkeypatch, "--image", source, "--save", tmp_path / "s", *args, lines="x\n")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("editkit: error: ") and message in lines[0], err
    assert not (tmp_path / "s").exists()


def test_a_mask_without_fusion_is_refused_for_a_family_that_ignores_it(tmp_path, source, left_mask, capsys,
                                                                        monkeypatch):
    code, _, err = _chat(capsys, monkeypatch, "--image", source, "--mask", left_mask, "--save", tmp_path / "s")
    assert code == 2 and "uses a mask only for mask fusion" in err
