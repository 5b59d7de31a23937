import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editkit.data.images import (
    bucket_for,
    fit_area,
    load_image,
    load_mask,
    make_buckets,
    oriented_size,
    resize_to_area,
    resize_to_bucket,
    target_size,
)
from editkit.errors import UserError


def _diffusers_calculate_dimensions(module: str):
    """The reference function of a diffusers Qwen pipeline module, taken from the installed source
    without importing the module (which pulls in transformers and takes seconds)."""
    import ast
    import importlib.util

    root = Path(importlib.util.find_spec("diffusers").origin).parent
    source = (root / "pipelines" / "qwenimage" / f"{module}.py").read_text()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "calculate_dimensions")
    namespace = {"math": math}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "calculate_dimensions", "exec"), namespace)
    return namespace["calculate_dimensions"]


@pytest.mark.parametrize("module", ["pipeline_qwenimage_edit", "pipeline_qwenimage_edit_plus"])
def test_fit_area_matches_diffusers_calculate_dimensions(module):
    calculate_dimensions = _diffusers_calculate_dimensions(module)
    ratios = [math.exp(t / 20) for t in range(-28, 29)]  # about 1/4 .. 4
    ratios += [w / h for w, h in [(1000, 600), (1920, 1080), (333, 777), (64, 48), (4000, 3000), (1, 1)]]
    for area in (256 * 256, 384 * 384, 512 * 512, 640 * 480, 1024 * 1024, 1328 * 1328):
        for ratio in ratios:
            assert fit_area(area, ratio, 32) == tuple(calculate_dimensions(area, ratio)[:2]), (area, ratio)


def test_fit_area_clamps_each_side_to_one_multiple():
    # diffusers would round the short side to 0 here
    assert fit_area(64 * 64, 100.0, 32) == (640, 32)
    assert fit_area(64 * 64, 1 / 100, 16) == (16, 640)
    assert fit_area(1, 1.0, 16) == (16, 16)
    for bad in [(0, 1.0, 32), (64, 0.0, 32), (64, math.inf, 32), (64, math.nan, 32), (64, 1.0, 7)]:
        with pytest.raises(ValueError):
            fit_area(*bad)


def test_target_size_is_fit_area_at_the_image_aspect():
    for w, h in [(1000, 600), (333, 777), (5000, 20)]:
        assert target_size(w, h, 384 * 384, 16) == fit_area(384 * 384, w / h, 16)
    with pytest.raises(ValueError):
        target_size(0, 10, 64 * 64)


@pytest.mark.parametrize("multiple", [16, 32])
def test_target_size_keeps_aspect_and_multiple(multiple):
    for w, h in [(640, 480), (100, 300), (1, 1), (5000, 20)]:
        tw, th = target_size(w, h, 64 * 64, multiple)
        assert tw % multiple == 0 and th % multiple == 0 and tw >= multiple and th >= multiple
        if max(w / h, h / w) < 4:
            assert abs(math.log(tw / th) - math.log(w / h)) < 0.5


def _turned_jpeg(path, orientation):
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path):
    assert load_image(_turned_jpeg(tmp_path / "r.jpg", 6)).size == (20, 40)  # 6: rotate 90 CW on display


@pytest.mark.parametrize("orientation, shown", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_oriented_size_reads_the_size_as_shown(tmp_path, orientation, shown):
    path = _turned_jpeg(tmp_path / "r.jpg", orientation)
    assert oriented_size(path) == shown == load_image(path).size


def test_oriented_size_refuses_missing_and_undecodable_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for path in (tmp_path / "nope.png", tmp_path / "bad.png"):
        with pytest.raises(UserError, match=str(path.name)):
            oriented_size(path)


def test_rgba_is_composited_on_white_and_rgba_mode_kept(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "t.png", mode="RGBA").mode == "RGBA"


def test_mask_is_binarised_and_resized(tmp_path):
    arr = np.array([[0, 100, 128, 255]], dtype=np.uint8).repeat(4, 0)
    Image.fromarray(arr).convert("RGB").save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.mode == "L" and np.array(mask)[0].tolist() == [0, 0, 255, 255]
    big = load_mask(tmp_path / "m.png", size=(8, 8))
    assert big.size == (8, 8) and set(np.unique(np.array(big))) <= {0, 255}


def test_missing_undecodable_and_url_are_user_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for path in (tmp_path / "nope.png", tmp_path / "bad.png", "https://example.com/a.png"):
        with pytest.raises(UserError):
            load_image(path)
        with pytest.raises(UserError):
            load_mask(path)


def test_buckets_cover_area_and_assignment():
    buckets = make_buckets(1024 * 1024)
    assert (1024, 1024) in buckets
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in buckets)
    assert all(abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.1 for w, h in buckets)
    assert {(h, w) for w, h in buckets} == set(buckets)
    assert bucket_for(1920, 1080, buckets)[0] > bucket_for(1920, 1080, buckets)[1]
    assert bucket_for(500, 500, buckets) == (1024, 1024)


def test_resize_helpers_give_exact_sizes():
    img = Image.new("RGB", (300, 200))
    assert resize_to_area(img, 64 * 64, 16).size == target_size(300, 200, 64 * 64, 16)
    assert resize_to_bucket(img, (80, 48)).size == (80, 48)


def test_mask_in_alpha_channel(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 3] = 0
    arr[:2, :, 3] = 255
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    assert np.array(load_mask(tmp_path / "a.png"))[:, 0].tolist() == [255, 255, 0, 0]


def test_an_rgb_images_transparent_colour_is_composited_over_white(tmp_path):
    from editkit.data.images import as_mode, load_image

    path = tmp_path / "trns.png"
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    img.putpixel((0, 0), (0, 0, 0))
    img.save(path, transparency=(0, 0, 0))  # PNG tRNS: black is transparent
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (10, 20, 30)
    kept = load_image(path, "keep")
    assert kept.mode == "RGBA" and kept.getpixel((0, 0))[3] == 0
    assert as_mode(kept, "RGB").getpixel((0, 0)) == (255, 255, 255)
