"""Feature metrics from HF-format folders: tiny random models of the real classes, saved and loaded
through editkit; each metric's preprocessing (transformers' PIL image processors) gives the tensors of
editkit's earlier PIL + numpy code, kept below as the reference."""

from __future__ import annotations

import json
import math

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


def test_clip_t_in_is_clip_t_of_the_prediction_with_the_outside_zero_filled(weights):
    """PIE-Bench's edited-region CLIP: uint8 `img * mask` (outside black) against the caption, as a cosine."""
    metric = FEATURE_METRICS["clip"]()
    metric.load(weights / "clip", torch.device("cpu"))
    pred, target, other = _images(3, seed=4)
    mask = np.zeros((40, 56), dtype=bool)
    mask[6:30, 10:44] = True
    outside_changed = np.where(mask[..., None], np.asarray(pred), np.asarray(other))
    rows = metric.compute([Sample("m", pred, target, mask, text="a red car"),
                           Sample("none", pred, target, None, text="a red car"),
                           Sample("empty", pred, target, np.zeros_like(mask), text="a red car"),
                           Sample("out", Image.fromarray(outside_changed), None, mask, text="a red car")])
    masked = Image.fromarray(np.uint8(np.asarray(pred) * mask[..., None]))
    inputs = metric.processor(images=[masked], return_tensors="pt")
    tokens = metric.tokenizer(["a red car"], padding=True, return_tensors="pt")
    with torch.no_grad():
        image = metric.model.get_image_features(pixel_values=inputs["pixel_values"])
        text = metric.model.get_text_features(**tokens)
    image, text = (getattr(v, "pooler_output", v) for v in (image, text))
    expected = torch.nn.functional.cosine_similarity(image, text).item()
    assert rows[0]["clip_t_in"] == pytest.approx(expected, abs=1e-5)
    assert abs(rows[0]["clip_t_in"] - rows[0]["clip_t"]) > 1e-4  # the zero-fill changes the embedding
    assert math.isnan(rows[1]["clip_t_in"]) and math.isnan(rows[2]["clip_t_in"])  # no mask, empty mask
    assert rows[1]["clip_t"] == pytest.approx(rows[0]["clip_t"], abs=1e-6)  # clip_t ignores the mask
    assert rows[3]["clip_t_in"] == pytest.approx(rows[0]["clip_t_in"], abs=1e-5)  # the outside is not seen
    assert abs(rows[3]["clip_t"] - rows[0]["clip_t"]) > 1e-4


@pytest.mark.parametrize("name", ["clip", "dino", "dinov3", "siglip2", "dreamsim", "lpips"])
def test_missing_weights_are_unavailable_with_a_hint(name):
    reason = FEATURE_METRICS[name].unavailable_reason(None)
    assert reason.startswith(f"{name}: no weights; pass --weights {name}=PATH")
    assert "\n" not in reason


def test_bad_weights_folder_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--weights dino="):
        FEATURE_METRICS["dino"]().load(tmp_path / "empty", torch.device("cpu"))
    with pytest.raises(UserError, match="not found"):
        FEATURE_METRICS["clip"]().load(tmp_path / "nope", torch.device("cpu"))


