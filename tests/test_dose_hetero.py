"""Heterogeneity: a lung slab upstream shifts the depth dose by its radiological thickness."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.plan_dose import plan_dose
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Beam, ControlPoint, Plan


def _cax(rho: Volume, bm):
    body = np.zeros(rho.grid.shape, bool)
    body[:, :, rho.grid.shape[2] // 2] = True
    f = (-50.0, 50.0)
    beam = Beam(1, "b", 0.0, 0.0, 0.0, np.zeros(3), [ControlPoint(0, 0.0, f, f),
                                                      ControlPoint(1, 1.0, f, f)], 1.0)
    d = plan_dose(rho, Plan("t", [beam], "1"), beam_model=bm, dose_grid_spacing_mm=None,
                  body_mask=body)
    g = d.grid
    y = g.origin[1] + g.spacing[1] * np.arange(g.shape[1])
    return y, d.array[g.shape[0] // 2, :, g.shape[2] // 2].astype(np.float64)


def test_lung_slab_dose_follows_radiological_depth():
    bm = load_beam_model()
    g = Grid((1, 250, 3), origin=[-1.0, 0.5, 0.0], spacing=[1.0, 1.0, 1.0])
    water = Volume(np.ones(g.shape, np.float32), g, "relative electron density")
    lung = water.copy()
    y = g.origin[1] + np.arange(g.shape[1])
    lung.array[:, (y > 30) & (y < 80), :] = 0.25  # 50 mm of lung from 30 to 80 mm depth
    yw, dw = _cax(water, bm)
    yl, dl = _cax(lung, bm)
    for depth in (100.0, 150.0, 200.0):
        rad = depth - 50.0 * 0.75
        # same radiological depth in water, corrected for inverse square (SSD 100 cm)
        expect = np.interp(rad, yw, dw) * ((1000.0 + rad) / (1000.0 + depth)) ** 2
        got = np.interp(depth, yl, dl)
        assert got == pytest.approx(expect, rel=0.03)
        assert got > 1.1 * np.interp(depth, yw, dw)  # clearly more than the water dose
    # upstream of the slab nothing changes
    assert np.interp(20.0, yl, dl) == pytest.approx(np.interp(20.0, yw, dw), rel=1e-6)
