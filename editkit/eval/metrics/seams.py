"""Seam and ghosting scores for mask-fused outputs (per sample; NaN without a mask).

All on luminance in [0, 1]. Let d(x) be the distance of pixel x to the mask boundary (Euclidean,
from the distance transforms of the mask and of its complement).

- seam: mean Sobel gradient magnitude of the prediction in the boundary band (d <= 2 px, both
  sides) divided by its mean in the surrounding ring (2 < d <= 8 px). About 1 when the boundary is
  invisible; well above 1 when a step runs along the mask contour.
- seam_excess: seam of the prediction minus seam of the reference (the ground truth, else the
  first source) — the part of the boundary contrast that the reference does not have (the mask
  contour may legitimately follow an object's outline).
  Both ratios add 1e-3 to numerator and denominator so flat areas give 1.
- ghost: among the prediction's edge pixels (Canny, sigma 1.5) inside the edit region (mask
  dilated by 2 px), the fraction that lie on a source edge (within 1 px) but not on a ground-truth
  edge (within 1 px): leftover structure of the source showing through the edit — doubled edges.
  Without a ground truth the last condition is dropped (an upper bound: kept edges count too).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

BAND_PX = 2
RING_PX = 8
EDGE_SIGMA = 1.5
GRAD_EPS = 1e-3  # flat surroundings give a ratio of 1, not 0/0
COLUMNS = ("seam", "seam_excess", "ghost")


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3] @ np.array([0.299, 0.587, 0.114])


def boundary_distance(mask: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the mask boundary (inside and outside)."""
    return np.where(mask, ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))


def seam_ratio(gray: np.ndarray, distance: np.ndarray) -> float:
    from skimage.filters import sobel

    grad = sobel(gray)
    band = distance <= BAND_PX
    ring = (distance > BAND_PX) & (distance <= RING_PX)
    if not band.any() or not ring.any():
        return math.nan
    return float((grad[band].mean() + GRAD_EPS) / (grad[ring].mean() + GRAD_EPS))


def _edges(gray: np.ndarray) -> np.ndarray:
    from skimage.feature import canny

    return canny(gray, sigma=EDGE_SIGMA)


def ghost_fraction(pred: np.ndarray, source: np.ndarray, target: np.ndarray | None, mask: np.ndarray) -> float:
    region = ndimage.binary_dilation(mask, iterations=BAND_PX)
    pred_edges = _edges(pred) & region
    if not pred_edges.any():
        return 0.0
    leftover = pred_edges & ndimage.binary_dilation(_edges(source))
    if target is not None:
        leftover &= ~ndimage.binary_dilation(_edges(target))
    return float(leftover.sum() / pred_edges.sum())


def seam_metrics(pred: np.ndarray, mask: np.ndarray | None, source: np.ndarray | None = None,
                 target: np.ndarray | None = None) -> dict[str, float]:
    """pred/source/target: (H, W, 3) floats in [0, 1] of one size; mask: bool (H, W), True = edit."""
    out = dict.fromkeys(COLUMNS, math.nan)
    if mask is None or not mask.any() or mask.all():
        return out
    distance = boundary_distance(mask)
    p = luminance(pred)
    out["seam"] = seam_ratio(p, distance)
    reference = target if target is not None else source
    if reference is not None:
        out["seam_excess"] = out["seam"] - seam_ratio(luminance(reference), distance)
    if source is not None:
        out["ghost"] = ghost_fraction(p, luminance(source), None if target is None else luminance(target), mask)
    return out
