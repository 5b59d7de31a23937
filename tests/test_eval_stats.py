"""Bootstrap intervals: coverage on simulated data, paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from editkit.eval.stats import bootstrap_mean, paired_difference


@pytest.mark.parametrize("draw,true_mean", [
    (lambda rng: rng.normal(2.0, 1.0, 50), 2.0),
    (lambda rng: rng.exponential(1.0, 60), 1.0),
])
def test_interval_covers_the_true_mean_at_about_95_percent(draw, true_mean):
    rng = np.random.default_rng(1234)
    hits = 0
    for _ in range(200):
        interval = bootstrap_mean(draw(rng), n_boot=1000, rng=rng)
        hits += interval.low <= true_mean <= interval.high
    assert 0.90 <= hits / 200 <= 0.98


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 5, 40)  # large between-sample spread
    better = base + 0.3 + rng.normal(0, 0.05, 40)  # consistently a bit better
    diff = paired_difference(better, base, rng=1)
    assert diff.low > 0.2 and diff.high < 0.4
    unpaired_low = bootstrap_mean(better, rng=1).low - bootstrap_mean(base, rng=1).high
    assert unpaired_low < 0  # the unpaired intervals overlap; the paired one does not


def test_nan_and_degenerate_inputs():
    assert bootstrap_mean([1.0, math.nan, 3.0]).n == 2
    single = bootstrap_mean([4.0])
    assert (single.mean, single.low, single.high) == (4.0, 4.0, 4.0)
    assert math.isnan(bootstrap_mean([]).mean)
    assert paired_difference([1.0, math.nan], [0.5, 2.0]).n == 1


def test_seeded_intervals_are_reproducible():
    x = np.arange(30.0)
    assert bootstrap_mean(x, rng=7) == bootstrap_mean(x, rng=7)
