"""The RGBA-VAE: conversion, compositing, RGBA metrics (eval), and the rgba_vae training stage (CPU)."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch

from editkit.errors import UserError
from editkit.layers.rgba_vae import BACKGROUNDS, convert_vae, load_rgba_vae, over_background, unit_range


def _tiny_rgb_vae(folder, seed=0):
    """The tiny preset's VAE shape with seeded weights, saved as a diffusers folder."""
    from diffusers import AutoencoderKLQwenImage

    from editkit.models.presets import TINY

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**copy.deepcopy(TINY.vae))
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rgb_vae(tmp_path_factory):
    return _tiny_rgb_vae(tmp_path_factory.mktemp("vae") / "rgb")


@pytest.fixture(scope="module")
def rgba_vae(rgb_vae, tmp_path_factory):
    return convert_vae(rgb_vae, tmp_path_factory.mktemp("vae") / "rgba")


# ---- conversion ---------------------------------------------------------------------------------

def test_converted_vae_matches_the_rgb_vae_on_opaque_images(rgb_vae, rgba_vae):
    from diffusers import AutoencoderKLQwenImage

    rgb = AutoencoderKLQwenImage.from_pretrained(rgb_vae).eval()
    wide = AutoencoderKLQwenImage.from_pretrained(rgba_vae).eval()
    assert wide.config.input_channels == 4 and wide.config.latents_mean == rgb.config.latents_mean
    x = torch.rand(2, 3, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a = rgb.encode(x).latent_dist
        b = wide.encode(torch.cat([x, torch.ones_like(x[:, :1])], 1)).latent_dist
        torch.testing.assert_close(b.mean, a.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.logvar, a.logvar, atol=1e-5, rtol=0)
        rec_rgb, rec_rgba = rgb.decode(a.mean).sample, wide.decode(b.mean).sample
    assert rec_rgba.shape[1] == 4
    torch.testing.assert_close(rec_rgba[:, :3], rec_rgb, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec_rgba[:, 3], torch.ones_like(rec_rgba[:, 3]), atol=1e-6, rtol=0)


def test_an_rgb_vae_is_widened_in_memory_like_the_converted_one(rgb_vae, rgba_vae):
    a, b = load_rgba_vae(rgb_vae).state_dict(), load_rgba_vae(rgba_vae).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_convert_vae_refuses_bad_inputs(rgb_vae, rgba_vae, tmp_path):
    import shutil

    with pytest.raises(UserError) as err:
        convert_vae(tmp_path / "nothing", tmp_path / "o1")
    assert "not a folder" in _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        convert_vae(tmp_path / "empty", tmp_path / "o2")
    assert "no AutoencoderKLQwenImage config.json" in _one_line(err)
    with pytest.raises(UserError) as err:
        convert_vae(rgba_vae, tmp_path / "o3")
    assert "already has input_channels=4" in _one_line(err)
    damaged = shutil.copytree(rgb_vae, tmp_path / "damaged")
    (damaged / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(UserError) as err:
        convert_vae(damaged, tmp_path / "o4")
    assert "cannot be loaded" in _one_line(err)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError) as err:
        convert_vae(rgb_vae, tmp_path / "full")
    assert "--overwrite" in _one_line(err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()


def test_convert_vae_command_and_a_model_folder_source(rgb_vae, tmp_path):
    import shutil

    import typer
    from typer.testing import CliRunner

    from editkit.layers.vae_commands import register

    app = typer.Typer()
    register(app)
    model = tmp_path / "model"
    shutil.copytree(rgb_vae, model / "vae")
    result = CliRunner().invoke(app, ["convert-vae", str(model), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert load_rgba_vae(tmp_path / "out").config.input_channels == 4
    result = CliRunner().invoke(app, ["convert-vae", str(tmp_path / "out"), str(tmp_path / "again")])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)


# ---- compositing ----------------------------------------------------------------------------------

def test_the_nine_alphavae_backgrounds():
    assert list(BACKGROUNDS) == ["black", "white", "red", "green", "blue", "cyan", "magenta", "yellow", "grey"]
    assert BACKGROUNDS["grey"] == pytest.approx((128 / 255,) * 3)


def test_over_background_numpy_and_torch():
    pixel = np.array([[[0.2, 0.4, 0.6, 0.5]]])  # (1, 1, 4), half transparent
    np.testing.assert_allclose(over_background(pixel, BACKGROUNDS["white"])[0, 0], [0.6, 0.7, 0.8])
    np.testing.assert_allclose(over_background(pixel, BACKGROUNDS["red"])[0, 0], [0.6, 0.2, 0.3])
    # a (B, 4, H, W) tensor in [-1, 1], channels first
    t = torch.tensor([0.2, 0.4, 0.6, 0.5]).reshape(1, 4, 1, 1) * 2 - 1
    out = over_background(unit_range(t), BACKGROUNDS["white"], channel_dim=1)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.6, 0.7, 0.8]))


