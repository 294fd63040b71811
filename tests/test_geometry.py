"""Grid/Volume geometry: index<->LPS transforms, resampling, warping against analytic truth."""

import numpy as np
import pytest

from adaptive.errors import GeometryError
from adaptive.geometry import Grid, Volume, displacement_warp


def rot_z(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def test_index_lps_roundtrip_with_oblique_direction():
    g = Grid((7, 9, 11), origin=[-12.5, 30.0, 100.0], spacing=[1.5, 2.0, 3.0], direction=rot_z(30))
    ijk = np.random.default_rng(0).uniform(0, 6, size=(50, 3))
    assert np.allclose(g.lps_to_ijk(g.ijk_to_lps(ijk)), ijk)
    # index (1,0,0) is one column step along the first direction column
    p = g.ijk_to_lps([1, 0, 0]) - g.origin
    assert np.allclose(p, 1.5 * rot_z(30)[:, 0])


def test_voxel_centers_match_transform():
    g = Grid((3, 4, 5), origin=[1, 2, 3], spacing=[1, 2, 3])
    c = g.voxel_centers_lps()
    assert c.shape == (3, 4, 5, 3)
    assert np.allclose(c[2, 3, 4], [1 + 4, 2 + 6, 3 + 6])


def test_invalid_grid_rejected():
    with pytest.raises(GeometryError):
        Grid((3, 4, 5), origin=[0, 0, 0], spacing=[1, 0, 1])
    with pytest.raises(GeometryError):
        Grid((3, 4, 5), origin=[0, 0, 0], spacing=[1, 1, 1], direction=np.ones((3, 3)))
    with pytest.raises(GeometryError):
        Volume(np.zeros((2, 2, 2)), Grid((3, 4, 5), origin=[0, 0, 0], spacing=[1, 1, 1]))


def test_linear_resampling_reproduces_linear_function_exactly():
    src = Grid((20, 22, 24), origin=[-30, -20, -10], spacing=[2.5, 2.0, 3.0])
    f = lambda p: 2.0 * p[..., 0] - 0.5 * p[..., 1] + 0.25 * p[..., 2] + 7  # noqa: E731
    vol = Volume(f(src.voxel_centers_lps()).astype(np.float64), src)
    dst = Grid((10, 12, 14), origin=[-20, -10, 0], spacing=[1.7, 1.3, 2.1], direction=rot_z(10))
    out = vol.resample_to(dst, order=1)
    assert np.allclose(out.array, f(dst.voxel_centers_lps()), atol=1e-4)


def test_nearest_resampling_of_mask_and_outside_fill():
    src = Grid((10, 10, 10), origin=[0, 0, 0], spacing=[1, 1, 1])
    m = np.zeros(src.shape, bool)
    m[2:5, 3:6, 4:7] = True
    vol = Volume(m, src)
    dst = Grid((10, 10, 10), origin=[1, 0, 0], spacing=[1, 1, 1])  # shifted by one column
    out = vol.resample_to(dst, order=0)
    assert out.array.dtype == bool
    assert out.array.sum() == m.sum()
    assert out.array[2:5, 3:6, 3:6].all()
    # points beyond the grid take the fill value
    assert Volume(np.ones(src.shape), src).sample_lps([[50.0, 0, 0]], fill=-1)[0] == -1


def test_displacement_warp_pulls_back_a_translation():
    g = Grid((16, 16, 16), origin=[0, 0, 0], spacing=[2, 2, 2])
    f = lambda p: np.sin(p[..., 0] / 7.0) + p[..., 1] / 10.0  # noqa: E731
    moving = Volume(f(g.voxel_centers_lps()), g)
    u = np.zeros(g.shape + (3,))
    u[..., 0] = 3.0  # fixed point x corresponds to moving point x + (3, 0, 0)
    warped = displacement_warp(moving, u, g)
    inner = (slice(2, -2),) * 2 + (slice(2, -4),)
    expect = f(g.voxel_centers_lps() + u)
    assert np.allclose(warped.array[inner], expect[inner], atol=0.02)


def test_crop_to_box_keeps_positions():
    g = Grid((10, 12, 14), origin=[-5, -6, -7], spacing=[1, 1, 2])
    v = Volume(np.arange(g.n_voxels, dtype=float).reshape(g.shape), g)
    c = v.crop_to_box([-2, -3, -3], [3, 2, 5])
    p = c.grid.ijk_to_lps([0, 0, 0])
    assert np.isclose(v.sample_lps([p], order=0)[0], c.array[0, 0, 0])
