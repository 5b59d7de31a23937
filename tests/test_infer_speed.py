"""The speed switches (`editkit.infer.speed`): checked options, the Accel each becomes, and every
model-running command (edit, chat, infer, serve, cache) handing them to `accel.apply_accel`.

Wiring only: apply_accel is replaced by a recorder (compiling on the CPU takes minutes; the
switches themselves are tested in tests/test_bench_accel.py and on the GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from editkit.errors import UserError
from editkit.infer.speed import CUDA_SPEED, SpeedOptions
from tests.cli_run import run_cli

TINY = ["--model", "tiny", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def manifest(tmp_path, image):
    from editkit.data import write_manifest
    from editkit.data.records import EditRecord

    return write_manifest([EditRecord(id="one", instruction="blue", sources=[image])], tmp_path / "set.jsonl",
                          "pairs")


@pytest.fixture()
def applied(monkeypatch):
    """The (model, Accel) of every apply_accel call; each Accel must pass its own check."""
    from editkit.models import accel

    seen = []
    monkeypatch.setattr(accel, "apply_accel", lambda model, a=accel.Accel(): seen.append((model, a.check())) or model)
    return seen


# ----- the options ----------------------------------------------------------------------------

def test_lossless_is_compile_fused_split_and_the_attention_eager_only_the_attention():
    lossless = SpeedOptions(speed="lossless", attention="cudnn").to_accel()
    assert (lossless.compile, lossless.fused, lossless.split_lengths, lossless.attention) == (True, True, True, "cudnn")
    assert lossless.fp8 is None and lossless.cache_threshold is None and lossless.offload is None
    eager = SpeedOptions(speed="eager", attention="sdpa").to_accel()
    assert (eager.compile, eager.fused, eager.split_lengths, eager.attention) == (False, False, False, "sdpa")


def test_lossy_and_memory_switches_pass_through_and_offload_leaves_compile_out():
    accel = SpeedOptions(speed="lossless", fp8=True, cache_threshold=0.1, offload="group").to_accel()
    assert (accel.fp8, accel.cache_threshold, accel.offload) == ("matmul", 0.1, "group")
    assert accel.fused and not accel.compile
    off = SpeedOptions(fp8="off", offload="none")
    assert off.fp8 is None and off.offload is None
    assert SpeedOptions(speed="eager", fp8="weights", offload="model").to_accel().offload == "model"


def test_auto_speed_is_lossless_on_cuda_and_eager_on_the_cpu():
    assert SpeedOptions().resolved("cpu").speed == "eager"
    assert SpeedOptions().resolved("cuda:1").speed == CUDA_SPEED == "lossless"
    assert SpeedOptions(speed="eager").resolved("cuda").speed == "eager"
    with pytest.raises(ValueError):
        SpeedOptions().to_accel()  # "auto" must be resolved for a device first


def test_only_lossy_switches_that_are_on_are_fingerprinted():
    assert SpeedOptions(speed="lossless", attention="fa3", offload="group").lossy() == {}
    assert SpeedOptions(fp8="matmul", cache_threshold=0.2).lossy() == {"fp8": "matmul", "cache_threshold": 0.2}


@pytest.mark.parametrize("options, flag", [
    ({"speed": "fast"}, "--speed"), ({"attention": "xformers"}, "--attention"), ({"fp8": "int4"}, "--fp8"),
    ({"offload": "disk"}, "--offload"), ({"cache_threshold": 0.0}, "--cache-threshold"),
    ({"cache_threshold": float("nan")}, "--cache-threshold"), ({"cache_threshold": 2.0}, "--cache-threshold"),
])
def test_bad_values_are_one_line_naming_the_flag(options, flag):
    with pytest.raises(UserError) as err:
        SpeedOptions(**options)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


# ----- every command --------------------------------------------------------------------------

SWITCHES = ["--speed", "lossless", "--attention", "cudnn", "--fp8", "weights", "--offload", "group",
            "--cache-threshold", "0.05"]


def _expect_switches(accel):
    assert (accel.attention, accel.fp8, accel.offload, accel.cache_threshold) == ("cudnn", "weights", "group", 0.05)
    assert accel.fused and accel.split_lengths and not accel.compile  # offload leaves compile out


def test_edit_applies_the_switches_and_records_them(tmp_path, image, applied, capsys):
    out = tmp_path / "o.png"
    code, _, err = run_cli(capsys, "edit", *TINY, "--image", image, "--prompt", "blue", "--out", out, *SWITCHES)
    assert code == 0, err
    (model, accel), = applied
    _expect_switches(accel)
    assert model.transformer is not None  # the facade the engine runs, not a bare module
    from editkit.infer.outputs import read_settings

    speed = read_settings(out)["speed"]
    assert speed == {"speed": "lossless", "attention": "cudnn", "fp8": "weights", "offload": "group",
                     "cache_threshold": 0.05}


def test_the_cpu_default_changes_nothing_and_a_chosen_attention_is_applied(tmp_path, image, applied, capsys):
    """auto = eager on the CPU, where attention auto keeps the diffusers default: nothing to apply."""
    from editkit.infer.outputs import read_settings

    out = tmp_path / "o.png"
    assert run_cli(capsys, "edit", *TINY, "--image", image, "--prompt", "blue", "--out", out)[0] == 0
    assert applied == [] and read_settings(out)["speed"]["speed"] == "eager"
    assert run_cli(capsys, "edit", *TINY, "--image", image, "--prompt", "blue", "--out", out,
                   "--attention", "sdpa")[0] == 0
    (_, accel), = applied
    assert accel.attention == "sdpa" and not (accel.compile or accel.fused or accel.split_lengths)
    assert accel.fp8 is None and accel.offload is None and accel.cache_threshold is None


def test_chat_applies_the_switches(tmp_path, image, applied, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("make it blue\n"))
    code, _, err = run_cli(capsys, "chat", *TINY, "--image", image, "--save", tmp_path / "s", *SWITCHES)
    assert code == 0, err
    (_, accel), = applied
    _expect_switches(accel)
    history = json.loads((tmp_path / "s" / "history.json").read_text())
    assert "lossless" in json.dumps(history)  # the chat's outputs record the switches (Engine.run_settings)


def test_parallel_edit_outside_torchrun_is_one_line(tmp_path, image, capsys):
    code, _, err = run_cli(capsys, "edit", *TINY, "--image", image, "--prompt", "x", "--out", tmp_path / "o.png",
                           "--parallel", "cfg")
    assert code == 2 and "torchrun" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "edit", *TINY, "--image", image, "--prompt", "x", "--out", tmp_path / "o.png",
                           "--parallel", "tensor")
    assert code == 2 and "--parallel 'tensor'" in err


def test_infer_applies_the_switches_and_records_them_in_the_run_manifest(tmp_path, manifest, applied, capsys):
    out = tmp_path / "preds"
    code, _, err = run_cli(capsys, "infer", *TINY, "--data", manifest, "--out", out, "--cfg", "1", *SWITCHES)
    assert code == 0, err
    (_, accel), = applied
    _expect_switches(accel)
    config = json.loads((out / "cfg-1.0" / "run.json").read_text())["config"]
    assert config["speed"]["fp8"] == "weights" and config["speed"]["speed"] == "lossless"
    assert config["preset"] is None


def test_serve_applies_the_switches(applied, capsys, monkeypatch):
    from editkit.app import server

    launched = []
    monkeypatch.setattr(server, "launch", lambda controller, **kw: launched.append(controller))
    code, _, err = run_cli(capsys, "serve", "--model", "tiny", "--device", "cpu", "--port", "7999", *SWITCHES)
    assert code == 0, err
    (model, accel), = applied
    _expect_switches(accel)
    assert launched[0].engine.model is model


def test_cache_applies_only_offload(tmp_path, applied, capsys):
    from editkit.data.synth import synthesize

    synth = synthesize(tmp_path / "data", n=2, size=64, seed=3, val_fraction=0.0, test_fraction=0.0,
                       progress=False)
    out = tmp_path / "cache"
    code, _, err = run_cli(capsys, "cache", "--model", "tiny", "--data", synth["train"], "--out", out, "--area", 4096,
                           "--multiple", 16, "--dtype", "fp32", "--device", "cpu", "--offload", "group")
    assert code == 0, err
    (_, accel), = applied
    assert accel.offload == "group" and not (accel.compile or accel.fused or accel.split_lengths)
    assert accel.fp8 is None and accel.cache_threshold is None
    assert json.loads((out / "cache.json").read_text())["config"]["offload"] == "group"
    code, _, err = run_cli(capsys, "cache", "--model", "tiny", "--data", synth["train"], "--out", out, "--area", 4096,
                           "--multiple", 16, "--dtype", "fp32", "--device", "cpu", "--attention", "fa3")
    assert code == 2  # the transformer's switches are not offered where no transformer runs


@pytest.mark.parametrize("command, flags, message", [
    ("edit", ["--speed", "fast"], "--speed 'fast' is unknown"),
    ("chat", ["--cache-threshold", "0"], "--cache-threshold 0.0: give a threshold"),
    ("infer", ["--attention", "xformers"], "--attention 'xformers' is unknown"),
    ("serve", ["--fp8", "int4"], "--fp8 'int4' is unknown"),
    ("cache", ["--offload", "disk"], "--offload 'disk' is unknown"),
])
def test_bad_switches_are_one_line_and_exit_2_before_the_model_loads(tmp_path, image, manifest, command, flags,
                                                                     message, capsys, monkeypatch):
    from editkit.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    base = {"edit": ["--model", "tiny", "--image", image, "--prompt", "x", "--out", tmp_path / "o.png"],
            "chat": ["--model", "tiny", "--image", image],
            "infer": ["--model", "tiny", "--data", manifest, "--out", tmp_path / "p"],
            "serve": ["--model", "tiny"],
            "cache": ["--model", "tiny", "--data", manifest, "--out", tmp_path / "c"]}[command]
    code, out, err = run_cli(capsys, command, *base, *flags)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err


# ----- resumable infer runs -------------------------------------------------------------------

@pytest.mark.parametrize("first, second, differs", [
    (["--fp8", "weights"], ["--fp8", "matmul"], "fp8"),
    ([], ["--fp8", "matmul"], "fp8"),
    (["--cache-threshold", "0.05"], ["--cache-threshold", "0.1"], "cache_threshold"),
    (["--speed", "eager"], ["--speed", "lossless", "--attention", "sdpa", "--offload", "model"], None),
])
def test_an_infer_rerun_with_another_lossy_switch_is_refused(tmp_path, manifest, applied, capsys, first, second,
                                                             differs):
    out = tmp_path / "preds"
    args = ["infer", *TINY, "--data", manifest, "--out", out, "--cfg", "1"]
    code, _, err = run_cli(capsys, *args, *first)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, *args, *second)
    if differs:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"other settings or inputs (differs in: {differs})" in err
    else:
        assert code == 0, err
        assert "wrote 0 image(s), skipped 1" in stdout


def test_fingerprints_of_runs_without_new_switches_are_unchanged():
    """A folder made before the preset and speed switches existed resumes: they add no keys when off."""
    from editkit.infer.dataset_run import DatasetRunConfig

    plain = DatasetRunConfig().fingerprint(4.0)
    with_speed = DatasetRunConfig(speed=SpeedOptions(speed="lossless", attention="fa3").settings()).fingerprint(4.0)
    assert with_speed == plain and "preset" not in plain and "speed" not in plain
    assert DatasetRunConfig(preset="lightning-8step").fingerprint(4.0)["preset"] == "lightning-8step"


def test_first_block_cache_edits_run_and_do_not_leak_between_runs():
    """--cache-threshold: each sampling run enters the transformer's cache context (diffusers raises
    without one) and starts from an empty cache, so the same request twice gives the same image."""
    import numpy as np
    from PIL import Image

    from editkit.infer.engine import EditRequest, Engine
    from editkit.models import accel, load_model

    model = load_model("tiny", dtype="fp32", device="cpu")
    accel.enable_first_block_cache(model, 0.2)
    engine = Engine(model, model_name="tiny")
    source = Image.new("RGB", (64, 64), (30, 90, 200))
    first = engine.edit([EditRequest("make it red", [source], steps=3, seed=1)])[0]
    wide = engine.edit([EditRequest("make it red", [Image.new("RGB", (96, 32))], steps=3, seed=1)])[0]
    again = engine.edit([EditRequest("make it red", [source], steps=3, seed=1)])[0]
    assert wide.size == (96, 32)
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_auto_speed_for_one_edit_on_cuda_is_eager():
    """Compiling does not pay for a single image (measured; editkit.infer.speed.CUDA_SPEED)."""
    assert SpeedOptions().resolved("cuda", single_edit=True).speed == "eager"
    assert SpeedOptions().resolved("cuda").speed == CUDA_SPEED == "lossless"
    assert SpeedOptions(speed="lossless").resolved("cuda", single_edit=True).speed == "lossless"
