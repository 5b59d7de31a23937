"""Feature metrics from HF-format folders: tiny random models of the real classes, saved and loaded
through editkit; preprocessing parity with transformers' PIL image processors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from editkit.errors import UserError
from editkit.eval.metrics import FEATURE_METRICS
from editkit.eval.metrics import preprocess as pp
from editkit.eval.sample import Sample

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _clip(folder):
    cfg = transformers.CLIPConfig(text_config=dict(TEXT, vocab_size=64, max_position_embeddings=32, bos_token_id=0,
                                                   eos_token_id=1, pad_token_id=1),
                                  vision_config=VISION, projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


def _dino(folder):
    transformers.ViTModel(transformers.ViTConfig(**VISION), add_pooling_layer=False).save_pretrained(folder)


def _dinov3(folder):
    transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**VISION, num_register_tokens=0)).save_pretrained(folder)


def _siglip2(folder):
    vision = dict(VISION, num_patches=16)
    vision.pop("image_size")
    cfg = transformers.Siglip2Config(text_config=dict(TEXT, vocab_size=64, bos_token_id=0, eos_token_id=1,
                                                      pad_token_id=1), vision_config=vision)
    transformers.Siglip2Model(cfg).save_pretrained(folder)


BUILDERS = {"clip": _clip, "dino": _dino, "dinov3": _dinov3, "siglip2": _siglip2}


def _images(n, seed=0, shape=(40, 56, 3)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random(shape) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("weights")
    for name, build in BUILDERS.items():
        build(root / name)
    return root


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tiny_model_loads_and_scores(weights, name):
    metric = FEATURE_METRICS[name]()
    metric.load(weights / name, torch.device("cpu"))
    a, b = _images(2)
    samples = [Sample("same", pred=a, target=a.copy(), text="paint it red"),
               Sample("other", pred=a, target=b, text="paint it red"),
               Sample("no-target", pred=b, target=None, text="x")]
    rows = metric.compute(samples)
    column = metric.columns[0]
    assert rows[0][column] == pytest.approx(1.0, abs=1e-5)
    assert rows[1][column] < 0.9999
    assert np.isnan(rows[2][column])
    if name == "clip":
        assert all(-1.0 <= r["clip_t"] <= 1.0 for r in rows)
        assert rows[0]["clip_t"] != rows[2]["clip_t"]


def test_clip_t_uses_the_caption(weights):
    metric = FEATURE_METRICS["clip"]()
    metric.load(weights / "clip", torch.device("cpu"))
    a = _images(1)[0]
    rows = metric.compute([Sample("1", a, a, text="a red car"), Sample("2", a, a, text="zzz qqq www")])
    assert rows[0]["clip_t"] != pytest.approx(rows[1]["clip_t"], abs=1e-6)


@pytest.mark.parametrize("name", ["clip", "dino", "dinov3", "siglip2"])
def test_missing_weights_are_unavailable_with_a_hint(name):
    reason = FEATURE_METRICS[name].unavailable_reason(None)
    assert reason.startswith(f"{name}: no weights; pass --weights {name}=PATH")
    assert "\n" not in reason


def test_optional_packages_report_why():
    assert "torchvision" in FEATURE_METRICS["lpips"].unavailable_reason(None)
    assert "dreamsim" in FEATURE_METRICS["dreamsim"].unavailable_reason(None)


def test_bad_weights_folder_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--weights dino="):
        FEATURE_METRICS["dino"]().load(tmp_path / "empty", torch.device("cpu"))
    with pytest.raises(UserError, match="not found"):
        FEATURE_METRICS["clip"]().load(tmp_path / "nope", torch.device("cpu"))


def test_siglip2_patches_match_transformers():
    pil = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
    processor = pil.Siglip2ImageProcessorPil(max_num_patches=16, patch_size=8)
    for img in _images(2, shape=(40, 56, 3)) + _images(1, shape=(70, 20, 3)):
        ref = processor(images=[img], return_tensors="pt")
        mine = pp.naflex_patches([img], 8, 16)
        for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
            torch.testing.assert_close(mine[key].to(ref[key].dtype), ref[key])


def test_clip_preprocessing_matches_transformers(tmp_path):
    pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    pil.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    ref_processor = pil.CLIPImageProcessorPil.from_pretrained(tmp_path)
    mine = pp.from_folder(tmp_path, pp.Preprocess(pp.IMAGENET_MEAN, pp.IMAGENET_STD))
    for img in _images(1, shape=(40, 56, 3)) + _images(1, shape=(70, 33, 3)):
        torch.testing.assert_close(mine([img]), ref_processor(images=[img], return_tensors="pt")["pixel_values"])


def test_dino_follows_magicbrush_resize_and_crop():
    """MagicBrush's DINO: resize the short side to 256 (for a 224 crop), centre crop 224."""
    prep = pp.Preprocess(pp.IMAGENET_MEAN, pp.IMAGENET_STD, shortest_edge=256, crop=(224, 224))
    assert prep(_images(1, shape=(300, 400, 3))).shape == (1, 3, 224, 224)
