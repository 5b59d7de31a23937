"""Over-composition of RGBA layers: the one definition prep, validate, the dataset's users and
the tests share.

Straight (non-premultiplied) alpha, bottom layer first, Porter-Duff "over" in float:
    a = a_s + a_d (1 - a_s),   rgb = (rgb_s a_s + rgb_d a_d (1 - a_s)) / a   (rgb = 0 where a = 0).
Bottom to top over a fully transparent canvas; the result is straight alpha too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def as_float_rgba(layer: np.ndarray) -> np.ndarray:
    """An HxWx4 layer as float32 in [0, 1] (uint8 is divided by 255; floats are taken as they are)."""
    arr = np.asarray(layer)
    if arr.ndim != 3 or arr.shape[2] != 4:
        raise ValueError(f"an RGBA layer is HxWx4, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32, copy=False)


def _planes(layer: np.ndarray) -> np.ndarray:
    """An HxWx4 layer as 4xHxW float32 in [0, 1] (channel planes: the arithmetic below is contiguous)."""
    return np.ascontiguousarray(as_float_rgba(layer).transpose(2, 0, 1))


def composite(layers: Sequence[np.ndarray]) -> np.ndarray:
    """The over-composition of `layers` (bottom to top) as HxWx4 float32 in [0, 1], straight alpha."""
    if not layers:
        raise ValueError("composite needs at least one layer")
    first = _planes(layers[0])
    rgb, alpha = first[:3] * first[3], first[3].copy()  # premultiplied colour
    for layer in layers[1:]:
        src = _planes(layer)
        if src.shape != first.shape:
            raise ValueError(f"layers differ in size: {src.shape[1:]} vs {first.shape[1:]}")
        keep = 1.0 - src[3]
        rgb *= keep
        rgb += src[:3] * src[3]
        alpha *= keep
        alpha += src[3]
    np.divide(rgb, alpha, out=rgb, where=alpha > 0)  # straight colour; 0 where nothing covers
    out = np.empty(first.shape[1:] + (4,), dtype=np.float32)
    out[..., :3] = rgb.transpose(1, 2, 0)
    out[..., 3] = alpha
    return np.clip(out, 0.0, 1.0, out=out)


def premultiplied(layer: np.ndarray) -> np.ndarray:
    """A straight-alpha HxWx4 layer (uint8 or float) as premultiplied float32 in [0, 1]."""
    arr = as_float_rgba(layer).copy()
    arr[..., :3] *= arr[..., 3:]
    return arr


def to_uint8(layer: np.ndarray) -> np.ndarray:
    """Float RGBA in [0, 1] to uint8 (rounded)."""
    return np.clip(np.rint(np.asarray(layer, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def composite_error(layers: Sequence[np.ndarray], stored: np.ndarray) -> float:
    """The largest difference, in 8-bit levels (0..255), between the premultiplied colour and alpha
    of the over-composition of `layers` and of `stored`. Premultiplied, because a pixel's colour
    means nothing where it is transparent. An 8-bit PNG of the exact composite is within 1 level."""
    diff = np.abs(premultiplied(composite(layers)) - premultiplied(stored))
    return float(diff.max()) * 255.0
