"""The registration metrics every test and benchmark uses (adaptive.registration.evaluate),
against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.registration.evaluate import dice, tre


def test_dice_of_two_overlapping_boxes():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[0:4, 0:5, 0:5] = True       # 100 voxels
    b[2:6, 0:5, 0:5] = True       # 100 voxels, 50 shared
    assert dice(a, b) == pytest.approx(2 * 50 / 200)
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_tre_of_a_known_error_field():
    truth = np.zeros((4, 5, 6, 3))
    got = truth.copy()
    got[..., 0] = 3.0            # 3 mm error everywhere ...
    got[0, ..., 1] = 4.0         # ... and 5 mm (3-4-5) on the first slice
    mask = np.ones((4, 5, 6), bool)
    r = tre(got, truth, mask)
    assert r["n"] == 120 and r["max_mm"] == pytest.approx(5.0)
    assert r["mean_mm"] == pytest.approx((90 * 3.0 + 30 * 5.0) / 120)
