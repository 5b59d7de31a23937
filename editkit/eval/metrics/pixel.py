"""Pixel metrics — MSE, MAE, PSNR, SSIM — over the whole image, inside the edit mask and outside it.

Images are float arrays in [0, 1], shape (H, W, 3). The mask is boolean (H, W), True = edit region.
Region metrics average over the region's pixels only (background preservation is computed on the
outside pixels, not by zeroing the inside as PIE-Bench does). SSIM is torchmetrics' SSIM map
(Gaussian window 11, sigma 1.5, data range 1, reflect padding, channel-averaged) averaged over the
region's pixels; over the whole image this equals torchmetrics' SSIM exactly. PSNR (data range 1)
is capped at 100 dB so identical images do not give infinity.
"""

from __future__ import annotations

import math

import numpy as np
import torch

REGIONS = ("", "_in", "_out")  # whole image, inside the mask, outside the mask
BASE = ("mse", "mae", "psnr", "ssim")
COLUMNS = tuple(f"{name}{region}" for region in REGIONS for name in BASE)


def ssim_map(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (H, W), channel-averaged, from torchmetrics (in float32: 14x faster than float64
    on the CPU, and equal to 1e-5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32)).permute(2, 0, 1)[None]
    t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).permute(2, 0, 1)[None]
    _, full = structural_similarity_index_measure(p, t, data_range=1.0, return_full_image=True)
    return full[0].mean(0).double().numpy()


PSNR_CAP_DB = 100.0  # identical images: a finite value keeps means and confidence intervals usable


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for data range 1, capped at 100 dB (MSE below 1e-10, e.g. identical images)."""
    return PSNR_CAP_DB if mse <= 1e-10 else 10.0 * math.log10(1.0 / mse)


def _region_stats(diff: np.ndarray, ssim: np.ndarray, region: np.ndarray | None) -> dict[str, float]:
    if region is not None and not region.any():
        return dict.fromkeys(BASE, math.nan)
    d = diff if region is None else diff[region]
    s = ssim if region is None else ssim[region]
    mse = float(np.mean(d * d))
    return {"mse": mse, "mae": float(np.mean(np.abs(d))), "psnr": psnr_from_mse(mse), "ssim": float(np.mean(s))}


def pixel_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """All pixel metrics; the `_in`/`_out` columns are NaN without a mask or for an empty region."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ; resize first")
    pred = pred.astype(np.float64)
    target = target.astype(np.float64)
    diff = pred - target
    ssim = ssim_map(pred, target)
    out = {}
    for suffix, region in (("", None), ("_in", mask), ("_out", None if mask is None else ~mask)):
        if suffix and mask is None:
            stats = dict.fromkeys(BASE, math.nan)
        else:
            stats = _region_stats(diff, ssim, region)
        out.update({f"{name}{suffix}": value for name, value in stats.items()})
    return out
