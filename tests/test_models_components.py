"""`load_model(vae=..., text_encoder=...)` and --vae / --text-encoder: components from other folders."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.infer.engine import EditRequest, Engine
from editkit.infer.outputs import read_settings
from editkit.models import load_model, save_tiny
from tests.cli_run import run_cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny-preset folders of the same architecture with different weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny(root / "a", seed=0), save_tiny(root / "b", seed=1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def _load(spec, **kwargs):
    return load_model(spec, dtype="fp32", device="cpu", **kwargs)


def _edit(model, source) -> np.ndarray:
    request = EditRequest(prompt="make it blue", images=[Image.open(source).convert("RGB")], steps=2, seed=3)
    return np.asarray(Engine(model).edit([request])[0]).astype(int)


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_vae_and_text_encoder_come_from_the_other_folder(folders, source):
    a, b = folders
    own, other = _load(a), _load(b)
    mixed = _load(a, vae=b / "vae")
    assert _same_weights(mixed.vae, other.vae) and _same_weights(mixed.transformer, own.transformer)
    assert not _same_weights(own.vae, other.vae)
    assert np.abs(_edit(mixed, source) - _edit(own, source)).mean() > 1  # another VAE: another image
    both = _load(a, vae=b, text_encoder=b)  # a model folder holding vae/ and text_encoder/ will do
    assert _same_weights(both.text_encoder, other.text_encoder) and _same_weights(both.vae, other.vae)


def test_the_model_folder_need_not_hold_the_replaced_component(folders, tmp_path):
    a, b = folders
    shutil.copytree(a, tmp_path / "no-vae")
    shutil.rmtree(tmp_path / "no-vae" / "vae")
    with pytest.raises(UserError, match="incomplete model folder, missing vae/config.json"):
        _load(tmp_path / "no-vae")
    assert _same_weights(_load(tmp_path / "no-vae", vae=b / "vae").vae, _load(b).vae)


def test_a_vae_that_does_not_fit_is_one_line(folders, tmp_path):
    a, b = folders
    other = shutil.copytree(b / "vae", tmp_path / "wider-latents" / "vae")
    config = json.loads((other / "config.json").read_text())
    z_dim = config["z_dim"]
    (other / "config.json").write_text(json.dumps({**config, "z_dim": 2 * z_dim}))
    with pytest.raises(UserError, match=rf"^--vae .*wider-latents/vae: does not fit the model .*: its config.json "
                                        rf"has z_dim={2 * z_dim} \(the model's: {z_dim}\)"):
        _load(a, vae=tmp_path / "wider-latents")
    wide = shutil.copytree(b / "vae", tmp_path / "wide" / "vae")  # fits by its keys, but not its weights
    (wide / "config.json").write_text(json.dumps({**config, "base_dim": config["base_dim"] * 2}))
    with pytest.raises(UserError, match=r"\(with --vae .*wide/vae\): its weights do not fit its config.json"):
        _load(a, vae=wide)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "not a vae folder (needs config.json and *.safetensors)"),
    (lambda p: None, "not a vae folder"),  # absent
])
def test_a_bad_vae_folder_is_one_line(folders, tmp_path, make, message):
    make(tmp_path / "empty")
    with pytest.raises(UserError, match="^" + re.escape(f"--vae {tmp_path / 'empty'}: {message}")):
        _load(folders[0], vae=tmp_path / "empty")


def test_a_damaged_replacement_is_named(folders, tmp_path):
    vae = shutil.copytree(folders[1] / "vae", tmp_path / "vae")
    weights = next(vae.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"{weights}: damaged safetensors file"):
        _load(folders[0], vae=vae)


def test_the_tiny_spec_refuses_a_replacement():
    with pytest.raises(UserError, match="--text-encoder: needs a model folder; .*editkit model save-tiny"):
        _load("tiny", text_encoder="anything")


def test_edit_takes_vae_and_records_it(folders, source, tmp_path, capsys):
    a, b = folders
    out = tmp_path / "o.png"
    code, _, err = run_cli(capsys, "edit", "--model", a, "--vae", b, "--image", source, "--prompt", "x",
                           "--out", out, "--steps", "2", "--device", "cpu")
    assert code == 0, err
    assert read_settings(out)["vae"] == str(b)
    code, _, err = run_cli(capsys, "edit", "--model", a, "--text-encoder", tmp_path, "--image", source,
                           "--prompt", "x", "--out", out, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "--text-encoder" in err and "not a text_encoder folder" in err


def test_infer_refuses_to_resume_with_another_vae(folders, source, tmp_path, capsys):
    from editkit.data import write_manifest
    from editkit.data.records import EditRecord

    a, b = folders
    manifest = write_manifest([EditRecord(id="r", instruction="x", sources=[source])], tmp_path / "m.jsonl")
    args = ["infer", "--model", a, "--data", manifest, "--out", tmp_path / "out", "--steps", "2", "--device", "cpu"]
    assert run_cli(capsys, *args)[0] == 0
    code, _, err = run_cli(capsys, *args, "--vae", b)
    assert code == 2 and "components" in err and "--overwrite" in err


def test_training_and_cache_take_the_components_by_content(folders, tmp_path):
    from editkit.train.cache import build_cache
    from editkit.train.config import validate_config
    from editkit.train.edit_task import load_edit_model
    from editkit.train.trainer import run_fingerprint
    from tests.eval_fixtures import make_dataset

    a, b = folders
    manifest, _ = make_dataset(tmp_path / "data", n=2, size=32)
    raw = {"model": str(a), "data": {"train": [{"manifest": str(manifest)}]}, "loop": {"mixed_precision": "no"}}
    own, mixed = validate_config(raw), validate_config({**raw, "vae_folder": str(b), "text_encoder_folder": str(b)})
    model = load_edit_model(mixed, "cpu")
    other = _load(b)
    assert _same_weights(model.vae, other.vae) and _same_weights(model.text_encoder, other.text_encoder)
    assert run_fingerprint(own)["vae_folder"] is None and run_fingerprint(mixed)["vae_folder"] is not None

    args = dict(area=32 * 32, multiple=16, dtype="fp32", device="cpu", progress=False)
    build_cache(str(a), manifest, tmp_path / "cache", vae=str(b), **args)
    with pytest.raises(UserError, match="--overwrite"):  # the same cache folder with the model's own VAE
        build_cache(str(a), manifest, tmp_path / "cache", **args)
