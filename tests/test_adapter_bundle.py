"""Adapter bundles (LoRA + extra modules such as the STE), `--without`, `--rope-frames` (tiny model, CPU).

One tiny run trains a LoRA with the STE and `img_in` as extra modules for a few steps at a high
learning rate (so the STE's zero weights move); the other tests load its bundle.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.models import adapter_bundle as ab
from tests.cli_run import run_cli


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from editkit.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "data", n=4, size=64, seed=0, val_fraction=0.0,
                      test_fraction=0.0, progress=False)


@pytest.fixture(scope="module")
def cache_dir(synth, tmp_path_factory):
    from editkit.train.cache import build_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache("tiny", synth["train"], out, area=64 * 64, multiple=16, dtype="fp32", device="cpu", progress=False)
    return out


def _cfg(out, cache_dir, **train):
    from editkit.train.config import validate_config

    return validate_config({
        "model": "tiny", "output_dir": str(out), "seed": 0,
        "data": {"cache": [str(cache_dir)], "batch_size": 2, "area": 4096, "multiple": 16},
        "train": {"mode": "lora", "lora": {"rank": 4}, "extra_modules": ["ste", "img_in"], **train},
        "optim": {"lr": 5e-2, "schedule": "constant"},
        "loop": {"max_steps": 4, "checkpoint_every": 2, "tensorboard": False, "mixed_precision": "no"}})


@pytest.fixture(scope="module")
def run(cache_dir, tmp_path_factory):
    from editkit.train.trainer import train

    out = tmp_path_factory.mktemp("run") / "r"
    train(_cfg(out, cache_dir), progress=False)
    return out


@pytest.fixture(scope="module")
def bundle_path(run):
    return run / "final" / ab.BUNDLE_FILE


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "src.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def _tiny():
    from editkit.models import load_model

    return load_model("tiny", dtype="fp32", device="cpu")


def _predict(model, seed: int = 0, images: int = 1):
    g = torch.Generator().manual_seed(seed)
    picture = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    inputs = model.prepare(["make it red"], [[picture] * images], 64, 64)
    latents = torch.randn(1, 16, model.transformer.config.in_channels, generator=g)
    with torch.no_grad():
        return model.predict(latents, 0.5, inputs.prompt_embeds, inputs.prompt_mask, inputs.img_shapes,
                             inputs.cond_latents)


# ---- training and the file ----------------------------------------------------------------

def test_training_moves_the_ste_and_writes_the_bundle_beside_the_lora_layouts(run, bundle_path):
    from editkit.models import lora

    bundle = ab.load_bundle(bundle_path)
    assert set(bundle.extras) == {"ste", "img_in"}
    ste = bundle.extras["ste"]
    assert ste.kind == "family" and list(ste.tensors) == ["ste.weight"]
    assert ste.tensors["ste.weight"].shape == (4, 32)  # target + 3 condition slots, inner_dim of the tiny model
    assert ste.tensors["ste.weight"].abs().max() > 1e-3  # the zero weights learned
    assert ste.tensors["ste.weight"][0].abs().max() > 0 and ste.tensors["ste.weight"][1].abs().max() > 0
    assert not ste.tensors["ste.weight"][2:].any()  # no record has a second condition image: no gradient there
    assert set(bundle.extras["img_in"].tensors) == {"img_in.weight", "img_in.bias"}
    assert bundle.meta["family"] == "qwen-image-edit-2511" and bundle.meta["step"] == 4
    assert bundle.meta["rope_frames"] == "own" and len(bundle.meta["config_digest"]) == 64
    header = ab.read_meta(bundle_path)
    assert header["lora"]["r"] == 4 and header["lora"]["lora_alpha"] == 4.0 and header["lora"]["target_modules"]
    assert header["extra_modules"][0] == {"name": "ste", "kind": "family", "params": ["ste.weight"]}
    # the LoRA part is the LoRA of the usual exports; the extras are not in unfrozen_modules
    exported, _ = lora.load_lora(run / "final" / "pytorch_lora_weights.safetensors")
    ours, theirs = lora.parse(bundle.lora), lora.parse(exported)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[m].A, theirs[m].A) and torch.equal(ours[m].B, theirs[m].B) for m in ours)
    assert (run / "final" / "lora_comfyui.safetensors").is_file()
    assert not (run / "final" / "unfrozen_modules.safetensors").exists()
    assert (run / "checkpoints" / "step-000004" / "export" / ab.BUNDLE_FILE).is_file()


def test_the_bundle_round_trips_bit_exactly(bundle_path, tmp_path):
    first = ab.load_bundle(bundle_path)
    again = ab.load_bundle(ab.save_bundle(tmp_path / "b.safetensors", first))
    assert first.meta == again.meta and ab.read_meta(bundle_path) == ab.read_meta(tmp_path / "b.safetensors")
    assert first.lora.keys() == again.lora.keys()
    assert all(torch.equal(first.lora[k], again.lora[k]) and first.lora[k].dtype == again.lora[k].dtype
               for k in first.lora)
    assert first.extras.keys() == again.extras.keys()
    for name, extra in first.extras.items():
        assert extra.kind == again.extras[name].kind
        assert all(torch.equal(t, again.extras[name].tensors[p]) for p, t in extra.tensors.items())


def test_resume_restores_the_extra_modules_exactly(run, cache_dir, tmp_path):
    from editkit.train.checkpoint import load_checkpoint
    from editkit.train.trainer import train

    cut = _cfg(tmp_path / "cut", cache_dir)
    train(cut, stop_after=2, progress=False)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step-000002")["trainable"]
    half = ab.load_bundle(tmp_path / "cut" / "checkpoints" / "step-000002" / "export" / ab.BUNDLE_FILE)
    assert torch.equal(saved["editkit_ste.weight"], half.extras["ste"].tensors["ste.weight"])
    assert torch.equal(saved["img_in.weight"], half.extras["img_in"].tensors["img_in.weight"])
    train(cut, resume="latest", progress=False)
    resumed = ab.load_bundle(tmp_path / "cut" / "final" / ab.BUNDLE_FILE)
    whole = ab.load_bundle(run / "final" / ab.BUNDLE_FILE)
    for name in ("ste", "img_in"):
        for param, tensor in whole.extras[name].tensors.items():
            torch.testing.assert_close(resumed.extras[name].tensors[param], tensor, rtol=1e-5, atol=1e-6)


def test_extra_module_config_mistakes_are_one_line(cache_dir, tmp_path):
    from editkit.train.edit_task import EditTask

    with pytest.raises(UserError, match="extra_modules: needs mode lora"):
        _cfg(tmp_path / "a", cache_dir, mode="full")
    with pytest.raises(UserError, match="given twice"):
        _cfg(tmp_path / "a", cache_dir, extra_modules=["ste", "ste"])
    with pytest.raises(UserError, match="neither a module family qwen-image-edit-2511 offers"):
        EditTask(_cfg(tmp_path / "a", cache_dir, extra_modules=["stee"]), "cpu")
    with pytest.raises(UserError, match="which the LoRA adapts"):
        EditTask(_cfg(tmp_path / "a", cache_dir, extra_modules=["img_in"], lora={"rank": 4, "targets": "expanded"}),
                 "cpu")


# ---- the STE and the RoPE frames ----------------------------------------------------------

def test_an_untrained_ste_changes_nothing_and_a_trained_one_does():
    model = _tiny()
    before = _predict(model)
    ste = ab.family_extras(model.family)["ste"](model.transformer, "editkit_ste")
    torch.testing.assert_close(_predict(model), before, rtol=0, atol=1e-6)
    with torch.no_grad():
        ste.weight[1].normal_(generator=torch.Generator().manual_seed(1))  # the condition slot only
    changed = _predict(model)
    assert (changed - before).abs().max() > 1e-3
    ste.set_active(False)
    torch.testing.assert_close(_predict(model), before, rtol=0, atol=1e-6)
    ste.detach(model.transformer, "editkit_ste")
    assert not hasattr(model.transformer, "editkit_ste")
    ab.family_extras(model.family)["ste"](model.transformer, "editkit_ste")
    with pytest.raises(UserError, match="encodes 3 condition image"):
        _predict(model, images=4)


def test_rope_frames_shared_puts_conditions_at_the_target_frame_and_changes_the_prediction():
    from editkit.models import rope_frames

    model = _tiny()
    pos_embed = model.transformer.pos_embed
    shapes = [[(1, 4, 4), (1, 4, 4)]]
    own, _ = pos_embed(shapes, max_txt_seq_len=5, device=torch.device("cpu"))
    with rope_frames.applied(model.transformer, "shared"):
        shared, txt = pos_embed(shapes, max_txt_seq_len=5, device=torch.device("cpu"))
    assert torch.equal(shared[:16], own[:16])  # the target keeps frame 0
    assert torch.equal(shared[16:], own[:16]) and not torch.equal(own[16:], own[:16])
    assert torch.equal(txt, pos_embed(shapes, max_txt_seq_len=5, device=torch.device("cpu"))[1])
    before = _predict(model)
    after = _predict(model.with_rope_frames("shared"))
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(_predict(model), before, rtol=0, atol=0)  # the view left the model alone
    with pytest.raises(UserError, match="--rope-frames 'sideways'"):
        model.with_rope_frames("sideways")


# ---- loading: CLI, engine, app, manifests -------------------------------------------------

def _edit(capsys, out, source, *extra):
    return run_cli(capsys, "edit", "--model", "tiny", "--image", source, "--prompt", "make it red", "--out", out,
                   "--steps", "2", "--dtype", "fp32", "--device", "cpu", *extra)


def test_without_ste_differs_and_the_png_says_what_was_on(capsys, bundle_path, source, tmp_path):
    from editkit.infer.outputs import read_settings

    code, _, err = _edit(capsys, tmp_path / "with.png", source, "--adapter", bundle_path)
    assert code == 0, err
    code, _, err = _edit(capsys, tmp_path / "without.png", source, "--adapter", bundle_path, "--without", "ste")
    assert code == 0, err
    with_ste = np.asarray(Image.open(tmp_path / "with.png"), dtype=np.int16)
    without = np.asarray(Image.open(tmp_path / "without.png"), dtype=np.int16)
    assert np.abs(with_ste - without).max() > 0
    on, off = read_settings(tmp_path / "with.png")["adapter"], read_settings(tmp_path / "without.png")["adapter"]
    assert on["extras"] == ["ste", "img_in"] and on["without"] == []
    assert off["extras"] == ["img_in"] and off["without"] == ["ste"]
    assert on["path"] == str(bundle_path) and len(on["sha256"]) == 64


def test_bad_adapter_flags_are_one_line_with_exit_2(capsys, bundle_path, source, tmp_path):
    other = ab.load_bundle(bundle_path)
    other.meta["family"] = "qwen-image-edit-2509"
    other_path = ab.save_bundle(tmp_path / "other.safetensors", other)
    code, _, err = _edit(capsys, tmp_path / "x.png", source, "--adapter", other_path)
    assert code == 2 and "for family qwen-image-edit-2509, but the model is qwen-image-edit-2511" in err
    assert len(err.strip().splitlines()) == 1
    for flags, message in ((("--adapter", bundle_path, "--without", "stx"), "no extra module of that name"),
                           (("--without", "ste"), "give --adapter"),
                           (("--rope-frames", "mixed"), "--rope-frames 'mixed'"),
                           (("--adapter", bundle_path.parent / "pytorch_lora_weights.safetensors"),
                            "not an editkit adapter bundle"),
                           (("--adapter", source), "cannot read it")):
        code, _, err = _edit(capsys, tmp_path / "x.png", source, *flags)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not (tmp_path / "x.png").exists()


def test_engine_switches_extras_and_restores_the_base_weights(bundle_path):
    from editkit.infer.engine import Engine

    engine = Engine(_tiny(), model_name="tiny")
    base = engine.model.transformer.img_in.weight.detach().clone()
    engine.load_adapter(bundle_path)
    trained = ab.load_bundle(bundle_path).extras["img_in"].tensors["img_in.weight"]
    assert torch.equal(engine.model.transformer.img_in.weight, trained)
    assert "adapter" in engine.model.transformer.peft_config
    engine.set_adapter_extras(["ste"])
    assert torch.equal(engine.model.transformer.img_in.weight, base)
    assert engine.fingerprint()["adapter"]["extras"] == ["ste"]
    engine.load_loras([f"{bundle_path.parent / 'pytorch_lora_weights.safetensors'}:0.5"])  # beside the bundle's
    assert engine.model.transformer.active_adapters() == ["lora0", "adapter"]
    engine.unload_loras()  # --lora files go; the bundle's LoRA stays
    assert engine.model.transformer.active_adapters() == ["adapter"]
    engine.load_adapter(None)
    assert not hasattr(engine.model.transformer, "editkit_ste") and engine.adapter is None
    assert torch.equal(engine.model.transformer.img_in.weight, base)
    assert not getattr(engine.model.transformer, "peft_config", None)


def test_infer_manifest_and_fingerprint_record_the_adapter(capsys, bundle_path, synth, tmp_path):
    out = tmp_path / "pred"
    args = ("infer", "--model", "tiny", "--data", synth["train"], "--out", out, "--steps", "2", "--cfg", "1",
            "--dtype", "fp32", "--device", "cpu", "--adapter", bundle_path, "--rope-frames", "shared")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    manifest = json.loads((out / "cfg-1.0" / "run.json").read_text())
    text = json.dumps(manifest)
    assert str(bundle_path) in text and '"rope_frames": "shared"' in text
    code, _, err = run_cli(capsys, *args, "--without", "ste")
    assert code == 2 and "--overwrite" in err


def test_the_app_shows_a_switch_per_extra_and_uses_it(bundle_path, source, tmp_path):
    from editkit.app.actions import EditSettings
    from editkit.app.layout import build_blocks
    from editkit.app.server import build_controller
    from editkit.infer.outputs import read_settings

    controller = build_controller("tiny", device="cpu", dtype="fp32", output_dir=tmp_path,
                                  adapter=ab.AdapterChoice.parse(bundle_path, ["img_in"]))
    assert controller.extras == ["ste", "img_in"] and controller.extras_on == ["ste"]
    boxes = {b.elem_id: b for b in build_blocks(controller).blocks.values() if getattr(b, "elem_id", None)}
    assert boxes["adapter-extras"].value == ["ste"]
    session = controller.start([str(source)]).session
    view = controller.edit(session, EditSettings("make it red", steps=2, true_cfg_scale=1.0, extras=["img_in"]))
    assert read_settings(view.download_path)["adapter"]["extras"] == ["img_in"]
    with pytest.raises(UserError, match="not in the loaded bundle"):
        controller.edit(session, EditSettings("make it red", steps=2, true_cfg_scale=1.0, extras=["lora"]))
