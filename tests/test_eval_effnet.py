"""EfficientNet-Lite0 from the packaged weights: loads strictly, recognises ImageNet photos,
gives two views of one object a higher similarity than unrelated photos; FID/KID parity."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageOps
from skimage import data

from editkit.eval.metrics.distribution import fid_kid_from_features, fid_kid_from_images
from editkit.eval.metrics.efficientnet import load_efficientnet_lite0, preprocess
from editkit.eval.metrics.effnet import EffNetMetric
from editkit.eval.sample import Sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_efficientnet_lite0()


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def test_packaged_weights_classify_a_cat(model):
    with torch.no_grad():
        top = model.logits(preprocess([_photo("chelsea")])).argmax(-1).item()
    assert 281 <= top <= 285  # ImageNet's domestic cat classes


def test_two_views_of_one_object_are_more_similar_than_unrelated_photos():
    cat = _photo("chelsea")
    w, h = cat.size
    view_a = cat.crop((0, 0, int(w * 0.85), h))
    view_b = ImageOps.mirror(cat.crop((int(w * 0.15), int(h * 0.05), w, h)))
    metric = EffNetMetric()
    metric.load(None, torch.device("cpu"))
    rows = metric.compute([Sample("same", pred=view_a, target=view_b),
                           Sample("coffee", pred=view_a, target=_photo("coffee")),
                           Sample("rocket", pred=view_a, target=_photo("rocket"))])
    same = rows[0]["effnet_sim"]
    assert same > rows[1]["effnet_sim"] + 0.1
    assert same > rows[2]["effnet_sim"] + 0.1
    assert rows[0]["_effnet_pred"].shape == (1280,)


@pytest.mark.slow  # FID's 1280x1280 eigen-decomposition takes ~30 s on a busy 2-core CPU
def test_fid_from_cached_features_equals_torchmetrics_with_the_extractor(model):
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(5, 3, 64, 64, generator=gen)
    fake = (real + 0.3 * torch.rand(5, 3, 64, 64, generator=gen)).clamp(0, 1)
    direct = fid_kid_from_images(real, fake, model)
    with torch.no_grad():
        cached = fid_kid_from_features(model(real).numpy(), model(fake).numpy())
    assert cached["fid_effnet"] == pytest.approx(direct["fid_effnet"], rel=1e-3)
    assert cached["kid_effnet"] == pytest.approx(direct["kid_effnet"], rel=1e-3)
    assert direct["fid_effnet"] > 0


def test_fid_is_zero_for_identical_sets_and_nan_for_too_few():
    feats = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)).numpy()
    assert fid_kid_from_features(feats, feats)["fid_effnet"] == pytest.approx(0.0, abs=1e-2)
    assert math.isnan(fid_kid_from_features(feats[:1], feats[:1])["fid_effnet"])
