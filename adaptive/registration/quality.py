"""Quality measures of a registration result (pure numpy).

Displacement fields are (nz, ny, nx, 3) arrays in LPS mm on a fixed grid, with the
convention fixed point x ↦ moving point x + u(x).
"""

from __future__ import annotations

import numpy as np

from adaptive.geometry.volume import Grid, apply_affine


def jacobian_stats(det: np.ndarray, mask: np.ndarray) -> dict:
    v = det[mask] if mask.any() else det.ravel()
    return {"jacobian_min": float(v.min()), "jacobian_max": float(v.max()),
            "jacobian_fraction_nonpositive": float(np.mean(v <= 0))}


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Mutual information (nats) of two equally long sample vectors (joint histogram)."""
    if a.size < 2:
        return float("nan")
    h, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins)
    p = h / h.sum()
    px = p.sum(axis=1, keepdims=True)
    py = p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / (px @ py)[nz])))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation (Pearson) of two sample vectors."""
    a = a.ravel().astype(np.float64) - a.mean()
    b = b.ravel().astype(np.float64) - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def similarity(fixed_vals: np.ndarray, moving_vals: np.ndarray, bins: int = 32) -> dict:
    """MI (nats), NCC and mean absolute difference (HU) of paired samples."""
    return {"mi": mutual_information(fixed_vals, moving_vals, bins),
            "ncc": ncc(fixed_vals, moving_vals),
            "mae_hu": float(np.mean(np.abs(fixed_vals.astype(np.float64) - moving_vals)))}


def affine_field(matrix: np.ndarray, points_lps: np.ndarray) -> np.ndarray:
    """Displacement (…, 3) of the affine map ``matrix`` (4×4, x ↦ A x + t) at LPS points."""
    return points_lps @ matrix[:3, :3].T + matrix[:3, 3] - points_lps


def affine_field_on_grid(matrix: np.ndarray, grid: Grid, ub: np.ndarray | None = None
                         ) -> np.ndarray:
    """Displacement (float32 (z, y, x, 3), LPS mm) of x ↦ M (x + ub(x)) on every voxel
    centre of ``grid`` (``ub``: an inner displacement on the grid, e.g. a B-spline's; None =
    the affine map alone), computed slab by slab so a 512 × 512 CBCT needs no float64 copy
    of its voxel centres."""
    m = np.asarray(matrix, dtype=np.float64)
    out = np.empty(grid.shape + (3,), dtype=np.float32)
    nz, ny, nx = grid.shape
    step = max(1, 1_000_000 // max(1, ny * nx))
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        sub = Grid(shape=(z1 - z0, ny, nx), origin=grid.ijk_to_lps([0.0, 0.0, float(z0)]),
                   spacing=grid.spacing, direction=grid.direction)
        x = sub.voxel_centers_lps()
        p = x if ub is None else x + ub[z0:z1]
        out[z0:z1] = apply_affine(p, m[:3, :3], m[:3, 3]) - x
    return out


def deformation_beyond_rigid(dvf_lps_mm: np.ndarray, rigid_matrix: np.ndarray, grid: Grid,
                             mask: np.ndarray) -> dict:
    """Magnitude (mm) of the displacement that the rigid part does not explain, in ``mask``."""
    pts = grid.voxel_centers_lps()[mask]
    d = dvf_lps_mm[mask] - affine_field(rigid_matrix, pts)
    mag = np.linalg.norm(d, axis=-1)
    if mag.size == 0:
        return {"deformation_mean_mm": 0.0, "deformation_max_mm": 0.0}
    return {"deformation_mean_mm": float(mag.mean()), "deformation_max_mm": float(mag.max())}
