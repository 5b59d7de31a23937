"""The web app's plain functions on the tiny preset: start, turn, undo, history, download, LoRA scales."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.app.actions import AppController, EditSettings, LoraChoice
from editkit.app.limits import AppLimits
from editkit.app.server import lora_choices
from editkit.errors import UserError
from editkit.infer.engine import Engine
from editkit.infer.outputs import read_settings
from editkit.models import lora as L

STEPS = 2


@pytest.fixture(scope="module")
def engine():
    from editkit.models import load_model

    return Engine(load_model("tiny", dtype="fp32", device="cpu"), model_name="tiny")


@pytest.fixture
def controller(engine, tmp_path):
    return AppController(engine, limits=AppLimits(max_sources=2), output_dir=tmp_path / "out")


def _source(tmp_path, name="src.png", size=(64, 64), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return str(path)


def _settings(instruction="make the sky red", **kw):
    return EditSettings(instruction, **{"steps": STEPS, **kw})


def _array(image):
    """Pixels of an image, or of a PNG file the page shows."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            return _array(img)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _size(path):
    with Image.open(path) as img:
        return img.size


def test_start_shows_the_source_and_nothing_to_download(controller, tmp_path):
    view = controller.start([_source(tmp_path)])
    assert [caption for _, caption in view.history] == ["source"]
    assert view.result is None and view.download_path is None
    assert _size(view.editor_value["background"]) == (64, 64)
    assert "1 source image" in view.status


def test_start_without_files_is_the_empty_page(controller):
    view = controller.start([])
    assert view.session is None and view.history == [] and "Upload" in view.status


def test_start_refuses_more_sources_than_allowed(controller, tmp_path):
    paths = [_source(tmp_path, f"{i}.png") for i in range(3)]
    with pytest.raises(UserError, match="at most 2"):
        controller.start(paths)


def test_a_turn_gives_a_result_a_history_entry_and_a_png_with_its_settings(controller, tmp_path):
    session = controller.start([_source(tmp_path)]).session
    calls = []
    view = controller.edit(session, _settings("把天空变成红色", seed=7, negative_prompt="blurry"),
                           progress=lambda done, total: calls.append((done, total)))
    assert view.result is not None and _size(view.result) == (64, 64)
    assert [caption for _, caption in view.history] == ["source", "turn 1: 把天空变成红色"]
    assert calls[-1] == (STEPS, STEPS) and len(calls) == STEPS
    settings = read_settings(view.download_path)
    assert settings["prompt"] == "把天空变成红色"
    assert settings["negative_prompt"] == "blurry"
    assert (settings["seed"], settings["steps"], settings["turn"], settings["model"]) == (7, STEPS, 1, "tiny")
    with Image.open(view.download_path) as png:
        assert np.array_equal(_array(png), _array(view.result))


def test_second_turn_edits_the_first_result_and_undo_goes_back(controller, tmp_path):
    session = controller.start([_source(tmp_path)]).session
    first = controller.edit(session, _settings("add a hat"))
    assert np.array_equal(_array(session.edit.request("next").images[0]), _array(first.result))  # next source
    second = controller.edit(session, _settings("make it night", seed=3))
    assert len(second.history) == 3 and not np.array_equal(_array(first.result), _array(second.result))
    assert read_settings(second.download_path)["turn"] == 2

    undone = controller.undo(session)
    assert len(undone.history) == 2
    assert np.array_equal(_array(undone.result), _array(first.result))
    assert undone.download_path == first.download_path
    assert not Path(second.download_path).exists()  # the undone turn's PNG is gone
    assert np.array_equal(_array(undone.editor_value["background"]), _array(first.result))

    controller.undo(session)
    empty = controller.undo(session)
    assert empty.warning and "Nothing to undo" in empty.warning
    assert empty.result is None and len(empty.history) == 1


def test_reference_images_stay_and_the_output_size_is_chosen(controller, tmp_path):
    first, reference = _source(tmp_path, "a.png"), _source(tmp_path, "b.png", size=(48, 32), seed=1)
    session = controller.start([first, reference]).session
    view = controller.edit(session, _settings(width=48, height=32))
    assert _size(view.result) == (48, 32)
    images = session.edit.request("next").images
    assert np.array_equal(_array(images[0]), _array(view.result))
    assert images[1].size == (48, 32)  # the reference is still there
    assert read_settings(view.download_path)["source_sizes"] == [[64, 64], [48, 32]]


def test_closing_a_session_frees_its_downloads(controller, tmp_path):
    session = controller.start([_source(tmp_path)]).session
    view = controller.edit(session, _settings())
    assert Path(view.download_path).is_file()
    controller.close(session)
    assert not session.folder.exists()
    controller.close(None)


