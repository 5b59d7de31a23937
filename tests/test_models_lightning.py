"""Lightning presets (`editkit.models.lightning`): the sampler's sigmas equal those of the reference
scheduler config, the preset sets steps and CFG, and a Lightning LoRA is detected or a mismatch
refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.models import lightning
from editkit.models import lora as L
from tests.cli_run import run_cli

REFERENCE = {  # lightx2v's diffusers example for the Qwen-Image(-Edit) Lightning LoRAs
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
TOKENS_1024 = (1024 // 16) ** 2  # packed latent tokens of a 1024x1024 target


def _reference_sigmas(steps: int, tokens: int) -> torch.Tensor:
    """The sigmas of QwenImageEditPlusPipeline given `FlowMatchEulerDiscreteScheduler.from_config(REFERENCE)`."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(REFERENCE)
    mu = calculate_shift(tokens, REFERENCE["base_image_seq_len"], REFERENCE["max_image_seq_len"],
                         REFERENCE["base_shift"], REFERENCE["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


@pytest.fixture(scope="module")
def tiny():
    from editkit.models import load_model

    return load_model("tiny", dtype="fp32", device="cpu")


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def _lora(path, metadata=None):
    """A LoRA for the tiny transformer that changes nothing (B = 0)."""
    modules = {"transformer_blocks.0.attn.to_q": L.LoraModule(torch.ones(2, 32), torch.zeros(32, 2))}
    return L.save_lora(path, L.build(modules, "peft"), "peft", metadata or {})


@pytest.mark.parametrize("name, steps", [("lightning-8step", 8), ("lightning-4step", 4)])
def test_the_sampler_uses_the_reference_sigmas_with_the_preset(tiny, name, steps):
    from editkit.infer.sampler import make_scheduler

    preset = lightning.PRESETS[name]
    assert (preset.steps, preset.true_cfg_scale) == (steps, 1.0)
    view = tiny.with_scheduler(preset.scheduler)
    got = make_scheduler(view, preset.steps, TOKENS_1024).sigmas
    want = _reference_sigmas(steps, TOKENS_1024)
    assert got.shape == (steps + 1,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    default = make_scheduler(tiny, preset.steps, TOKENS_1024).sigmas  # the family's own schedule differs
    assert (default - want).abs().max() > 0.01
    assert tiny.scheduler.config["shift_terminal"] == 0.02  # the view did not touch the model it came from
    assert view.transformer is tiny.transformer


def test_edit_with_a_preset_samples_its_steps_without_cfg_on_its_schedule(tmp_path, image, capsys, monkeypatch):
    from editkit.infer import sampler
    from editkit.infer.outputs import read_settings

    used = []
    original = sampler.make_scheduler

    def recording(model, steps, seq_len):
        scheduler = original(model, steps, seq_len)
        used.append((steps, seq_len, scheduler.sigmas.clone()))
        return scheduler

    monkeypatch.setattr(sampler, "make_scheduler", recording)
    out = tmp_path / "o.png"
    code, _, err = run_cli(capsys, "edit", "--model", "tiny", "--dtype", "fp32", "--device", "cpu", "--image", image,
                           "--prompt", "blue", "--out", out, "--preset", "lightning-4step")
    assert code == 0, err
    (steps, seq_len, sigmas), = used
    assert steps == 4
    torch.testing.assert_close(sigmas, _reference_sigmas(4, seq_len), rtol=0, atol=1e-6)
    settings = read_settings(out)
    assert (settings["steps"], settings["true_cfg_scale"], settings["preset"]) == (4, 1.0, "lightning-4step")
    code, _, err = run_cli(capsys, "edit", "--model", "tiny", "--dtype", "fp32", "--device", "cpu", "--image", image,
                           "--prompt", "blue", "--out", out, "--preset", "lightning-4step", "--steps", "3")
    assert code == 0, err
    assert read_settings(out)["steps"] == 3 and used[-1][0] == 3  # a given --steps wins over the preset's


@pytest.mark.parametrize("name, metadata, steps", [
    ("Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors", None, 8),
    ("Qwen-Image-Edit-2511-Lightning-4steps-V1.0-fp32.safetensors", None, 4),
    ("fast.safetensors", {"description": "Qwen-Image-Edit Lightning 4 steps distillation"}, 4),
    ("style.safetensors", {"trigger": "lightning bolt"}, None),
])
def test_lightning_step_counts_come_from_the_name_or_the_metadata(tmp_path, name, metadata, steps):
    assert lightning.lightning_steps(_lora(tmp_path / name, metadata)) == steps


def test_auto_detects_the_preset_from_a_lora_and_says_so(tmp_path, image, capsys):
    from editkit.infer.outputs import read_settings

    path = _lora(tmp_path / "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors")
    preset, note = lightning.resolve_preset("auto", [path])
    assert preset is lightning.PRESETS["lightning-8step"] and "--preset none" in note
    assert lightning.resolve_preset("none", [path]) == (None, None)
    assert lightning.resolve_preset("auto", [path], sampler="bridge") == (None, None)
    assert lightning.resolve_preset("auto", [_lora(tmp_path / "style.safetensors")]) == (None, None)
    out = tmp_path / "o.png"
    code, _, err = run_cli(capsys, "edit", "--model", "tiny", "--dtype", "fp32", "--device", "cpu", "--image", image,
                           "--prompt", "blue", "--out", out, "--lora", path)
    assert code == 0, err
    assert "using --preset lightning-8step" in err
    settings = read_settings(out)
    assert (settings["steps"], settings["true_cfg_scale"], settings["preset"]) == (8, 1.0, "lightning-8step")


def test_a_preset_for_another_step_count_than_the_lora_is_refused(tmp_path, image, capsys):
    path = _lora(tmp_path / "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors")
    code, _, err = run_cli(capsys, "edit", "--model", "tiny", "--image", image, "--prompt", "blue",
                           "--out", tmp_path / "o.png", "--lora", path, "--preset", "lightning-8step")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Lightning 4-step LoRA; use --preset lightning-4step" in err
    with pytest.raises(UserError, match="different step counts"):
        lightning.resolve_preset("auto", [path, _lora(tmp_path / "b-lightning-8steps.safetensors")])
    with pytest.raises(UserError, match="presets are for the flow sampler"):
        lightning.resolve_preset("lightning-4step", [], sampler="bridge")
    with pytest.raises(UserError, match="--preset 'turbo' is unknown"):
        lightning.resolve_preset("turbo")


def test_infer_with_a_preset_fingerprints_it(tmp_path, image, capsys):
    import json

    from editkit.data import write_manifest
    from editkit.data.records import EditRecord

    manifest = write_manifest([EditRecord(id="one", instruction="blue", sources=[image])], tmp_path / "m.jsonl",
                              "pairs")
    args = ["infer", "--model", "tiny", "--dtype", "fp32", "--device", "cpu", "--data", manifest,
            "--out", tmp_path / "p"]
    code, _, err = run_cli(capsys, *args, "--preset", "lightning-4step")
    assert code == 0, err
    fingerprint = json.loads((tmp_path / "p" / "cfg-1.0" / "fingerprint.json").read_text())["inputs"]
    assert (fingerprint["preset"], fingerprint["steps"], fingerprint["true_cfg_scale"]) == ("lightning-4step", 4, 1.0)
    code, _, err = run_cli(capsys, *args, "--cfg", "1", "--steps", "4")  # same steps and CFG, other schedule
    assert code == 2 and "differs in: preset" in err


def test_serve_with_a_preset_starts_the_page_at_its_steps_and_samples_on_its_schedule():
    from editkit.app.server import build_controller

    controller = build_controller("tiny", device="cpu", preset="lightning-8step")
    assert (controller.defaults.steps, controller.defaults.true_cfg_scale) == (8, 1.0)
    assert controller.engine.model.scheduler.config["max_shift"] == pytest.approx(math.log(3))
    assert controller.engine.model.scheduler.config["shift_terminal"] is None