# The reference: editkit's PIL + numpy preprocessing before it used transformers' processors.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _reference(images, mean_std, shortest_edge=None, resize_to=None, crop=None, resample=Image.BICUBIC):
    """Resize (shortest edge, truncating the long one; or to (h, w)), centre crop, /255, normalise."""
    out = []
    for img in images:
        img = img.convert("RGB")
        if resize_to is not None:
            img = img.resize((resize_to[1], resize_to[0]), resample)
        elif shortest_edge is not None:
            w, h = img.size
            long = int(shortest_edge * max(w, h) / min(w, h))
            img = img.resize((shortest_edge, long) if w <= h else (long, shortest_edge), resample)
        if crop is not None:
            left, top = (img.width - crop) // 2, (img.height - crop) // 2
            img = img.crop((left, top, left + crop, top + crop))
        array = np.asarray(img, dtype=np.float32) / 255.0
        out.append((array - np.asarray(mean_std[0], np.float32)) / np.asarray(mean_std[1], np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def _reference_naflex(images, patch, max_patches):
    """SigLIP2 NaFlex: the binary search for the largest patch grid, bilinear resize, mean/std 0.5, patches."""
    def scaled(scale, size):
        return max(patch, math.ceil(size * scale / patch) * patch)

    values, masks, shapes = [], [], []
    for img in images:
        img = img.convert("RGB")
        lo, hi = 1e-6, 100.0
        while hi - lo >= 1e-5:
            mid = (lo + hi) / 2
            fits = (scaled(mid, img.height) / patch) * (scaled(mid, img.width) / patch) <= max_patches
            lo, hi = (mid, hi) if fits else (lo, mid)
        h, w = scaled(lo, img.height), scaled(lo, img.width)
        array = (np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0 - 0.5) / 0.5
        hp, wp = h // patch, w // patch
        patches = array.reshape(hp, patch, wp, patch, 3).transpose(0, 2, 1, 3, 4).reshape(hp * wp, -1)
        values.append(np.zeros((max_patches, patches.shape[1]), np.float32))
        values[-1][: len(patches)] = patches
        masks.append((np.arange(max_patches) < len(patches)).astype(np.int32))
        shapes.append((hp, wp))
    return {"pixel_values": torch.from_numpy(np.stack(values)),
            "pixel_attention_mask": torch.from_numpy(np.stack(masks)), "spatial_shapes": torch.tensor(shapes)}


def _parity_images():
    """Landscape, portrait, smaller than the crop, and non-RGB modes (grey, transparent)."""
    rgba = _images(1, seed=3, shape=(36, 44, 4))[0]
    return [*_images(1, shape=(40, 56, 3)), *_images(1, seed=1, shape=(70, 33, 3)),
            *_images(1, seed=2, shape=(20, 20, 3)), _images(1, seed=4, shape=(50, 50, 3))[0].convert("L"),
            Image.fromarray(np.asarray(rgba), "RGBA")]


def _dinov3_config(folder):
    """The preprocessor_config.json of facebook/dinov3-vits16-pretrain-lvd1689m, at 40 px."""
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": None, "do_center_crop": None, "do_convert_rgb": None, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": list(IMAGENET[0]), "image_processor_type": "DINOv3ViTImageProcessorFast",
        "image_std": list(IMAGENET[1]), "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 40, "width": 40}}))
    return folder


def _clip_config(folder):
    """A CLIP config of the current (dict) format with other settings than the defaults."""
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                          resample=Image.BILINEAR).save_pretrained(folder)
    return folder


PARITY = {  # metric preprocessing: (editkit's processor, the reference)
    "clip": (lambda tmp: pp.clip(tmp, 32), dict(mean_std=CLIP, shortest_edge=32, crop=32)),
    "clip-folder": (lambda tmp: pp.clip(_clip_config(tmp / "c"), 224),
                    dict(mean_std=CLIP, shortest_edge=40, crop=32, resample=Image.BILINEAR)),
    "dino": (lambda tmp: pp.dino(32), dict(mean_std=IMAGENET, shortest_edge=37, crop=32)),
    "dino-224": (lambda tmp: pp.dino(224), dict(mean_std=IMAGENET, shortest_edge=256, crop=224)),
    "dinov3": (lambda tmp: pp.dinov3(tmp, 32), dict(mean_std=IMAGENET, resize_to=(32, 32))),
    "dinov3-folder": (lambda tmp: pp.dinov3(_dinov3_config(tmp / "d"), 224),
                      dict(mean_std=IMAGENET, resize_to=(40, 40), resample=Image.BILINEAR)),
    "effnet": (lambda tmp: pp.unit_range(224), dict(mean_std=UNIT, resize_to=(224, 224))),
    "lpips": (lambda tmp: pp.unit_range(None), dict(mean_std=UNIT)),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_preprocessing_gives_the_reference_tensors(name, tmp_path):
    build, reference = PARITY[name]
    processor = build(tmp_path)
    for img in _parity_images():
        torch.testing.assert_close(pp.pixel_values(processor, [img]), _reference([img], **reference),
                                   atol=1e-5, rtol=0)


def test_siglip2_patches_give_the_reference_tensors():
    processor = pp.siglip2(8, 16)
    for img in _parity_images() + _images(1, shape=(70, 20, 3)):
        mine, ref = pp.inputs(processor, [img]), _reference_naflex([img], 8, 16)
        torch.testing.assert_close(mine["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)
        for key in ("pixel_attention_mask", "spatial_shapes"):
            assert torch.equal(mine[key].long(), ref[key].long()), key


def test_effnet_and_dreamsim_inputs_are_the_reference_tensors():
    from editkit.eval.metrics.efficientnet import preprocess
    from editkit.eval.metrics.perceptual import _tensor

    images = _images(3, shape=(40, 56, 3))
    expected = _reference(images, UNIT, resize_to=(224, 224))
    torch.testing.assert_close(preprocess(images), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_tensor(images, 224), expected, atol=1e-5, rtol=0)


def test_metrics_read_the_preprocessor_config_of_their_folder(weights, tmp_path):
    import shutil

    from transformers import CLIPImageProcessorPil

    clip = FEATURE_METRICS["clip"]()
    clip.load(weights / "clip", torch.device("cpu"))
    assert pp.pixel_values(clip.processor, _images(1)).shape == (1, 3, 32, 32)  # no config: the model's size
    folder = shutil.copytree(weights / "clip", tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 24, "width": 24}).save_pretrained(folder)
    clip.load(folder, torch.device("cpu"))
    assert isinstance(clip.processor, CLIPImageProcessorPil)
    assert pp.pixel_values(clip.processor, _images(1)).shape == (1, 3, 24, 24)
    dinov3 = FEATURE_METRICS["dinov3"]()
    dinov3.load(weights / "dinov3", torch.device("cpu"))
    assert pp.pixel_values(dinov3.processor, _images(1)).shape == (1, 3, 32, 32)
    folder = shutil.copytree(weights / "dinov3", tmp_path / "dinov3")
    shutil.copy(_dinov3_config(tmp_path / "cfg") / "preprocessor_config.json", folder)
    dinov3.load(folder, torch.device("cpu"))
    assert pp.pixel_values(dinov3.processor, _images(1)).shape == (1, 3, 40, 40)


def test_an_integer_clip_size_is_the_shortest_edge(tmp_path):
    """Older CLIP folders (openai/clip-vit-base-patch32) say "size": 224: CLIP's processor keeps the aspect
    ratio (shortest edge), then crops; editkit's earlier code squashed the image to 224x224 instead."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True, "image_mean": list(CLIP[0]),
        "image_std": list(CLIP[1]), "resample": 3, "size": 32, "feature_extractor_type": "CLIPFeatureExtractor"}))
    img = _images(1, shape=(40, 64, 3))
    torch.testing.assert_close(pp.pixel_values(pp.clip(tmp_path, 224), img),
                               _reference(img, CLIP, shortest_edge=32, crop=32), atol=1e-5, rtol=0)


def test_a_broken_preprocessor_config_is_a_user_error(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(UserError, match="preprocessor_config.json: not a usable CLIPImageProcessorPil config"):
        pp.clip(tmp_path, 32)
