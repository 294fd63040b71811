"""Contour rasterisation and mask → contour extraction against analytic truth."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.errors import ContourOutsideImageError
from adaptive.geometry import Grid
from adaptive.geometry.rasterize import (
    EDGE_TOL_MM,
    contour_slice_index,
    mask_to_contours,
    rasterize_contours,
)
from adaptive.registration.evaluate import dice as _dice


def _grid(direction=None):
    return Grid((20, 32, 40), origin=[-30.0, -20.0, 10.0], spacing=[1.0, 1.5, 2.0],
                direction=np.eye(3) if direction is None else direction)


def _oblique():
    a, b = np.deg2rad(25), np.deg2rad(-15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ ry


def _rect_ijk(i0, i1, j0, j1, k):
    return np.array([[i0, j0, k], [i1, j0, k], [i1, j1, k], [i0, j1, k]], dtype=float)


def _circle_ijk(ci, cj, r, k, n=200):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([ci + r * np.cos(t), cj + r * np.sin(t), np.full(n, k)])


def _circle_truth(grid, ci, cj, r, k):
    m = np.zeros(grid.shape, bool)
    j, i = np.mgrid[0:grid.shape[1], 0:grid.shape[2]]
    m[k] = (i - ci) ** 2 + (j - cj) ** 2 < r ** 2
    return m




@pytest.mark.parametrize("direction", [None, "oblique"])
def test_rectangle_exact_area(direction):
    g = _grid(_oblique() if direction else None)
    # edges on voxel centres: the boundary belongs to the ROI, every centre on it counts
    poly = g.ijk_to_lps(_rect_ijk(3, 13, 5, 12, 7))
    m = rasterize_contours([poly], g)
    assert m.sum() == m[7].sum() == 11 * 8
    assert m[7, 5:13, 3:14].all()
    # edges on half-voxel positions (voxel edges): exact area, voxel count × voxel area
    i0, i1, j0, j1 = 2.5, 9.5, 4.5, 20.5
    m = rasterize_contours([g.ijk_to_lps(_rect_ijk(i0, i1, j0, j1, 7))], g)
    assert m.sum() == m[7].sum() == 7 * 16
    _ks, js, is_ = np.nonzero(m)
    assert is_.min() == 3 and js.min() == 5
    assert m.sum() * g.spacing[0] * g.spacing[1] == pytest.approx(
        (i1 - i0) * (j1 - j0) * g.spacing[0] * g.spacing[1])
    # a centre a little more than the tolerance off the edge is outside
    off = 2 * EDGE_TOL_MM / g.spacing[0]
    m = rasterize_contours([g.ijk_to_lps(_rect_ijk(3 + off, 13 - off, 5, 12, 7))], g)
    assert m.sum() == 9 * 8


def test_annulus_nested_polygons_are_holes():
    g = _grid()
    outer = g.ijk_to_lps(_circle_ijk(20, 16, 12, 5))
    inner = g.ijk_to_lps(_circle_ijk(20, 16, 5, 5))
    m = rasterize_contours([outer, inner], g)
    truth = _circle_truth(g, 20, 16, 12, 5) & ~_circle_truth(g, 20, 16, 5, 5)
    # polygon with 200 vertices vs true circle: only boundary voxels may differ
    assert (m != truth).sum() <= 4
    assert not m[5, 16, 20]  # centre of the hole
    assert m[5, 16, 29]  # in the ring


def test_two_polygons_on_one_slice_and_other_slices():
    g = _grid()
    a = g.ijk_to_lps(_rect_ijk(1, 6, 1, 6, 3))
    b = g.ijk_to_lps(_rect_ijk(20, 30, 10, 14, 3))
    c = g.ijk_to_lps(_rect_ijk(5, 8, 5, 8, 4))
    m = rasterize_contours([a, b, c], g)
    assert m[3].sum() == 36 + 55 and m[4].sum() == 16 and m.sum() == 107
    assert m[3, 1:7, 1:7].all() and m[3, 10:15, 20:31].all()


def test_oblique_direction_matches_index_space_truth():
    g = _grid(_oblique())
    poly = g.ijk_to_lps(_circle_ijk(17.3, 14.2, 9.1, 11, n=400))
    # small out-of-plane noise (< half a slice) is tolerated
    poly = poly + 0.1 * g.direction[:, 2]
    m = rasterize_contours([poly], g)
    truth = _circle_truth(g, 17.3, 14.2, 9.1, 11)
    assert (m != truth).sum() <= 2
    assert contour_slice_index(poly, g) == 11


def test_contour_outside_raises():
    g = _grid()
    with pytest.raises(ContourOutsideImageError, match="outside the grid's slices"):
        rasterize_contours([g.ijk_to_lps(_rect_ijk(1, 5, 1, 5, 25))], g)
    with pytest.raises(ContourOutsideImageError, match="in-plane"):
        rasterize_contours([g.ijk_to_lps(_rect_ijk(30, 41, 1, 5, 2))], g)
    tilted = _rect_ijk(1, 5, 1, 5, 2)
    tilted[2:, 2] = 4.0
    with pytest.raises(ContourOutsideImageError, match="parallel"):
        rasterize_contours([g.ijk_to_lps(tilted)], g)
    # vertices within half a slice of a plane are assigned to it
    assert rasterize_contours([g.ijk_to_lps(_rect_ijk(1, 5, 1, 5, 2.7))], g)[3].sum() == 25
    # within half a voxel of the edge centres is accepted
    m = rasterize_contours([g.ijk_to_lps(_rect_ijk(-0.5, 39.5, -0.5, 31.5, 0))], g)
    assert m[0].all()


@pytest.mark.parametrize("direction", [None, "oblique"])
def test_mask_roundtrip_sphere_and_torus(direction):
    g = _grid(_oblique() if direction else None)
    k, j, i = np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij")
    sphere = (i - 12) ** 2 + (j - 15) ** 2 + ((k - 9) * 1.5) ** 2 < 8 ** 2
    rho = np.sqrt((i - 28) ** 2 + (j - 16) ** 2)
    torus = (rho - 7) ** 2 + ((k - 10) * 2) ** 2 < 3.2 ** 2  # ring: a hole in each slice
    for m in (sphere, torus, sphere | torus):
        contours = mask_to_contours(m, g)
        assert all(c.shape[1] == 3 for c in contours)
        back = rasterize_contours(contours, g)
        assert _dice(m, back) >= 0.98
    # the torus has slices with an outer and an inner (hole) polygon
    contours = mask_to_contours(torus, g)
    ks = [contour_slice_index(c, g) for c in contours]
    assert max(ks.count(x) for x in set(ks)) >= 2
    assert not rasterize_contours(contours, g)[10, 16, 28]