# ---- metrics --------------------------------------------------------------------------------------

def _psnr(mse):
    return 10 * math.log10(1 / mse)


def test_rgba_metrics_hand_computed_alpha_error():
    """Black, opaque ground truth; the prediction is black at alpha 0.5: over background c the
    composites differ by 0.5·c, so MSE = 0.25·mean(c²)."""
    from editkit.eval.metrics.rgba import rgba_metrics

    target = np.zeros((16, 16, 4))
    target[..., 3] = 1
    pred = target.copy()
    pred[..., 3] = 0.5
    got = rgba_metrics(pred, target)
    g = 128 / 255
    per_bg = [100.0, _psnr(0.25), *[_psnr(0.25 / 3)] * 3, *[_psnr(0.25 * 2 / 3)] * 3, _psnr(0.25 * g * g)]
    assert got["rgba_psnr"] == pytest.approx(sum(per_bg) / 9, rel=1e-9)
    assert got["rgba_psnr_white"] == pytest.approx(_psnr(0.25), rel=1e-9)
    assert got["alpha_iou"] == pytest.approx(0.5)
    assert got["rgba_l1"] == pytest.approx(0.0)


def test_rgba_metrics_hand_computed_colour_error():
    """Left half opaque and off by 0.1, right half transparent and off by 0.3: only the visible
    error counts, in the weighted L1 and in every composite (MSE 0.01 over half the pixels)."""
    from editkit.eval.metrics.rgba import rgba_metrics

    target = np.full((16, 16, 4), 0.5)
    target[:, :8, 3], target[:, 8:, 3] = 1.0, 0.0
    pred = target.copy()
    pred[:, :8, :3] += 0.1
    pred[:, 8:, :3] += 0.3
    got = rgba_metrics(pred, target)
    assert got["rgba_l1"] == pytest.approx(0.1)
    assert got["alpha_iou"] == pytest.approx(1.0)
    assert got["rgba_psnr"] == pytest.approx(_psnr(0.005), rel=1e-9)
    assert got["rgba_psnr_white"] == pytest.approx(_psnr(0.005), rel=1e-9)


def test_rgba_ssim_is_the_mean_of_torchmetrics_over_the_backgrounds():
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    from editkit.eval.metrics.rgba import rgba_metrics

    rng = np.random.default_rng(0)
    target = rng.random((24, 20, 4))
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)

    def t(a):
        return torch.from_numpy(a).permute(2, 0, 1)[None].float()

    want = np.mean([float(ssim(t(over_background(pred, c)), t(over_background(target, c)), data_range=1.0))
                    for c in BACKGROUNDS.values()])
    got = rgba_metrics(pred, target)
    assert got["rgba_ssim"] == pytest.approx(want, abs=1e-5)
    assert rgba_metrics(target, target)["rgba_ssim"] == pytest.approx(1.0, abs=1e-6)
    empty = np.zeros((8, 8, 4))
    assert rgba_metrics(empty, empty)["alpha_iou"] == 1.0 and math.isnan(rgba_metrics(empty, empty)["rgba_l1"])


def _rgba_png(path, array):
    from PIL import Image

    Image.fromarray(np.rint(array * 255).astype(np.uint8), "RGBA").save(path)
    return path


