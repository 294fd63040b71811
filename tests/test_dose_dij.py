"""Dose-influence matrix: structure and consistency with the plan-dose path."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.dij import compute_dij, full_kernel_dose
from adaptive.dose.plan_dose import plan_dose
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Beam, ControlPoint, Plan


@pytest.fixture(scope="module")
def setup():
    bm = load_beam_model()
    s = 4.0
    g = Grid((25, 41, 31), origin=[-60.0, -80.0, -48.0], spacing=[s] * 3)
    rho = Volume(np.ones(g.shape, np.float32), g, "relative electron density")
    rho.array[:, :10, :] = 0.001  # air above the patient (y < -40 mm)
    # target: a box projecting to |x|, |z| < ~25 mm around the isocenter
    tgt = np.zeros(g.shape, bool)
    p = g.voxel_centers_lps()
    tgt[(np.abs(p[..., 0]) <= 22) & (np.abs(p[..., 1]) <= 20) & (np.abs(p[..., 2]) <= 22)] = True
    return bm, rho, tgt


def _beam(gantry, jx=(-30.0, 30.0), jy=(-30.0, 30.0), mu=100.0, number=1):
    cps = [ControlPoint(0, 0.0, jx, jy), ControlPoint(1, 1.0, jx, jy)]
    return Beam(number, "b", gantry, 0.0, 0.0, np.zeros(3), cps, mu)


def test_dij_structure(setup):
    bm, rho, tgt = setup
    beams = [_beam(0, number=1), _beam(90, number=2)]
    dij = compute_dij(rho, beams, tgt, None, beam_model=bm, dose_grid_spacing_mm=None,
                      cutoff_mm=20.0)
    m = dij.matrix
    assert m.dtype == np.float32 and m.has_sorted_indices
    assert m.shape == (len(dij.voxel_indices), dij.n_beamlets)
    assert set(np.unique(dij.beam_index)) == {0, 1}
    # beamlet centres on the 5 mm grid (edges on multiples of 5 mm), covering the target BEV
    assert np.allclose((dij.bev_x_mm - 2.5) % 5.0, 0) and np.allclose((dij.bev_y_mm - 2.5) % 5.0, 0)
    b0 = dij.beamlets_of(0)
    assert dij.bev_x_mm[b0].min() <= -22 and dij.bev_x_mm[b0].max() >= 22
    assert np.all(np.abs(dij.bev_x_mm) <= 22 + 5 + 2 + 5)
    # rows are body voxels only (no air rows) and every row has entries
    assert np.all(rho.array.ravel()[dij.voxel_indices] > 0.5) if rho.grid.same_as(
        dij.dose_grid) else True
    assert np.all(np.diff(m.indptr) > 0)
    assert dij.nbytes > m.data.nbytes


def test_dij_columns_reproduce_plan_dose_same_cutoff(setup):
    """Open 60 x 60 mm field: sum of beamlet columns x MU == plan dose (same truncated
    kernel), within 2 % where the dose is above 20 % of max."""
    bm, rho, tgt = setup
    big = np.zeros_like(tgt)
    p = rho.grid.voxel_centers_lps()
    big[(np.abs(p[..., 0]) <= 30) & (np.abs(p[..., 2]) <= 30) & (np.abs(p[..., 1]) <= 4)] = True
    for cut, corr in ((30.0, False), (250.0, True)):
        dij = compute_dij(rho, [_beam(0)], big, None, beam_model=bm, dose_grid_spacing_mm=None,
                          cutoff_mm=cut, scatter_correction=corr)
        w = np.where((np.abs(dij.bev_x_mm) < 30) & (np.abs(dij.bev_y_mm) < 30), 100.0, 0.0)
        d_dij = dij.dose_volume(w).array
        d_plan = plan_dose(rho, Plan("t", [_beam(0)], "1"), beam_model=bm,
                           dose_grid_spacing_mm=None, cutoff_mm=cut).array
        m = (d_plan > 0.2 * d_plan.max()) & (d_dij > 0)
        assert m.sum() > 500
        r = d_dij[m] / d_plan[m]
        assert np.all(np.abs(r - 1) < 0.02), (cut, r.min(), r.max())


def test_scatter_correction_exact_for_uniform_weights(setup):
    bm, rho, tgt = setup
    beams = [_beam(0, number=1), _beam(120, number=2), _beam(240, number=3)]
    plain = compute_dij(rho, beams, tgt, None, beam_model=bm, dose_grid_spacing_mm=None,
                        cutoff_mm=20.0, scatter_correction=False)
    corr = compute_dij(rho, beams, tgt, None, beam_model=bm, dose_grid_spacing_mm=None,
                       cutoff_mm=20.0)
    w = np.ones(corr.n_beamlets)
    full = full_kernel_dose(corr, rho, beams, w, beam_model=bm).array
    d_plain = plain.dose_volume(w).array
    d_corr = corr.dose_volume(w).array
    t = Volume(tgt, rho.grid).array
    # the truncated kernel misses the broad phantom scatter; the correction restores it
    assert d_plain[t].mean() < 0.95 * full[t].mean()
    assert np.allclose(d_corr[t], full[t], rtol=0.01)
    # outside the target, voxels beyond the cut-off of some beam miss that beam's scatter
    hi = full > 0.2 * full.max()
    assert np.max(np.abs(d_corr[hi] - full[hi])) < 0.05 * full.max()
    # a modulated fluence stays close (long-range scatter follows the near beamlets)
    w2 = np.random.default_rng(0).uniform(0.0, 2.0, corr.n_beamlets)
    f2 = full_kernel_dose(corr, rho, beams, w2, beam_model=bm).array
    assert abs(corr.dose_volume(w2).array[t].mean() / f2[t].mean() - 1) < 0.03


def test_coarse_far_scatter_and_fan_depths_match_reference(setup):
    """The far-scatter part interpolated from every 2nd voxel (default) and the fan-grid
    depths reproduce the reference Dij (scatter at every row, exact depths)."""
    bm, rho, tgt = setup
    beams = [_beam(0, number=1), _beam(120, number=2), _beam(240, number=3)]
    kw = {"beam_model": bm, "dose_grid_spacing_mm": None, "cutoff_mm": 20.0}
    ref = compute_dij(rho, beams, tgt, None, scatter_stride=1, **kw)
    w = np.random.default_rng(2).uniform(0.0, 2.0, ref.n_beamlets)
    d_ref = ref.dose_volume(w).array
    hi = d_ref > 0.2 * d_ref.max()
    for opts in ({"scatter_stride": 2}, {"scatter_stride": 3},
                 {"scatter_stride": 2, "depth_method": "fan"}):
        dij = compute_dij(rho, beams, tgt, None, **opts, **kw)
        assert np.array_equal(dij.voxel_indices, ref.voxel_indices)
        assert np.array_equal(dij.matrix.indptr, ref.matrix.indptr)
        d = dij.dose_volume(w).array
        assert np.max(np.abs(d[hi] - d_ref[hi])) < 0.01 * d_ref.max(), opts
    with pytest.raises(Exception, match="depth_method"):
        compute_dij(rho, beams, tgt, None, depth_method="guess", **kw)


def test_beams_with_different_beamlet_grids_each_get_their_own_columns(setup):
    """Beams whose beamlet grids differ (collimator 0 vs 30 deg on a target longer than wide:
    other numbers of beamlet rows) are counted and filled with the right per-beam layout:
    each beam's columns in a two-beam Dij equal that beam's Dij computed alone."""
    bm, rho, _ = setup
    p = rho.grid.voxel_centers_lps()
    tgt = (np.abs(p[..., 0]) <= 10) & (np.abs(p[..., 1]) <= 20) & (np.abs(p[..., 2]) <= 40)
    a = _beam(0, number=1)
    b = Beam(2, "c30", 90.0, 30.0, 0.0, np.zeros(3), a.control_points, 100.0)
    kw = {"beam_model": bm, "dose_grid_spacing_mm": None, "cutoff_mm": 20.0,
          "scatter_correction": False}
    both = compute_dij(rho, [a, b], tgt, None, **kw)
    rows = [len(np.unique(both.bev_y_mm[both.beamlets_of(i)])) for i in (0, 1)]
    assert rows[0] != rows[1], rows   # the case the layout must handle
    for i, beam in enumerate((a, b)):
        alone = compute_dij(rho, [beam], tgt, None, **kw)
        cols = both.beamlets_of(i)
        np.testing.assert_array_equal(both.bev_x_mm[cols], alone.bev_x_mm)
        np.testing.assert_array_equal(both.bev_y_mm[cols], alone.bev_y_mm)
        # rows: the voxels either beam reaches; this beam's rows sit among them
        at = np.searchsorted(both.voxel_indices, alone.voxel_indices)
        assert np.array_equal(both.voxel_indices[at], alone.voxel_indices)
        mine = both.matrix[:, cols].tocsr()
        diff = abs(mine[at] - alone.matrix)
        assert diff.max() <= 1e-6 * alone.matrix.max()
        others = np.setdiff1d(np.arange(len(both.voxel_indices)), at)
        assert mine[others].nnz == 0 or abs(mine[others]).max() == 0
