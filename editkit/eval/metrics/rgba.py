"""RGBA reconstruction metrics: the AlphaVAE protocol, alpha-weighted RGB L1 and alpha soft IoU.

Images are straight-alpha float arrays in [0, 1], shape (H, W, 4). The AlphaVAE protocol
composites prediction and ground truth over each of the 9 solid backgrounds of
`editkit.layers.rgba_vae.BACKGROUNDS` and scores the two RGB composites with the pixel metrics
(`editkit.eval.metrics.pixel`: PSNR from the MSE, capped at 100 dB; torchmetrics' SSIM), then
averages over the backgrounds:

- `rgba_psnr`, `rgba_ssim`: the mean over the 9 backgrounds of PSNR and of SSIM;
- `rgba_psnr_white`: PSNR of the composites over white alone;
- `rgba_l1`: sum(a_G · |rgb_P − rgb_G|) / (3 · sum(a_G)), the RGB error where the ground truth is
  visible (NaN when it is fully transparent);
- `alpha_iou`: sum(min(a_P, a_G)) / sum(max(a_P, a_G)), the soft IoU of the alpha mattes (1 when
  both are fully transparent).
"""

from __future__ import annotations

import numpy as np

from editkit.eval.metrics.pixel import psnr_from_mse, ssim_map
from editkit.layers.rgba_vae import BACKGROUNDS, over_background

COLUMNS = ("rgba_psnr", "rgba_ssim", "rgba_psnr_white", "rgba_l1", "alpha_iou")


def alpha_weighted_l1(pred: np.ndarray, target: np.ndarray) -> float:
    weight = target[..., 3:]
    total = float(weight.sum()) * 3
    return float((np.abs(pred[..., :3] - target[..., :3]) * weight).sum() / total) if total > 0 else float("nan")


def alpha_soft_iou(pred: np.ndarray, target: np.ndarray) -> float:
    a, b = pred[..., 3], target[..., 3]
    union = float(np.maximum(a, b).sum())
    return float(np.minimum(a, b).sum()) / union if union > 0 else 1.0


def rgba_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """All columns of this module for one prediction and its ground truth (both (H, W, 4) in [0, 1])."""
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[2] != 4:
        raise ValueError(f"pred {pred.shape} and target {target.shape}: both must be (H, W, 4) of one size")
    pred = pred.astype(np.float64)
    target = target.astype(np.float64)
    psnr, ssim = {}, {}
    for name, colour in BACKGROUNDS.items():
        p, t = over_background(pred, colour), over_background(target, colour)
        psnr[name] = psnr_from_mse(float(np.mean((p - t) ** 2)))
        ssim[name] = float(np.mean(ssim_map(p, t)))
    return {"rgba_psnr": float(np.mean(list(psnr.values()))), "rgba_ssim": float(np.mean(list(ssim.values()))),
            "rgba_psnr_white": psnr["white"], "rgba_l1": alpha_weighted_l1(pred, target),
            "alpha_iou": alpha_soft_iou(pred, target)}