def test_eval_scores_rgba_predictions_and_keeps_rgb_metrics(tmp_path):
    from editkit.data.manifest import write_manifest
    from editkit.data.records import EditRecord
    from editkit.eval.metrics.pixel import pixel_metrics
    from editkit.eval.metrics.rgba import COLUMNS, rgba_metrics
    from editkit.eval.runner import evaluate

    rng = np.random.default_rng(1)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    records = []
    for i in range(2):
        target = rng.random((24, 32, 4))
        target[..., 3] = (rng.random((24, 32)) > 0.5) * 1.0
        pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
        _rgba_png(tmp_path / "pred" / f"s{i}.png", pred)
        records.append(EditRecord(id=f"s{i}", instruction="", target=_rgba_png(tmp_path / "gt" / f"s{i}.png", target)))
    manifest = write_manifest(records, tmp_path / "targets.jsonl")
    summary = evaluate([tmp_path / "pred"], records, tmp_path / "eval", ["rgba", "pixel"], show_progress=False,
                       manifest=manifest)
    with open(tmp_path / "eval" / "per_sample.csv") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    for record in records:
        def load(path, mode):
            from PIL import Image

            from editkit.data.images import load_image

            img = load_image(path, mode) if mode == "RGB" else Image.open(path).convert("RGBA")
            return np.asarray(img, dtype=np.float64) / 255.0

        row = rows[record.id]
        pred, target = tmp_path / "pred" / f"{record.id}.png", record.target
        want = rgba_metrics(load(pred, "RGBA"), load(target, "RGBA"))
        for column in COLUMNS:  # per_sample.csv holds 6 significant digits
            assert float(row[column]) == pytest.approx(want[column], rel=1e-5), column
        # the RGB metrics still see the images over white, as before
        assert float(row["psnr"]) == pytest.approx(pixel_metrics(load(pred, "RGB"), load(target, "RGB"))["psnr"],
                                                   rel=1e-5)
        assert float(row["psnr"]) == pytest.approx(want["rgba_psnr_white"], abs=0.2)  # 8-bit vs float composite
    assert set(COLUMNS) <= set(summary["runs"]["pred"]["means"])


# ---- the rgba_vae stage ---------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """The tiny VAE's convolutions gain little from a second thread, and on a loaded 2-core
    machine two threads ran a training step 20x slower than one (0.37 against 8.5 steps/s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """synth -> prep -> validate: 108 scenes at 32 px, 100 for train and 8 for val."""
    from editkit.layers.prep import prepare_layers
    from editkit.layers.synth import synthesize_layers
    from editkit.layers.validate import validate_prepared

    root = tmp_path_factory.mktemp("layered")
    synthesize_layers(root / "scenes", n=108, size=32, seed=0, progress=False)
    prepare_layers(root / "scenes", root / "prep", 100, 8, multiple=16, max_side=32, progress=False)
    assert validate_prepared(root / "prep").ok
    return root / "prep"


def _stage_cfg(out, data, vae, **loop):
    from editkit.train.config import validate_config

    return validate_config({
        "stage": "rgba_vae", "output_dir": str(out), "seed": 0,
        "data": {"train": [{"manifest": str(data)}], "batch_size": 4},
        "rgba_vae": {"rgb_checkpoint": str(vae)},
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "loop": {"max_steps": 4, "checkpoint_every": 1000, "tensorboard": False, "mixed_precision": "no",
                 "val_samples": 8, **loop}})


def _rows(out):
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def _eval_means(vae, data, out):
    from editkit.data.manifest import read_manifest
    from editkit.eval.runner import evaluate
    from editkit.layers.vae_recon import reconstruct_prepared

    manifest = reconstruct_prepared(vae, data, out / "recon", split="val", device="cpu", progress=False)
    summary = evaluate([out / "recon" / "pred"], read_manifest(manifest), out / "eval", ["rgba"],
                       show_progress=False, manifest=manifest)
    return summary["runs"]["pred"]["means"]


@pytest.mark.slow
def test_training_raises_the_nine_background_psnr(layered, rgba_vae, tmp_path, one_thread):
    """prep -> train -> eval: 300 steps lift the 9-background PSNR of the val reconstructions well
    above the converted, untrained VAE's (measured: 9.2 -> 15.8 dB; val loss 2.45 -> 0.47)."""
    from editkit.train.rgba_vae_stage import RgbaVaeTask
    from editkit.train.trainer import train

    steps = 300
    out = tmp_path / "run"
    cfg = _stage_cfg(out, layered, rgba_vae, max_steps=steps, validate_every=steps)
    untrained = RgbaVaeTask(cfg, "cpu").validation_loss(cfg.seed)
    train(cfg, progress=False)
    row = _rows(out)[steps]
    assert (out / "outputs" / "val" / f"val_recon_step_{steps}.png").is_file()
    assert load_rgba_vae(out / "final" / "vae").config.input_channels == 4
    before = _eval_means(rgba_vae, layered, tmp_path / "before")
    after = _eval_means(out / "final" / "vae", layered, tmp_path / "after")
    assert after["rgba_psnr"] > before["rgba_psnr"] + 4.0, (before, after)
    assert float(row["val_loss"]) < 0.5 * untrained["loss"]
    assert untrained["rgba_psnr"] == pytest.approx(before["rgba_psnr"], rel=1e-5)
    # validation scored the same images the same way as `editkit eval`
    assert float(row["val_rgba_psnr"]) == pytest.approx(after["rgba_psnr"], rel=1e-5)
    assert float(row["val_alpha_iou"]) == pytest.approx(after["alpha_iou"], rel=1e-5)


def test_resume_after_a_stop_gives_the_same_weights(layered, rgba_vae, tmp_path, one_thread):
    from safetensors.torch import load_file

    from editkit.train.trainer import train

    train(_stage_cfg(tmp_path / "whole", layered, rgba_vae, validate_every=2), progress=False)
    cut = _stage_cfg(tmp_path / "cut", layered, rgba_vae, validate_every=2, checkpoint_every=2)
    train(cut, stop_after=3, progress=False)  # killed after step 3: step 3 is redone from step 2
    assert train(cut, resume="latest", progress=False)["resumed_from"].endswith("step-000002")
    whole, resumed = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert float(resumed[step]["loss"]) == pytest.approx(float(whole[step]["loss"]), rel=1e-6, abs=1e-7), step
    for step in (2, 4):
        for column in ("val_loss", "val_rgba_psnr", "val_rgba_ssim", "val_rgba_psnr_white", "val_rgba_l1",
                       "val_alpha_iou"):
            assert float(resumed[step][column]) == pytest.approx(float(whole[step][column]), rel=1e-6), column
        assert (tmp_path / "cut" / "outputs" / "val" / f"val_recon_step_{step}.png").is_file()
    a = load_file(tmp_path / "whole" / "final" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], msg=key)


