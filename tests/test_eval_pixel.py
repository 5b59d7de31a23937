"""Pixel metrics: parity with torchmetrics and scikit-image; masked variants on hand-made images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import metrics as skm
from torchmetrics.functional import mean_absolute_error, mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from editkit.eval.metrics.pixel import pixel_metrics, ssim_map


def _pair(seed=0, shape=(40, 52, 3), noise=0.08):
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    target = (target + np.roll(target, 1, 0) + np.roll(target, 1, 1)) / 3  # some structure
    pred = np.clip(target + rng.normal(0, noise, shape), 0, 1)
    return pred, target


def _t(a):
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_image_metrics_equal_torchmetrics(seed):
    pred, target = _pair(seed)
    got = pixel_metrics(pred, target)
    assert got["mse"] == pytest.approx(float(mean_squared_error(_t(pred), _t(target))), rel=1e-9)
    assert got["mae"] == pytest.approx(float(mean_absolute_error(_t(pred), _t(target))), rel=1e-9)
    assert got["psnr"] == pytest.approx(float(peak_signal_noise_ratio(_t(pred), _t(target), data_range=1.0)), rel=1e-6)
    assert got["ssim"] == pytest.approx(
        float(structural_similarity_index_measure(_t(pred), _t(target), data_range=1.0)), rel=1e-5)


def test_whole_image_metrics_agree_with_scikit_image():
    pred, target = _pair(3)
    got = pixel_metrics(pred, target)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(target, pred), rel=1e-9)
    assert got["psnr"] == pytest.approx(skm.peak_signal_noise_ratio(target, pred, data_range=1.0), rel=1e-9)
    # scikit-image crops the borders instead of reflect-padding: same SSIM up to border effects
    sk = skm.structural_similarity(target, pred, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False)
    assert got["ssim"] == pytest.approx(sk, abs=0.02)


def test_masked_metrics_known_answers():
    """Inside the mask the prediction is off by 0.1, outside by 0.2: region means, not zero-filled."""
    target = np.full((20, 30, 3), 0.5)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 4:16] = True  # 60 of 600 pixels
    pred = target + np.where(mask[..., None], 0.1, 0.2)
    got = pixel_metrics(pred, target, mask)
    assert got["mse_in"] == pytest.approx(0.01)
    assert got["mae_in"] == pytest.approx(0.1)
    assert got["psnr_in"] == pytest.approx(20.0)
    assert got["mse_out"] == pytest.approx(0.04)  # zero-filling the inside would give 0.036
    assert got["mae_out"] == pytest.approx(0.2)
    assert got["psnr_out"] == pytest.approx(10 * math.log10(1 / 0.04))
    assert got["mse"] == pytest.approx((60 * 0.01 + 540 * 0.04) / 600)


def test_background_untouched_gives_perfect_outside_scores():
    pred, target = _pair(4)
    mask = np.zeros(target.shape[:2], bool)
    mask[10:30, 10:40] = True
    pred = np.where(mask[..., None], pred, target)
    got = pixel_metrics(pred, target, mask)
    assert got["mse_out"] == 0.0 and got["mae_out"] == 0.0
    assert got["psnr_out"] == 100.0  # capped: identical pixels
    assert got["mse_in"] > 0
    # SSIM outside = the SSIM map averaged over the outside pixels only
    full = ssim_map(pred, target)
    assert got["ssim_out"] == pytest.approx(full[~mask].mean())
    assert got["ssim_in"] == pytest.approx(full[mask].mean())
    assert got["ssim_out"] > got["ssim_in"]


def test_identical_images_and_missing_mask():
    _, target = _pair(5)
    got = pixel_metrics(target, target)
    assert got["mse"] == 0 and got["psnr"] == 100.0 and got["ssim"] == pytest.approx(1.0)
    assert all(math.isnan(got[k]) for k in ("mse_in", "psnr_out", "ssim_in"))
    empty = pixel_metrics(target, target, np.zeros(target.shape[:2], bool))
    assert math.isnan(empty["mse_in"]) and empty["mse_out"] == 0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="resize first"):
        pixel_metrics(np.zeros((4, 4, 3)), np.zeros((5, 4, 3)))
