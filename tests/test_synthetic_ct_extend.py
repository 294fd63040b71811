"""The synthetic CT completed beyond the CBCT with the rigidly mapped planning CT, against an
analytic planning CT (trilinear interpolation of a linear HU ramp is exact)."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.errors import GeometryError
from adaptive.geometry import Grid, Volume
from adaptive.registration.synthetic_ct import extend_synthetic_ct


def _rigid(deg, t):
    a = np.deg2rad(deg)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = t
    return m


def test_extension_is_the_rigidly_mapped_planning_ct_and_keeps_the_synthetic_ct():
    planning = Grid((30, 50, 60), origin=[-150.0, -120.0, -60.0], spacing=[5.0, 5.0, 4.0])
    c = planning.voxel_centers_lps()
    ramp = (0.5 * c[..., 0] - 0.25 * c[..., 1] + 2.0 * c[..., 2]).astype(np.float32)
    ct = Volume(ramp, planning, "HU")
    cbct = Grid((10, 20, 24), origin=[-40.3, -30.7, 300.2], spacing=[2.5, 2.5, 3.0])
    m = _rigid(3.0, [4.0, -6.0, -320.0])  # CBCT -> planning: the CBCT frame sits 320 mm up
    sct = Volume(np.full(cbct.shape, 123.0, np.float32), cbct, "HU")
    out = extend_synthetic_ct(sct, ct, m, air_hu=-1000.0)
    g = out.grid
    assert np.allclose(g.spacing, cbct.spacing) and np.allclose(g.direction, np.eye(3))
    # the CBCT's voxels are copied on the same lattice
    off = (cbct.origin - g.origin) / g.spacing
    assert np.allclose(off, np.round(off), atol=1e-6)
    i0, j0, k0 = np.round(off).astype(int)
    inner = out.array[k0:k0 + 10, j0:j0 + 20, i0:i0 + 24]
    assert np.all(inner == 123.0)
    # outside: the planning CT at m·x wherever m·x lies inside the planning CT, else air
    x = g.voxel_centers_lps()
    p = x @ m[:3, :3].T + m[:3, 3]
    truth = 0.5 * p[..., 0] - 0.25 * p[..., 1] + 2.0 * p[..., 2]
    outside = np.ones(g.shape, bool)
    outside[k0:k0 + 10, j0:j0 + 20, i0:i0 + 24] = False
    inside_planning = planning.contains_lps(p, margin_vox=-1e-3) & outside
    assert inside_planning.sum() > 0.5 * outside.sum()
    np.testing.assert_allclose(out.array[inside_planning], truth[inside_planning], atol=2e-3)
    far = ~planning.contains_lps(p, margin_vox=1.0) & outside
    assert far.any() and np.all(out.array[far] == -1000.0)
    # the extended grid covers the whole planning CT, mapped into the CBCT frame
    corners = planning.ijk_to_lps(np.array([[i, j, k] for i in (0, 59) for j in (0, 49)
                                            for k in (0, 29)], float))
    inv = np.linalg.inv(m)
    assert g.contains_lps(corners @ inv[:3, :3].T + inv[:3, 3], margin_vox=1.0).all()


def test_oblique_synthetic_ct_is_refused():
    a = np.deg2rad(10)
    d = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    g = Grid((4, 5, 6), origin=[0, 0, 0], spacing=[1, 1, 1], direction=d)
    ct = Volume(np.zeros((4, 5, 6), np.float32), Grid((4, 5, 6), [0, 0, 0], [1, 1, 1]), "HU")
    with pytest.raises(GeometryError, match="axis-aligned"):
        extend_synthetic_ct(Volume(np.zeros(g.shape, np.float32), g, "HU"), ct, np.eye(4))