def test_stage_config_mistakes_are_one_line(layered, rgba_vae, tmp_path):
    from editkit.layers.prep import prepare_layers
    from editkit.train.config import validate_config
    from editkit.train.rgba_vae_stage import RgbaVaeTask

    base = {"stage": "rgba_vae", "output_dir": str(tmp_path / "o"), "data": {"train": [{"manifest": str(layered)}]}}
    with pytest.raises(UserError, match="rgba_vae.rgb_checkpoint"):
        validate_config(base)
    with pytest.raises(UserError, match="one folder written by `editkit layers prep`"):
        validate_config({**base, "rgba_vae": {"rgb_checkpoint": str(rgba_vae)},
                         "data": {"train": [{"manifest": str(layered)}, {"manifest": str(layered)}]}})
    with pytest.raises(UserError, match="lpips_weights"):
        validate_config({**base, "rgba_vae": {"rgb_checkpoint": str(rgba_vae), "lpips_weight": 0.1}})
    no_val = prepare_layers(layered.parent / "scenes", tmp_path / "no-val", 4, 0, multiple=16, max_side=32,
                            progress=False).manifest.parent.parent
    with pytest.raises(UserError, match="no val split") as err:
        RgbaVaeTask(_stage_cfg(tmp_path / "o", no_val, rgba_vae, validate_every=2), "cpu")
    assert "\n" not in str(err.value)


def test_the_task_implements_the_protocol(layered, rgba_vae, tmp_path):
    import inspect

    from editkit.train.rgba_vae_stage import RgbaVaeTask
    from editkit.train.task import BatchSampler, Task
    from editkit.train.trainer import validation_columns

    task = RgbaVaeTask(_stage_cfg(tmp_path / "o", layered, rgba_vae), "cpu")
    assert isinstance(task, Task) and isinstance(task.sampler, BatchSampler)
    for name in [n for n, v in vars(Task).items() if callable(v) and not n.startswith("_")]:
        assert len(inspect.signature(getattr(RgbaVaeTask, name)).parameters) == \
            len(inspect.signature(getattr(Task, name)).parameters), name
    batch = task.next_batch(torch.Generator().manual_seed(0))
    assert batch.shape[0] == 4 and batch.shape[1] == 4
    assert validation_columns({"loss": 1.0, "rgba_psnr": 2.0}) == {"val_loss": 1.0, "val_rgba_psnr": 2.0}
    assert validation_columns(0.5) == {"val_loss": 0.5} and validation_columns(None) == {}
    # an export from a sharded run's gathered weights equals the plain export
    from safetensors.torch import load_file

    from editkit.train.trainable import trainable_state_dict

    task.export(task.module, tmp_path / "plain", 0)
    task.export_gathered(trainable_state_dict(task.module), tmp_path / "gathered", 0)
    a = load_file(tmp_path / "plain" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "gathered" / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
