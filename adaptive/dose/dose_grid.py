"""Dose grid and body selection shared by the Dij and plan-dose paths."""

from __future__ import annotations

import numpy as np

from adaptive.dose.raytrace import lps_to_grid_frame
from adaptive.errors import DoseError
from adaptive.geometry.volume import Grid, Volume, apply_affine
from adaptive.geometry.warp import pull_back


def make_dose_grid(density: Volume, spacing_mm: float | None) -> Grid:
    """The CT (density) grid resampled to isotropic ``spacing_mm`` (same origin and direction,
    covering the same extent); ``None`` keeps the CT grid."""
    if spacing_mm is None:
        return density.grid
    if not np.isfinite(spacing_mm) or spacing_mm <= 0:
        raise DoseError(f"dose_grid_spacing_mm must be > 0, got {spacing_mm}")
    return density.grid.with_spacing([spacing_mm] * 3)


def mask_on_grid(mask, src_grid: Grid, dst_grid: Grid, what: str) -> np.ndarray:
    """Boolean mask (numpy (z, y, x)) on ``dst_grid`` from a bool array on ``src_grid`` or a
    :class:`Volume` on any grid (nearest-neighbour / >= 0.5 of linear interpolation)."""
    if isinstance(mask, Volume):
        vol = mask
    else:
        a = np.asarray(mask)
        if a.shape == dst_grid.shape and a.shape != src_grid.shape:
            return a.astype(bool)
        if a.shape != src_grid.shape:
            raise DoseError(f"{what} has shape {a.shape}; expected the CT/density grid shape "
                            f"{src_grid.shape} (or pass a Volume)")
        vol = Volume(a.astype(bool), src_grid)
    if vol.grid.same_as(dst_grid):
        return np.asarray(vol.array).astype(bool)
    if np.asarray(vol.array).dtype == bool:
        # trilinear occupancy > 0.5, computed only where the mask's box can reach (numba)
        return pull_back(vol, dst_grid) > 0.5
    return vol.resample_to(dst_grid, order=1).array.astype(bool)


def body_on_dose_grid(density: Volume, dose_grid: Grid, body_mask, threshold: float) -> np.ndarray:
    """Voxels of ``dose_grid`` inside the patient: ``body_mask`` if given, else density >
    ``threshold`` (trilinear interpolation of the density onto the dose grid)."""
    if body_mask is not None:
        return mask_on_grid(body_mask, density.grid, dose_grid, "body_mask")
    rho = density.resample_to(dose_grid, order=1, dtype=np.float32).array
    return rho > threshold


def dose_points(dose_grid: Grid, flat_idx: np.ndarray, density: Volume
                ) -> tuple[np.ndarray, np.ndarray]:
    """(LPS mm (n, 3), density-grid-frame mm (n, 3)) of the dose voxels ``flat_idx``."""
    _, ny, nx = dose_grid.shape
    k, rem = np.divmod(np.asarray(flat_idx, dtype=np.int64), ny * nx)
    j, i = np.divmod(rem, nx)
    ijk = np.empty((len(k), 3), dtype=np.float64)
    ijk[:, 0] = i
    ijk[:, 1] = j
    ijk[:, 2] = k
    m = np.asarray(dose_grid.direction, dtype=np.float64) * np.asarray(
        dose_grid.spacing, dtype=np.float64)[None, :]
    lps = apply_affine(ijk, m, np.asarray(dose_grid.origin, dtype=np.float64))
    # grid frame of the density: D^T (p - origin) = (D^T m) ijk + D^T (o_dose - o_density)
    dd = np.asarray(density.grid.direction, dtype=np.float64)
    shift = dd.T @ (np.asarray(dose_grid.origin, dtype=np.float64)
                    - np.asarray(density.grid.origin, dtype=np.float64))
    return lps, apply_affine(ijk, dd.T @ m, shift)


def scatter_nodes(dgrid, rows: np.ndarray, stride: int, density: Volume):
    """Coarse nodes (dose-grid indices multiple of ``stride``) needed to interpolate at the
    rows (flat dose-grid indices): (node_index (nK, nJ, nI) -> node number or -1, node LPS
    (n, 3), node density-grid-frame (n, 3))."""
    nz, ny, nx = dgrid.shape
    k, rem = np.divmod(rows, ny * nx)
    j, i = np.divmod(rem, nx)
    shape = (nz // stride + 2, ny // stride + 2, nx // stride + 2)
    need = np.zeros(shape, dtype=bool)
    cs = [(k // stride, k % stride != 0), (j // stride, j % stride != 0),
          (i // stride, i % stride != 0)]
    for dk in (0, 1):
        for dj in (0, 1):
            for di in (0, 1):
                sel = np.ones(len(rows), dtype=bool)
                for dd, (_c0, frac) in zip((dk, dj, di), cs):
                    if dd:
                        sel &= frac
                need[cs[0][0][sel] + dk, cs[1][0][sel] + dj, cs[2][0][sel] + di] = True
    node_index = np.full(shape, -1, dtype=np.int64)
    kk, jj, ii = np.nonzero(need)
    node_index[kk, jj, ii] = np.arange(len(kk))
    ijk = stride * np.stack([ii, jj, kk], axis=1).astype(np.float64)
    lps = np.ascontiguousarray(dgrid.ijk_to_lps(ijk))
    return node_index, lps, np.ascontiguousarray(lps_to_grid_frame(density, lps))
