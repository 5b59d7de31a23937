"""`editkit edit | chat | infer | lora` on the tiny preset."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from editkit.cli import app
from editkit.infer.outputs import read_settings
from editkit.models import lora as L

TINY = ["--model", "tiny", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def invoke(*args, input=None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_edit_writes_png_with_settings(tmp_path, image):
    out = tmp_path / "out" / "edit.png"
    invoke("edit", *TINY, "--image", image, "--prompt", "make it blue", "--out", out, "--seed", "5", "--cfg", "3")
    settings = read_settings(out)
    assert settings["prompt"] == "make it blue" and settings["seed"] == 5 and settings["true_cfg_scale"] == 3.0
    assert settings["model"] == "tiny" and Image.open(out).size == (64, 64)


def test_chat_reads_turns_from_stdin(tmp_path, image):
    folder = tmp_path / "session"
    result = invoke("chat", *TINY, "--image", image, "--save", folder,
                    input="make it blue\n/bogus\nadd a circle\n/undo\nadd a square\n/save "
                          f"{tmp_path / 'copy'}\n/quit\nnever run\n")
    history = json.loads((folder / "history.json").read_text())
    assert [t["prompt"] for t in history["turns"]] == ["make it blue", "add a square"]
    assert (tmp_path / "copy" / "turn-02.png").is_file()
    assert "unknown command /bogus" in result.output


def test_infer_over_a_manifest(tmp_path, image):
    from editkit.data import write_manifest
    from editkit.data.records import EditRecord

    manifest = tmp_path / "set.jsonl"
    write_manifest([EditRecord(id="one", instruction="blue", sources=[image]),
                    EditRecord(id="two", instruction="red", sources=[image])], manifest, "pairs")
    invoke("infer", *TINY, "--data", manifest, "--out", tmp_path / "preds", "--cfg", "1,4", "--batch-size", "2")
    assert sorted(p.relative_to(tmp_path / "preds").as_posix() for p in (tmp_path / "preds").rglob("*.png")) == [
        "cfg-1.0/one.png", "cfg-1.0/two.png", "cfg-4.0/one.png", "cfg-4.0/two.png"]
    result = invoke("infer", *TINY, "--data", manifest, "--out", tmp_path / "preds", "--cfg", "1,4")
    assert "wrote 0 image(s), skipped 4" in result.output


def test_lora_convert_and_inspect(tmp_path):
    modules = {"transformer_blocks.0.attn.to_q": L.LoraModule(torch.ones(2, 8), torch.ones(8, 2), torch.tensor(4.0))}
    src = L.save_lora(tmp_path / "in.safetensors", L.build(modules, "diffsynth"), "diffsynth", {"trigger": "blu"})
    invoke("lora", "convert", src, tmp_path / "comfy.safetensors", "--to", "comfyui")
    state_dict, header = L.load_lora(tmp_path / "comfy.safetensors")
    assert L.detect_layout(state_dict) == "comfyui" and header["trigger"] == "blu"
    assert float(state_dict["diffusion_model.transformer_blocks.0.attn.to_q.alpha"]) == 4.0
    result = invoke("lora", "inspect", tmp_path / "comfy.safetensors")
    assert "comfyui layout, 1 module(s)" in result.output and "2.0 x1" in result.output


@pytest.mark.parametrize("args, message", [
    (["edit", "--model", "tiny", "--image", "missing.png", "--prompt", "x", "--out", "o.png"],
     "missing.png: image file not found"),
    (["edit", "--model", "tiny", "--image", "{image}", "--prompt", "x", "--out", "o.png", "--lora", "{image}:strong"],
     "not a number"),
    (["lora", "convert", "{image}", "out.safetensors"], "cannot read the LoRA"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, image, args, message):
    args = [a.replace("{image}", str(image)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "editkit", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editkit: error: ") and message in lines[0]


@pytest.mark.slow
def test_infer_killed_with_sigkill_resumes(tmp_path, image):
    import time

    from editkit.data import write_manifest
    from editkit.data.records import EditRecord

    manifest = tmp_path / "set.jsonl"
    write_manifest([EditRecord(id=f"r{i}", instruction=f"edit {i}", sources=[image]) for i in range(6)],
                   manifest, "pairs")
    args = ["infer", *TINY, "--data", str(manifest), "--batch-size", "1", "--cfg", "4"]
    out = tmp_path / "killed" / "cfg-4.0"
    proc = subprocess.Popen([sys.executable, "-m", "editkit", *args, "--out", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("r*.png"))) < 2:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = sorted(p.name for p in out.glob("r*.png"))
    assert 2 <= len(done) < 6, done
    resumed = subprocess.run([sys.executable, "-m", "editkit", *args, "--out", str(tmp_path / "killed")],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {len(done)} finished" in resumed.stdout
    invoke(*args, "--out", tmp_path / "full")
    for i in range(6):
        a = np.asarray(Image.open(out / f"r{i}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "full" / "cfg-4.0" / f"r{i}.png")).astype(int)
        assert np.abs(a - b).max() <= 1
    assert not list(out.glob(".tmp-*"))
