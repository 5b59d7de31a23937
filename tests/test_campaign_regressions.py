"""Regressions for what bench/reliability's full campaign (n 20) found: each was a traceback."""

import json

import numpy as np
import pytest

from editkit.errors import UserError


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from editkit.models import save_tiny

    return save_tiny(tmp_path_factory.mktemp("m") / "tiny")


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "model")


def test_a_header_that_names_other_tensors_is_one_line(tiny_folder, tmp_path):
    """A flipped byte in a safetensors header can keep it parseable but rename a tensor: the
    loader left that weight on the meta device and the move to the CPU raised NotImplementedError."""
    from safetensors.torch import load_file, save_file

    from editkit.models import load_model

    model = _copy(tiny_folder, tmp_path)
    path = next((model / "vae").glob("*.safetensors"))
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name[:-1] + "X"] = tensors.pop(name)
    save_file(tensors, path)
    with pytest.raises(UserError, match=r"vae: its weights lack .*re-download"):
        load_model(model, dtype="fp32", device="cpu")


def test_a_config_that_asks_for_other_shapes_is_one_line(tiny_folder, tmp_path):
    from editkit.models import load_model

    model = _copy(tiny_folder, tmp_path)
    config = json.loads((model / "transformer" / "config.json").read_text())
    config["attention_head_dim"] = config["attention_head_dim"] * 2
    (model / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="its weights do not fit its config.json"):
        load_model(model, dtype="fp32", device="cpu")


def test_a_training_config_that_is_not_utf8_is_one_line(tmp_path):
    from editkit.train.config import load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: tiny\noutput_dir: r\xd0\xff\n")
    with pytest.raises(UserError, match=r"c.yaml: not UTF-8 text"):
        load_config(path)


def test_a_damaged_cached_feature_vector_is_computed_again(tmp_path):
    """A flipped byte in an eval cache entry's base64 vector raised binascii.Error."""
    from editkit.data.records import EditRecord
    from editkit.eval.cache import Entry, encode_vector, load_entry, sample_stamp

    for name in ("s.png", "t.png", "p.png"):
        from PIL import Image

        Image.new("RGB", (8, 8)).save(tmp_path / name)
    record = EditRecord(id="a", instruction="x", sources=[tmp_path / "s.png"], target=tmp_path / "t.png")
    pred = tmp_path / "p.png"
    entry = Entry(sample_stamp(record, pred), {"mae": 0.5}, {"effnet": encode_vector(np.ones(4))})
    entry.save(tmp_path / "e.json")
    assert load_entry(tmp_path / "e.json", record, pred).feature("effnet") is not None
    data = json.loads((tmp_path / "e.json").read_text())
    data["features"]["effnet"] = data["features"]["effnet"][:-3]  # no longer whole base64
    (tmp_path / "e.json").write_text(json.dumps(data))
    assert load_entry(tmp_path / "e.json", record, pred).feature("effnet") is None
