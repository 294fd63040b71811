"""Siddon ray tracer: exact radiological path lengths against analytic values."""

from __future__ import annotations

import numpy as np

from adaptive.dose.raytrace import radiological_path_lengths
from adaptive.geometry.volume import Grid, Volume


def _box_chord(s, e, lo, hi):
    d = e - s
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = (lo - s) / d
        t1 = (hi - s) / d
    tmin = np.clip(np.nanmax(np.minimum(t0, t1), axis=1), 0, 1)
    tmax = np.clip(np.nanmin(np.maximum(t0, t1), axis=1), 0, 1)
    return np.maximum(tmax - tmin, 0) * np.linalg.norm(d, axis=1)


def test_random_rays_through_box_match_analytic_chord():
    g = Grid((20, 30, 40), origin=[-10, 5, 3], spacing=[2.0, 3.0, 2.5])
    a = np.zeros(g.shape, np.float32)
    a[5:15, 10:20, 10:30] = 1.0  # box of voxels (k, j, i)
    vol = Volume(a, g)
    lo = g.ijk_to_lps([9.5, 9.5, 4.5])
    hi = g.ijk_to_lps([29.5, 19.5, 14.5])
    rng = np.random.default_rng(0)
    s = rng.uniform(-300, 300, (2000, 3))
    e = rng.uniform(-300, 300, (2000, 3))
    e[:500] = rng.uniform(lo, hi, (500, 3))  # many rays ending inside the box
    got = radiological_path_lengths(vol, s, e)
    want = _box_chord(s, e, lo, hi)
    assert np.count_nonzero(want) > 500
    assert np.allclose(got, want, atol=1e-6)


def test_axis_aligned_slabs_and_density_weighting():
    g = Grid((3, 3, 100), origin=[0.5, -1, -1], spacing=[1.0, 1.0, 1.0])
    a = np.ones(g.shape, np.float32)
    a[:, :, 20:50] = 0.25  # lung slab x in [19.5+0.5, ...]: voxels 20..49 span x 20..50 mm
    vol = Volume(a, g)
    # ray along +x from outside to x = 80 mm (inside voxel 79)
    got = radiological_path_lengths(vol, [-500.0, 0.0, 0.0], [80.0, 0.0, 0.0])[0]
    assert np.isclose(got, 20.0 + 0.25 * 30.0 + 30.0)  # 0..20 water, 20..50 lung, 50..80 water
    # exactly along a voxel boundary plane (y = -0.5) is still finite and bounded
    b = radiological_path_lengths(vol, [-10.0, -0.5, 0.0], [80.0, -0.5, 0.0])[0]
    assert 57.0 <= b <= 57.6


def test_rotated_grid_direction():
    c, s_ = np.cos(0.5), np.sin(0.5)
    d = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1.0]])
    g = Grid((10, 10, 10), origin=[1.0, 2.0, 3.0], spacing=[2.0, 2.0, 2.0], direction=d)
    vol = Volume(np.ones(g.shape, np.float32), g)
    # a ray along the grid's i axis through the centre row: full length 20 mm in the grid
    p0 = g.ijk_to_lps([-10.0, 4.5, 4.5])
    p1 = g.ijk_to_lps([20.0, 4.5, 4.5])
    assert np.isclose(radiological_path_lengths(vol, p0, p1)[0], 20.0)