def test_undo_without_a_session_only_warns(controller):
    view = controller.undo(None)
    assert view.warning and view.session is None


def test_out_of_gpu_memory_is_a_user_error_and_loses_nothing(controller, engine, tmp_path, monkeypatch):
    session = controller.start([_source(tmp_path)]).session
    controller.edit(session, _settings())

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "edit", out_of_memory)
    with pytest.raises(UserError, match="Out of GPU memory"):
        controller.edit(session, _settings("again"))
    view = controller.view(session)
    assert len(view.history) == 2 and Path(view.download_path).is_file()


def test_edit_before_upload_is_refused(controller):
    with pytest.raises(UserError, match="upload one first"):
        controller.edit(None, _settings())


@pytest.mark.parametrize(("settings", "message"), [
    (_settings("   "), "instruction is empty"),
    (_settings(steps=0), "Steps is 0"),
    (_settings(seed=-1), "Seed is -1"),
    (_settings(width=100, height=64), "multiple of 16"),
    (_settings(width=64), "both output width and height"),
    (_settings(fusion="pixel-mask"), "needs a mask"),
    (_settings(fusion="blend"), "unknown"),
])
def test_bad_settings_are_refused_before_any_work(controller, tmp_path, settings, message):
    session = controller.start([_source(tmp_path)]).session
    with pytest.raises(UserError, match=message):
        controller.edit(session, settings)
    assert session.edit.history == []


def test_painted_mask_with_pixel_fusion_keeps_the_source_outside(controller, tmp_path):
    path = _source(tmp_path)
    session = controller.start([path]).session
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 40, 90, 255), (0, 0, 24, 64))  # left stripe = edit region
    view = controller.edit(session, _settings(fusion="pixel-mask"), editor_value={"layers": [layer]})
    out, src = _array(view.result), _array(Image.open(path))
    assert np.array_equal(out[:, 48:], src[:, 48:])  # far from the stripe: the source, bit for bit
    assert not np.array_equal(out[:, :24], src[:, :24])
    assert "mask covers 38%" in view.status


def test_uploaded_mask_wins_over_the_editor(controller, tmp_path):
    session = controller.start([_source(tmp_path)]).session
    mask_path = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(mask_path)  # whole image, at another size
    view = controller.edit(session, _settings(fusion="pixel-mask"), editor_value={"layers": []},
                           mask_path=str(mask_path))
    assert "mask covers 100%" in view.status


def _random_lora(transformer):
    g = torch.Generator().manual_seed(0)
    modules = {
        name: L.LoraModule(torch.randn(2, module.in_features, generator=g) * 0.3,
                           torch.randn(module.out_features, 2, generator=g) * 0.3)
        for name, module in transformer.named_modules() if name.endswith(("attn.to_q", "attn.to_v"))
    }
    return L.build(modules, "peft")


def test_lora_scale_chosen_per_request_changes_the_edit_and_is_recorded(engine, tmp_path):
    path = L.save_lora(tmp_path / "style.safetensors", _random_lora(engine.model.transformer))
    choices = lora_choices([f"{path}:0.7"])
    assert choices == [LoraChoice(name="style", path=str(path), scale=0.7)]
    try:
        controller = AppController(engine, loras=choices, output_dir=tmp_path / "out")
        source = _source(tmp_path)
        runs = {}
        for scale in (0.0, 1.5):
            session = controller.start([source]).session
            view = controller.edit(session, _settings(lora_scales=[scale]))
            runs[scale] = _array(view.result)
            assert read_settings(view.download_path)["lora"] == [[str(path), scale]]
        engine.unload_loras()
        base = AppController(engine, output_dir=tmp_path / "base")
        plain = _array(base.edit(base.start([source]).session, _settings()).result)
    finally:
        engine.unload_loras()
    assert np.array_equal(runs[0.0], plain)  # scale 0 = off
    assert np.abs(runs[1.5] - plain).max() > 5


def test_lora_names_are_unique(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for folder in (a, b):
        (folder / "style.safetensors").write_bytes(b"")
    names = [c.name for c in lora_choices([str(a / "style.safetensors"), f"{b / 'style.safetensors'}:0.5"])]
    assert names == ["style", "style-2"]


def test_wrong_number_of_lora_scales_is_refused(controller, tmp_path):
    session = controller.start([_source(tmp_path)]).session
    with pytest.raises(UserError, match="LoRA scales"):
        controller.edit(session, _settings(lora_scales=[1.0]))
