"""Synthetic dose-influence matrices for optimiser/sequencing tests (analytic Gaussian
beamlets in water-like attenuation), plus tests of the clinical-goal machinery on them."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from adaptive.dose.influence import DoseInfluence
from adaptive.geometry.volume import Grid
from adaptive.model.plan import Prescription
from adaptive.optimization.goals import ClinicalGoals, Goal, ObjectiveTerm, parse_goal


def make_toy_case(n_xy: int = 40, n_z: int = 4, spacing: float = 3.0, n_beams: int = 7,
                  bixel: float = 5.0, sigma: float = 4.0, mu_per_mm: float = 0.005):
    """A C-shaped target around a round core in a cylinder of 'water' (axial plane x–y).

    Beams are coplanar, parallel-beam (no divergence), at gantry angles 360/n_beams apart;
    beamlet (bev_x = s, bev_y = z) dose = 0.01 Gy/MU × exp(−μ·depth) × Gaussian(σ) in s and z.
    Returns (dij, masks {PTV, CORE, BODY} on dose grid, goals).
    """
    grid = Grid(shape=(n_z, n_xy, n_xy), origin=(-(n_xy - 1) * spacing / 2,
                                                 -(n_xy - 1) * spacing / 2,
                                                 -(n_z - 1) * spacing / 2),
                spacing=(spacing, spacing, spacing))
    c = grid.voxel_centers_lps()
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    r = np.hypot(x, y)
    R = (n_xy - 1) * spacing / 2
    body = r <= R
    core = r <= 0.17 * R
    ang = np.arctan2(y, x)
    ptv = (r >= 0.27 * R) & (r <= 0.6 * R) & ~((ang > -np.pi / 4) & (ang < np.pi / 4))
    masks = {"PTV": ptv, "CORE": core, "BODY": body}
    flat = np.flatnonzero(body.ravel())
    px, py, pz = x.ravel()[flat], y.ravel()[flat], z.ravel()[flat]
    rows, cols, vals = [], [], []
    bix, biy, bib = [], [], []
    half = 0.62 * R
    s_pos = np.arange(-half + bixel / 2, half, bixel)
    z_ext = (n_z - 1) * spacing / 2 + bixel / 2
    zc = np.arange(-z_ext + bixel / 2, z_ext, bixel)
    col = 0
    for b in range(n_beams):
        th = 2 * np.pi * b / n_beams
        d = np.array([np.sin(th), -np.cos(th)])  # beam direction in x–y
        p = np.array([np.cos(th), np.sin(th)])  # lateral (bev x)
        depth = px * d[0] + py * d[1] + R
        s = px * p[0] + py * p[1]
        att = 0.01 * np.exp(-mu_per_mm * np.clip(depth, 0, None))
        for sc in s_pos:
            gs = np.exp(-0.5 * ((s - sc) / sigma) ** 2)
            for zz in zc:
                v = att * gs * np.exp(-0.5 * ((pz - zz) / sigma) ** 2)
                keep = v > 1e-3 * 0.01
                rows.append(np.flatnonzero(keep))
                cols.append(np.full(int(keep.sum()), col))
                vals.append(v[keep])
                bix.append(sc)
                biy.append(zz)
                bib.append(b)
                col += 1
    m = sp.csr_matrix((np.concatenate(vals).astype(np.float32),
                       (np.concatenate(rows), np.concatenate(cols))), shape=(flat.size, col))
    dij = DoseInfluence(matrix=m, voxel_indices=flat.astype(np.int64), dose_grid=grid,
                        beam_index=np.array(bib), bev_x_mm=np.array(bix), bev_y_mm=np.array(biy),
                        bixel_size_mm=(bixel, bixel))
    fx = 25
    goals = ClinicalGoals(
        site="toy", prescription=Prescription(2.0, fx, "PTV"),
        goals=[parse_goal("D95 >= 50 Gy", "PTV", fx), parse_goal("D10 <= 55 Gy", "PTV", fx),
               parse_goal("D10 <= 25 Gy", "CORE", fx)],
        objectives=[ObjectiveTerm("PTV", "min_dose", 50.5 / fx, 50.5, 100.0),
                    ObjectiveTerm("PTV", "max_dose", 52.5 / fx, 52.5, 100.0),
                    ObjectiveTerm("CORE", "dvh_max", 15.0 / fx, 15.0, 30.0, 10.0),
                    ObjectiveTerm("CORE", "max_dose", 22.0 / fx, 22.0, 10.0),
                    ObjectiveTerm("BODY", "max_dose", 40.0 / fx, 40.0, 5.0),
                    ObjectiveTerm("CORE", "mean_max", 10.0 / fx, 10.0, 1.0)])
    return dij, masks, goals


def test_toy_case_is_consistent():
    dij, masks, goals = make_toy_case(n_xy=20, n_z=2, n_beams=3)
    assert dij.matrix.shape == (int(masks["BODY"].sum()), dij.n_beamlets)
    assert dij.matrix.nnz > 0 and np.all(dij.matrix.data > 0)
    assert masks["PTV"].sum() > 0 and not np.any(masks["PTV"] & masks["CORE"])
    assert isinstance(goals.goals[0], Goal)
    assert math.isclose(goals.goals[0].value, 2.0)
