"""Plan dose with the scatter components summed on coarse nodes (the default) against the
full kernel at every voxel (``scatter_node_mm=None``): issue 14's accuracy limits (<= 1 % at
the target mean, <= 2 % of the maximum elsewhere), on a heterogeneous phantom (lung, bone,
air outside) with a modulated MLC plan, on a 3 mm and a 2 mm dose grid."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.plan_dose import plan_dose, scatter_stride
from adaptive.errors import DoseError
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Beam, ControlPoint, Plan

TARGET_C = np.array([5.0, -10.0, 0.0])   # LPS mm, also the isocenter
TARGET_R = 25.0


@pytest.fixture(scope="module")
def bm():
    return load_beam_model()


@pytest.fixture(scope="module")
def phantom():
    return heterogeneous_phantom()


@pytest.fixture(scope="module")
def plan(bm):
    return modulated_plan(bm)


def heterogeneous_phantom() -> Volume:
    """Elliptic water body (air outside, 2 mm CT voxels) with a lung block and a bone rod."""
    g = Grid((90, 70, 40), origin=[-89.0, -69.0, -39.0], spacing=[2.0, 2.0, 2.0])
    k, j, i = np.indices(g.shape)
    x = g.origin[0] + 2.0 * i
    y = g.origin[1] + 2.0 * j
    z = g.origin[2] + 2.0 * k
    rho = np.full(g.shape, 0.001, np.float32)
    rho[(x / 85.0) ** 2 + (y / 65.0) ** 2 <= 1.0] = 1.0
    rho[(x > 30) & (x < 70) & (y > -40) & (y < 0) & (np.abs(z) < 25)] = 0.25  # lung
    rho[((x + 30.0) ** 2 + (y - 20.0) ** 2 <= 10.0 ** 2)] = 1.6  # bone rod along z
    return Volume(rho, g, "relative electron density")


def modulated_plan(bm) -> Plan:
    """Five beams (one with a collimator rotation), three MLC segments each, of different
    shapes and MU."""
    lb = np.asarray(bm.mlc.leaf_boundaries_mm, dtype=float)
    centres = 0.5 * (lb[:-1] + lb[1:])
    rng = np.random.default_rng(11)
    beams = []
    angles = [(0.0, 0.0), (72.0, 0.0), (144.0, 20.0), (216.0, 0.0), (288.0, 0.0)]
    for number, (gantry, coll) in enumerate(angles, 1):
        cps, w = [], 0.0
        weights = rng.uniform(0.5, 1.5, 3)
        weights /= weights.sum()
        for s in range(3):
            open_ = np.abs(centres) < 30.0
            a = np.where(open_, -rng.uniform(5.0, 30.0, len(centres)), 0.0)
            b = np.where(open_, rng.uniform(5.0, 30.0, len(centres)), 0.0)
            jaw = ((-35.0, 35.0), (-30.0, 30.0))
            cps.append(ControlPoint(2 * s, w, *jaw, a, b))
            w += weights[s]
            cps.append(ControlPoint(2 * s + 1, w, *jaw, a, b))
        beams.append(Beam(number, f"B{number}", gantry, coll, 0.0, TARGET_C.copy(), cps, 100.0,
                          beam_type="DYNAMIC"))
    return Plan("nodes", beams, "1")


@pytest.mark.parametrize("spacing", [3.0, 2.0])
def test_coarse_scatter_within_the_issue_limits_of_the_full_kernel(phantom, plan, bm, spacing):
    assert scatter_stride([spacing] * 3) >= 2          # the coarse path is what is tested
    tm: dict = {}
    fast = plan_dose(phantom, plan, beam_model=bm, dose_grid_spacing_mm=spacing, timings=tm)
    full = plan_dose(phantom, plan, beam_model=bm, dose_grid_spacing_mm=spacing,
                     scatter_node_mm=None)
    assert tm["scatter_s"] > 0.0
    f, r = fast.array.astype(np.float64), full.array.astype(np.float64)
    assert r.max() > 0.5                                     # a real dose (Gy)
    pts = full.grid.voxel_centers_lps()
    target = np.linalg.norm(pts - TARGET_C, axis=-1) < TARGET_R
    rel_mean = abs(f[target].mean() - r[target].mean()) / r[target].mean()
    worst = np.abs(f - r).max() / r.max()
    # issue 14: <= 1 % at the target mean, <= 2 % of the maximum elsewhere. Measured on
    # this phantom (3 / 2 mm grid): target mean 0.021 / 0.026 %, worst voxel 0.15 / 0.20 %
    # of the maximum, 99th percentile 0.04 / 0.05 %; the worst voxel is held to 0.5 % here
    assert rel_mean <= 0.01, rel_mean
    assert worst <= 0.005, worst
    # outside the body both are 0
    assert np.array_equal(f == 0, r == 0)


def test_stride_rule():
    assert scatter_stride([3.0] * 3) == 2
    assert scatter_stride([2.0] * 3) == 3
    assert scatter_stride([2.5] * 3) == 2
    assert scatter_stride([4.0] * 3) == 1       # coarser than the nodes: every voxel
    assert scatter_stride([3.0] * 3, None) == 1
    assert scatter_stride([1.0, 1.0, 3.0]) == 2  # the widest axis decides
    with pytest.raises(DoseError):
        scatter_stride([3.0] * 3, 0.0)
