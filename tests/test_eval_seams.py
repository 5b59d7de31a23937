"""Seam and ghosting scores on hand-made images with known behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest

from editkit.eval.metrics.seams import boundary_distance, seam_metrics

H = 64
Y, X = np.mgrid[:H, :H]
MASK = (abs(X - 32) < 12) & (abs(Y - 32) < 12)


def _img(value=0.5):
    return np.full((H, H, 3), value)


@pytest.fixture
def scene():
    source = _img()
    source[(abs(X - 32) < 6) & (abs(Y - 32) < 6)] = 0.9  # a square object
    target = _img()
    target[(X - 32) ** 2 + (Y - 32) ** 2 < 64] = 0.1  # replaced by a disc
    return source, target


def test_boundary_distance_is_symmetric_around_the_contour():
    d = boundary_distance(MASK)
    assert d[32, 32] > 10 and d[0, 0] > 10
    assert d[32, 21] == 1 and d[32, 20] == 1  # first pixel inside / outside the left edge
    assert d[32, 19] == 2


def test_perfect_fusion_has_no_seam_and_no_ghost(scene):
    source, target = scene
    got = seam_metrics(target, MASK, source, target)
    assert got["seam"] < 1.0  # the boundary band is flat; the disc's edge lies in the ring
    assert got["seam_excess"] == pytest.approx(0.0, abs=1e-9)
    assert got["ghost"] == 0.0


def test_flat_image_gives_a_ratio_of_one():
    assert seam_metrics(_img(), MASK)["seam"] == pytest.approx(1.0)


def test_brightness_step_along_the_mask_is_a_seam(scene):
    source, target = scene
    stepped = target.copy()
    stepped[MASK] += 0.2
    got = seam_metrics(stepped, MASK, source, target)
    assert got["seam"] > 1.5
    assert got["seam_excess"] > 0.5


def test_soft_blend_scores_lower_than_a_hard_step(scene):
    from scipy import ndimage

    source, target = scene
    hard = target.copy()
    hard[MASK] += 0.2
    soft_alpha = ndimage.gaussian_filter(MASK.astype(float), 4)[..., None]
    soft = target + 0.2 * soft_alpha
    assert seam_metrics(soft, MASK, source, target)["seam"] < seam_metrics(hard, MASK, source, target)["seam"]


def test_double_exposure_is_ghosting(scene):
    source, target = scene
    double = (source + target) / 2  # the old square shows through the new disc
    assert seam_metrics(double, MASK, source, target)["ghost"] > 0.2


def test_without_mask_scores_are_nan(scene):
    source, target = scene
    assert all(math.isnan(v) for v in seam_metrics(target, None, source, target).values())
    assert math.isnan(seam_metrics(target, MASK)["ghost"])  # no source: no ghost score
