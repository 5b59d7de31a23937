"""Bootstrap confidence intervals for means and paired differences (percentile method)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}mean": self.mean, f"{prefix}low": self.low, f"{prefix}high": self.high, f"{prefix}n": self.n}


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan, 0)


def bootstrap_mean(values, n_boot: int = 2000, confidence: float = 0.95,
                   rng: np.random.Generator | int | None = 0) -> Interval:
    """Mean of the finite values and its percentile-bootstrap interval (resampling samples with
    replacement, `n_boot` times). A single value gives a zero-width interval; none gives NaN."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return NAN_INTERVAL
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(mean, float(low), float(high), int(x.size))


def paired_difference(a, b, n_boot: int = 2000, confidence: float = 0.95,
                      rng: np.random.Generator | int | None = 0) -> Interval:
    """Mean of a - b over pairs where both are finite, with a bootstrap interval over pairs."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return bootstrap_mean(a[ok] - b[ok], n_boot, confidence, rng)
