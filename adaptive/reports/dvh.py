"""Cumulative dose-volume histograms (pure functions).

Same semantics as the clinical goals (:mod:`adaptive.optimization.goals`): every voxel of a
structure has equal volume (one dose grid); the cumulative DVH at dose d is the percentage
of the structure's voxels receiving at least d. So ``Dx`` read off the curve is the
minimum dose of the hottest x % (the goals' definition), with no interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dvh:
    """``dose_gy``: sorted voxel doses (ascending, total-course Gy); ``volume_pct[i]``: % of
    the volume receiving ≥ ``dose_gy[i]``. ``volume_cc``: the structure's volume on the
    dose grid (cm³)."""

    structure: str
    dose_gy: np.ndarray
    volume_pct: np.ndarray
    volume_cc: float

    @property
    def empty(self) -> bool:
        return self.dose_gy.size == 0


def cumulative_dvh(structure: str, voxel_doses_gy: np.ndarray, voxel_volume_mm3: float,
                   max_points: int = 400) -> Dvh:
    """DVH of ``voxel_doses_gy`` (any shape; total-course Gy). At most ``max_points`` steps
    are kept (evenly spaced in rank, the first and last always), enough for a plot."""
    d = np.sort(np.asarray(voxel_doses_gy, dtype=np.float64).ravel())
    n = d.size
    if n == 0:
        return Dvh(structure, d, d.copy(), 0.0)
    # the i-th smallest dose is received (at least) by the n - i hottest voxels
    v = 100.0 * (n - np.arange(n)) / n
    if n > max_points:
        idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
        d, v = d[idx], v[idx]
    return Dvh(structure, d, v, n * voxel_volume_mm3 / 1000.0)
