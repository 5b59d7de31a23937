"""Run-level distribution metrics: FID and KID between predictions and ground truths, computed by
torchmetrics with EfficientNet-Lite0 as the feature extractor (not Inception: the numbers are
comparable between editkit runs, not with published Inception-FID values).

Features come from the per-sample cache, so they are fed to torchmetrics through an identity
"extractor"; `fid_kid_from_images` runs the real extractor inside torchmetrics and is what the
cached route is tested against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from editkit.eval.metrics.efficientnet import FEATURE_DIM


class CachedFeatures(nn.Module):
    """Pass-through 'extractor' for features computed earlier."""

    def __init__(self, num_features: int = FEATURE_DIM):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _metrics(extractor: nn.Module, n: int):
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=extractor, normalize=True).double()
    with warnings.catch_warnings():  # "KID keeps all features in memory": expected, they are few
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subset_size=min(1000, n), normalize=True)
    return fid, kid


def _result(fid, kid) -> dict[str, float]:
    kid_mean, kid_std = kid.compute()
    return {"fid_effnet": float(fid.compute()), "kid_effnet": float(kid_mean), "kid_effnet_std": float(kid_std)}


def fid_kid_from_features(real: np.ndarray, fake: np.ndarray, device=None) -> dict[str, float]:
    """FID/KID from (N, D) feature arrays (D = 1280 for EfficientNet-Lite0); NaN with fewer than 2 pairs.
    `device`: where torchmetrics computes (FID's DxD eigen-decomposition is much faster on a GPU)."""
    n = min(len(real), len(fake))
    if n < 2:
        return {"fid_effnet": math.nan, "kid_effnet": math.nan, "kid_effnet_std": math.nan}
    fid, kid = _metrics(CachedFeatures(np.shape(real)[1]), n)
    device = torch.device(device or "cpu")
    fid, kid = fid.to(device), kid.to(device)
    real_t = torch.from_numpy(np.asarray(real, np.float64)).to(device)
    fake_t = torch.from_numpy(np.asarray(fake, np.float64)).to(device)
    for metric in (fid, kid):
        metric.update(real_t, real=True)
        metric.update(fake_t, real=False)
    return _result(fid, kid)


def fid_kid_from_images(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module) -> dict[str, float]:
    """FID/KID with the extractor run by torchmetrics on (N, 3, H, W) images in [0, 1]."""
    fid, kid = _metrics(extractor, min(len(real), len(fake)))
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    return _result(fid, kid)
