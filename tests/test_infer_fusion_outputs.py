import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from editkit.errors import UserError
from editkit.infer import fusion
from editkit.infer.outputs import read_settings, save_png


def _noise_image(seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _box_mask(size=(64, 48), box=(20, 14, 35, 29)):
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def _distance_to_box(size, box):
    ys, xs = np.mgrid[0:size[1], 0:size[0]]
    dx = np.maximum(np.maximum(box[0] - xs, xs - box[2]), 0)
    dy = np.maximum(np.maximum(box[1] - ys, ys - box[3]), 0)
    return np.maximum(dx, dy)


@pytest.mark.parametrize("feather", [0, 1, 3, 6])
def test_pixel_fusion_keeps_background_exactly_away_from_the_feather(feather):
    source, edited = _noise_image(0), _noise_image(1)
    box = (20, 14, 35, 29)
    out = np.asarray(fusion.paste_background(edited, source, _box_mask(box=box), feather))
    dist = _distance_to_box(source.size, box)
    far = dist > max(3 * feather, 2)
    assert np.array_equal(out[far], np.asarray(source)[far])
    inside = dist == 0
    if feather == 0:
        assert np.array_equal(out[inside], np.asarray(edited)[inside])
    ys, xs = np.mgrid[0:48, 0:64]
    depth = np.minimum.reduce([xs - box[0], box[2] - xs, ys - box[1], box[3] - ys])
    core = depth >= feather
    err = np.abs(out[core].astype(int) - np.asarray(edited)[core].astype(int))
    assert err.max() <= 0.03 * 255


def test_pixel_fusion_resizes_mask_and_source_to_the_output():
    out = fusion.paste_background(_noise_image(1, (32, 24)), _noise_image(0, (64, 48)), _box_mask(), 2)
    assert out.size == (32, 24)


def test_latent_mask_is_area_weighted_and_blend_respects_it():
    weight = fusion.latent_mask(_box_mask((64, 64), (0, 0, 35, 63)), (8, 8))
    assert weight.shape == (8, 8)
    assert torch.all(weight[:, :4] == 1) and torch.all(weight[:, 5:] == 0)
    torch.testing.assert_close(weight[:, 4], torch.full((8,), 0.5))
    a, b = torch.ones(1, 16, 8, 8), torch.zeros(1, 16, 8, 8)
    blended = fusion.blend_latents(a, b, weight)
    assert torch.equal(blended[..., 5:], b[..., 5:]) and torch.equal(blended[..., :4], a[..., :4])


def test_unknown_fusion_mode_is_a_user_error():
    with pytest.raises(UserError, match="pixel-mask"):
        fusion.check_mode("blend")


def test_png_settings_round_trip(tmp_path):
    settings = {"prompt": "make it blue ✓", "negative_prompt": " ", "seed": 7, "steps": 4, "true_cfg_scale": 4.0,
                "model": "tiny", "lora": [["a.safetensors", 0.5]], "width": 64, "height": 48}
    path = save_png(tmp_path / "out" / "x.png", _noise_image(3), settings)
    assert read_settings(path) == settings
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(_noise_image(3)))
    assert not list(path.parent.glob(".tmp-*"))
    assert read_settings(save_png(tmp_path / "plain.png", _noise_image(3))) == {}
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="bad.png"):
        read_settings(tmp_path / "bad.png")
