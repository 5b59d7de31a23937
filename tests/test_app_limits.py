"""The web app's input checks and the editor-to-mask conversion (no browser, no model)."""

import numpy as np
import pytest
from PIL import Image

from editkit.app.limits import AppLimits, check_instruction, load_sources, load_uploaded_mask
from editkit.app.mask import mask_from_editor
from editkit.errors import UserError


def _png(path, size=(40, 30), color=(10, 200, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def test_instruction_is_stripped_and_chinese_is_accepted():
    limits = AppLimits()
    assert check_instruction("  make the sky red \n", limits) == "make the sky red"
    assert check_instruction("把天空变成红色", limits) == "把天空变成红色"


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_instruction_is_refused(text):
    with pytest.raises(UserError, match="instruction is empty"):
        check_instruction(text, AppLimits())


def test_overlong_instruction_is_refused():
    with pytest.raises(UserError, match="at most 5"):
        check_instruction("abcdefgh", AppLimits(max_instruction_chars=5))


def test_sources_keep_their_alpha_for_the_engine(tmp_path):
    from editkit.data.images import as_mode

    rgba = tmp_path / "cut.png"
    Image.new("RGBA", (8, 6), (0, 0, 0, 0)).save(rgba)
    images = load_sources([_png(tmp_path / "a.png"), str(rgba)], AppLimits())
    assert [im.mode for im in images] == ["RGB", "RGBA"]  # the engine gives them the model's mode
    assert images[0].size == (40, 30)
    assert as_mode(images[1], "RGB").getpixel((0, 0)) == (255, 255, 255)  # an RGB family: over white


def test_no_source_is_refused():
    with pytest.raises(UserError, match="upload at least one image"):
        load_sources([], AppLimits())


def test_too_many_sources_are_refused(tmp_path):
    paths = [_png(tmp_path / f"{i}.png") for i in range(3)]
    with pytest.raises(UserError, match="at most 2"):
        load_sources(paths, AppLimits(max_sources=2))


def test_wrong_file_type_is_refused(tmp_path):
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (4, 4)).save(gif)
    with pytest.raises(UserError, match=r"anim.gif: source image 1 must be one of \.png"):
        load_sources([str(gif)], AppLimits())


def test_oversized_image_is_refused_with_its_size(tmp_path):
    path = _png(tmp_path / "big.png", size=(300, 100))
    with pytest.raises(UserError, match="big.png: source image 1 is 300x100; the limit is 256 pixels"):
        load_sources([path], AppLimits(max_image_side=256))


def test_undecodable_file_is_refused(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png: source image 1 is not a readable image"):
        load_sources([str(path)], AppLimits())


def test_bad_limits_are_refused():
    with pytest.raises(UserError, match="--max-sources"):
        AppLimits(max_sources=0)
    with pytest.raises(UserError, match="--max-file-mb 0"):
        AppLimits(max_file_mb=0)


def test_file_over_the_megabyte_limit_is_refused_with_its_size(tmp_path):
    path = tmp_path / "big.png"
    pixels = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # ~1.8 MB: noise does not compress
    with pytest.raises(UserError, match=r"big.png: source image 1 is 1\.\d MB; the limit is 1 MB"):
        load_sources([str(path)], AppLimits(max_file_mb=1))


def test_uploaded_mask_is_binarised_and_resized(tmp_path):
    path = tmp_path / "mask.png"
    grey = Image.new("L", (20, 15), 0)
    grey.paste(200, (0, 0, 10, 15))
    grey.save(path)
    mask = load_uploaded_mask(str(path), (40, 30), AppLimits())
    assert mask.mode == "L" and mask.size == (40, 30)
    assert set(mask.get_flattened_data()) == {0, 255}
    assert mask.getpixel((5, 5)) == 255 and mask.getpixel((35, 5)) == 0


def _stroke_layer(size, box):
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((204, 50, 50, 255), box)
    return layer


def test_editor_layers_become_a_binary_mask_of_the_source_size():
    value = {
        "background": Image.new("RGB", (20, 10)),
        "layers": [_stroke_layer((20, 10), (0, 0, 5, 5)), _stroke_layer((20, 10), (15, 5, 20, 10))],
        "composite": None,
    }
    mask = mask_from_editor(value, (40, 20))
    assert mask.mode == "L" and mask.size == (40, 20)
    assert mask.getpixel((2, 2)) == 255  # first stroke
    assert mask.getpixel((38, 18)) == 255  # second stroke
    assert mask.getpixel((20, 2)) == 0
    assert set(mask.get_flattened_data()) == {0, 255}


def test_unpainted_editor_gives_no_mask():
    empty = {"background": Image.new("RGB", (8, 8)), "layers": [Image.new("RGBA", (8, 8))], "composite": None}
    assert mask_from_editor(empty, (8, 8)) is None
    assert mask_from_editor(None, (8, 8)) is None
