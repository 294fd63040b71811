"""Evaluation of registrations against truth (pure functions, used by tests and benchmarks).

Displacement fields: (nz, ny, nx, 3) LPS mm on one grid (same convention for both fields).
Masks: boolean numpy (z, y, x) on that grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from adaptive.errors import GeometryError
from adaptive.geometry.volume import Grid


def tre(dvf: np.ndarray, truth_dvf: np.ndarray, mask: np.ndarray, grid: Grid | None = None) -> dict:
    """Target registration error |u − u_true| (mm) over the voxels of ``mask``: mean, 95th
    percentile, max and the number of voxels. ``grid`` (optional) is checked against shapes."""
    if dvf.shape != truth_dvf.shape or dvf.shape[:3] != mask.shape:
        raise GeometryError(f"TRE: shapes differ: {dvf.shape}, {truth_dvf.shape}, {mask.shape}")
    if grid is not None and grid.shape != mask.shape:
        raise GeometryError(f"TRE: grid shape {grid.shape} != mask shape {mask.shape}")
    e = np.linalg.norm(dvf[mask].astype(np.float64) - truth_dvf[mask], axis=-1)
    if e.size == 0:
        return {"mean_mm": float("nan"), "p95_mm": float("nan"), "max_mm": float("nan"), "n": 0}
    return {"mean_mm": float(e.mean()), "p95_mm": float(np.percentile(e, 95)),
            "max_mm": float(e.max()), "n": int(e.size)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice similarity coefficient 2|A∩B| / (|A|+|B|) (1.0 for two empty masks)."""
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


def _surface(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing_zyx) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from the surface voxels of ``a`` to the surface of ``b`` and back,
    via Euclidean distance transforms with the voxel spacing (numpy (z, y, x) order)."""
    a, b = a.astype(bool), b.astype(bool)
    if not a.any() or not b.any():
        raise GeometryError("surface distance of an empty mask")
    sa, sb = _surface(a), _surface(b)
    db = ndimage.distance_transform_edt(~sb, sampling=spacing_zyx)
    da = ndimage.distance_transform_edt(~sa, sampling=spacing_zyx)
    return db[sa], da[sb]


def hausdorff95(a: np.ndarray, b: np.ndarray, grid: Grid) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between two masks on ``grid``."""
    d1, d2 = surface_distances(a, b, grid.spacing[::-1])
    return float(np.percentile(np.concatenate([d1, d2]), 95))


def mean_surface_distance(a: np.ndarray, b: np.ndarray, grid: Grid) -> float:
    d1, d2 = surface_distances(a, b, grid.spacing[::-1])
    return float(np.concatenate([d1, d2]).mean())


def dilate_mm(mask: np.ndarray, grid: Grid, margin_mm: float) -> np.ndarray:
    """Mask grown by ``margin_mm`` (Euclidean, anisotropic voxels handled)."""
    if margin_mm <= 0:
        return mask.copy()
    m = np.asarray(mask, dtype=bool)
    out = np.zeros(m.shape, dtype=bool)
    if not m.any():
        return out
    # only voxels within the margin of the mask's bounding box can be reached: the distance
    # transform on that box alone is exact and much smaller than the volume
    r = np.ceil(margin_mm / grid.spacing[::-1]).astype(int) + 1
    sl = []
    for ax, n in enumerate(m.shape):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(m.any(axis=other))
        sl.append(slice(max(0, idx[0] - r[ax]), min(n, idx[-1] + r[ax] + 1)))
    sl = tuple(sl)
    d = ndimage.distance_transform_edt(~m[sl], sampling=grid.spacing[::-1])
    out[sl] = d <= margin_mm
    return out
