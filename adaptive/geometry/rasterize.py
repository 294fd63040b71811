"""Planar contours (DICOM CLOSED_PLANAR, LPS mm) ↔ boolean masks on a :class:`Grid`.

Everything is done in the grid's continuous index space (i, j, k), so oblique and
non-identity directions are handled exactly: a polygon is mapped to index space, must lie
on one slice plane (|k − round(k)| ≤ 0.5 for every vertex), and is filled in that slice.

Fill rule: a voxel centre (i, j) is inside when a ray towards +i crosses the polygons of
its slice an odd number of times (even-odd rule across all polygons of the slice, so a
polygon nested in another is a hole, and overlapping polygons XOR). Edges use the
half-open convention (a centre exactly on a left/bottom edge is inside, on a right/top
edge outside), so an axis-aligned rectangle covering [i0, i1) × [j0, j1) in index space
contains exactly (i1 − i0)(j1 − j0) voxel centres for integer bounds.
"""

from __future__ import annotations

import numpy as np
from skimage import measure

from adaptive.errors import ContourOutsideImageError
from adaptive.geometry.volume import Grid

#: Tolerance (in slice units) for a polygon's vertices to be on a slice plane.
PLANE_TOL_SLICES = 0.5
#: Allowed in-plane excursion (voxels) outside the outermost voxel centres.
INPLANE_TOL_VOXELS = 0.5
#: Round-off tolerance (index units) when a vertex/edge falls exactly on a voxel centre.
_EPS = 1e-7


def contour_slice_index(points_lps: np.ndarray, grid: Grid, *, what: str = "contour") -> int:
    """Slice index k of the plane a polygon (n, 3) LPS mm lies on.

    Raises :class:`ContourOutsideImageError` if the polygon is not on one slice plane
    (within half a slice), off the grid's slices, or outside the in-plane extent by more
    than half a voxel.
    """
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    if pts.shape[0] == 0:
        raise ContourOutsideImageError(f"{what} has no points")
    if not np.all(np.isfinite(pts)):
        raise ContourOutsideImageError(f"{what} has non-finite coordinates")
    ijk = grid.lps_to_ijk(pts)
    nx, ny, nz = grid.size_ijk
    kk = ijk[:, 2]
    k = int(np.round(float(np.mean(kk))))
    if np.max(np.abs(kk - k)) > PLANE_TOL_SLICES + 1e-6:
        if np.ptp(kk) > 2 * PLANE_TOL_SLICES:
            raise ContourOutsideImageError(
                f"{what} is not parallel to the image slices (spans slice index "
                f"{kk.min():.2f}..{kk.max():.2f})")
        raise ContourOutsideImageError(f"{what} lies between slices (k = {kk.min():.2f}..{kk.max():.2f})")
    if k < 0 or k > nz - 1:
        raise ContourOutsideImageError(f"{what} at slice index {k} is outside the grid's slices 0..{nz - 1} "
                                       f"(LPS z ≈ {pts[:, 2].mean():.2f} mm)")
    tol = INPLANE_TOL_VOXELS + 1e-6
    if (ijk[:, 0].min() < -tol or ijk[:, 0].max() > nx - 1 + tol
            or ijk[:, 1].min() < -tol or ijk[:, 1].max() > ny - 1 + tol):
        raise ContourOutsideImageError(
            f"{what} extends outside the image in-plane (index i {ijk[:, 0].min():.1f}..{ijk[:, 0].max():.1f} "
            f"of 0..{nx - 1}, j {ijk[:, 1].min():.1f}..{ijk[:, 1].max():.1f} of 0..{ny - 1})")
    return k


def _crossing_counts(poly_ij: np.ndarray, ny: int, nx: int, counts: np.ndarray) -> None:
    """Add, for every row j, a +1 at column ceil(x) for each crossing x of the polygon
    with the line through the row's voxel centres (half-open rule in y)."""
    x0, y0 = poly_ij[:, 0], poly_ij[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    keep = y0 != y1  # horizontal edges never cross (half-open rule)
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    if x0.size == 0:
        return
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    # rows j with ylo <= j < yhi (EPS absorbs round-off of the LPS -> index mapping)
    jlo = np.clip(np.ceil(ylo - _EPS).astype(np.int64), 0, ny)
    jhi = np.clip(np.ceil(yhi - _EPS).astype(np.int64), 0, ny)
    nrows = jhi - jlo
    total = int(nrows.sum())
    if total == 0:
        return
    edge = np.repeat(np.arange(x0.size), nrows)
    start = np.repeat(np.cumsum(nrows) - nrows, nrows)
    j = jlo[edge] + (np.arange(total) - start)
    t = (j - y0[edge]) / (y1[edge] - y0[edge])
    x = x0[edge] + t * (x1[edge] - x0[edge])
    col = np.clip(np.ceil(x - _EPS).astype(np.int64), 0, nx)
    np.add.at(counts, (j, col), 1)


def rasterize_contours(contours: list[np.ndarray], grid: Grid) -> np.ndarray:
    """Boolean mask (nz, ny, nx) of planar polygons (each (n, 3), LPS mm) on ``grid``.

    Each polygon is assigned to the slice it lies on (see :func:`contour_slice_index`);
    polygons on the same slice are combined with the even-odd rule (nested = hole).
    Polygons with fewer than 3 points are ignored (points/lines enclose no area).
    """
    _nz, ny, nx = grid.shape
    mask = np.zeros(grid.shape, dtype=bool)
    per_slice: dict[int, np.ndarray] = {}
    for n, c in enumerate(contours):
        pts = np.asarray(c, dtype=np.float64).reshape(-1, 3)
        k = contour_slice_index(pts, grid, what=f"contour #{n}")
        if pts.shape[0] < 3:
            continue
        ij = grid.lps_to_ijk(pts)[:, :2]
        counts = per_slice.get(k)
        if counts is None:
            counts = per_slice[k] = np.zeros((ny, nx + 1), dtype=np.int32)
        _crossing_counts(ij, ny, nx, counts)
    for k, counts in per_slice.items():
        mask[k] = (np.cumsum(counts[:, :nx], axis=1) & 1).astype(bool)
    return mask


def mask_to_contours(mask: np.ndarray, grid: Grid) -> list[np.ndarray]:
    """Closed planar polygons (each (n, 3) LPS mm, not repeating the first point) outlining
    ``mask`` (numpy (z, y, x) on ``grid``), slice by slice.

    Uses marching squares (skimage.measure.find_contours) at level 0.5 on each zero-padded
    slice, so outlines pass midway between inside and outside voxel centres; holes come
    out as separate (nested) polygons, which the even-odd rule of
    :func:`rasterize_contours` turns back into holes.
    """
    m = np.asarray(mask)
    if m.shape != grid.shape:
        raise ContourOutsideImageError(f"mask shape {m.shape} != grid shape {grid.shape}")
    out: list[np.ndarray] = []
    for k in np.nonzero(m.reshape(m.shape[0], -1).any(axis=1))[0]:
        sl = np.pad(m[k].astype(np.float32), 1)
        for c in measure.find_contours(sl, 0.5):
            if len(c) > 1 and np.allclose(c[0], c[-1]):
                c = c[:-1]
            if len(c) < 3:
                continue
            ijk = np.column_stack([c[:, 1] - 1.0, c[:, 0] - 1.0, np.full(len(c), float(k))])
            out.append(grid.ijk_to_lps(ijk))
    return out
