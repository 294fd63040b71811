"""The sparse dose-influence matrix (Dij): the contract between dose engine and optimiser."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from adaptive.geometry.volume import Grid, Volume


@dataclass
class DoseInfluence:
    """Dose per unit beamlet weight on a subset of dose-grid voxels.

    ``matrix[v, b]`` is the dose (Gy) to selected voxel ``v`` per MU delivered through
    beamlet ``b`` (an open bixel of ``bixel_size_mm`` at the isocenter plane), so the dose
    of beamlet weights ``w`` (MU) is ``matrix @ w`` and an open field of F MU is reproduced
    by ``w = F`` on every beamlet inside the field.

    ``voxel_indices``: flat (C-order, numpy (z, y, x)) indices into ``dose_grid`` of the
    selected voxels (rows). Beamlet ``b`` belongs to ``beam_index[b]`` (index into the plan's
    beam list) and is centred at (``bev_x_mm[b]``, ``bev_y_mm[b]``) in the beam limiting
    device frame (IEC 61217 X, Y) at the isocenter plane.
    """

    matrix: sp.csr_matrix
    voxel_indices: np.ndarray
    dose_grid: Grid
    beam_index: np.ndarray
    bev_x_mm: np.ndarray
    bev_y_mm: np.ndarray
    bixel_size_mm: tuple[float, float] = (5.0, 5.0)
    timings_s: dict = field(default_factory=dict)

    @property
    def n_beamlets(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def n_voxels(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.matrix.nnz)

    @property
    def nbytes(self) -> int:
        m = self.matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + self.voxel_indices.nbytes)

    def beamlets_of(self, beam: int) -> np.ndarray:
        return np.flatnonzero(self.beam_index == beam)

    def dose_volume(self, weights_mu: np.ndarray) -> Volume:
        """Full dose-grid Volume (Gy) for beamlet weights (MU); unselected voxels are 0."""
        d = np.asarray(self.matrix @ np.asarray(weights_mu, dtype=np.float32), dtype=np.float32)
        full = np.zeros(self.dose_grid.n_voxels, dtype=np.float32)
        full[self.voxel_indices] = d
        return Volume(full.reshape(self.dose_grid.shape), self.dose_grid, "Gy")
