"""Plan dose with depths traced once per (voxel, beam direction) and the optional depth cache:
same dose as the reference path (radiological depth traced lazily inside the kernel) on a
heterogeneous phantom with a modulated MLC plan."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from adaptive.dose.beam_geometry import beam_geometry
from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.dose_grid import body_on_dose_grid, dose_points, make_dose_grid
from adaptive.dose.kernel import fluence_dose, fluence_pyramid
from adaptive.dose.plan_dose import beam_fluence, beam_point_depths, plan_dose
from adaptive.dose.raytrace import lps_to_grid_frame, radiological_path_lengths
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Beam, ControlPoint, Plan


def _reference_plan_dose(density: Volume, plan: Plan, bm, spacing_mm: float, res_mm: float
                         ) -> np.ndarray:
    """The previous implementation: fluence_dose traces each point's depth itself (no
    precomputed depths), one fluence map per beam direction."""
    dgrid = make_dose_grid(density, spacing_mm)
    body = body_on_dose_grid(density, dgrid, None, bm.body_density_threshold)
    idx = np.flatnonzero(body.ravel())
    pts, gpts = dose_points(dgrid, idx, density)
    out = np.zeros(len(idx))
    dens = np.ascontiguousarray(density.array, dtype=np.float32)
    dsp = np.ascontiguousarray(density.grid.spacing)
    for beam in plan.beams:
        g = beam_geometry(beam.gantry_deg, beam.collimator_deg, beam.couch_deg,
                          beam.isocenter_lps_mm, beam.sad_mm)
        flu, fx0, fy0 = beam_fluence(list(beam.segments()), bm.mlc.leaf_boundaries_mm, bm,
                                     res_mm, margin_mm=2 * res_mm)
        pyr, pny, pnx = fluence_pyramid(flu)
        src = np.ascontiguousarray(lps_to_grid_frame(density, g.source_lps_mm))
        fluence_dose(pts, gpts, src, dens, dsp, np.ascontiguousarray(g.rotation),
                     g.isocenter_lps_mm, bm.sad_mm, pyr, pny, pnx, fx0, fy0, res_mm,
                     float(bm.plan_cutoff_mm), bm.kernel_array(), out,
                     numba.get_num_threads(), np.empty(0))
    full = np.zeros(dgrid.n_voxels)
    full[idx] = out
    return full.reshape(dgrid.shape)


@pytest.fixture(scope="module")
def bm():
    return load_beam_model()


@pytest.fixture(scope="module")
def phantom():
    """Elliptic water body (air outside) 4 mm voxels with a lung block and a bone rod."""
    n = (24, 40, 48)
    g = Grid((n[2], n[1], n[0]), origin=[-94.0, -78.0, -46.0], spacing=[4.0, 4.0, 4.0])
    k, j, i = np.indices(g.shape)
    x = g.origin[0] + 4.0 * i
    y = g.origin[1] + 4.0 * j
    z = g.origin[2] + 4.0 * k
    rho = np.full(g.shape, 0.001, np.float32)
    rho[(x / 90.0) ** 2 + (y / 70.0) ** 2 <= 1.0] = 1.0
    rho[(x > 10) & (x < 60) & (y > -50) & (y < 0) & (np.abs(z) < 30)] = 0.25  # lung
    rho[((x + 30.0) ** 2 + (y - 20.0) ** 2 <= 12.0 ** 2)] = 1.6  # bone rod along z
    return Volume(rho, g, "relative electron density")


@pytest.fixture(scope="module")
def plan(bm):
    """Three beams (one with a collimator rotation), each three MLC segments of different
    shapes and MU: a modulated step-and-shoot plan."""
    lb = np.asarray(bm.mlc.leaf_boundaries_mm, dtype=float)
    centres = 0.5 * (lb[:-1] + lb[1:])
    rng = np.random.default_rng(7)
    beams = []
    for number, (gantry, coll) in enumerate([(0.0, 0.0), (110.0, 15.0), (250.0, 0.0)], 1):
        cps, w = [], 0.0
        weights = rng.uniform(0.5, 1.5, 3)
        weights /= weights.sum()
        for s in range(3):
            open_ = np.abs(centres) < 40.0
            a = np.where(open_, -rng.uniform(5.0, 40.0, len(centres)), 0.0)
            b = np.where(open_, rng.uniform(5.0, 40.0, len(centres)), 0.0)
            jaw = ((-45.0, 45.0), (-40.0, 40.0))
            cps.append(ControlPoint(2 * s, w, *jaw, a, b))
            w += weights[s]
            cps.append(ControlPoint(2 * s + 1, w, *jaw, a, b))
        beams.append(Beam(number, f"B{number}", gantry, coll, 0.0, np.array([5.0, -10.0, 0.0]),
                          cps, 120.0, beam_type="DYNAMIC"))
    return Plan("fast", beams, "1")


def test_plan_dose_matches_reference_path(phantom, plan, bm):
    ref = _reference_plan_dose(phantom, plan, bm, 4.0, 2.5)
    assert ref.max() > 0.5  # a real dose (Gy)
    cache: dict = {}
    d1 = plan_dose(phantom, plan, beam_model=bm, dose_grid_spacing_mm=4.0,
                   fluence_resolution_mm=2.5).array
    d2 = plan_dose(phantom, plan, beam_model=bm, dose_grid_spacing_mm=4.0,
                   fluence_resolution_mm=2.5, depth_cache=cache).array
    tm: dict = {}
    d3 = plan_dose(phantom, plan, beam_model=bm, dose_grid_spacing_mm=4.0,
                   fluence_resolution_mm=2.5, depth_cache=cache, timings=tm).array
    for d in (d1, d2, d3):
        assert np.abs(d - ref).max() <= 0.005 * ref.max()
    assert np.array_equal(d2, d3)  # cached depths are the traced ones
    assert tm["depth_s"] >= 0.0 and tm["kernel_s"] > 0.0 and tm["total_s"] >= tm["kernel_s"]


def test_depths_are_exact_siddon(phantom, plan, bm):
    dgrid = make_dose_grid(phantom, 4.0)
    body = body_on_dose_grid(phantom, dgrid, None, bm.body_density_threshold)
    idx = np.flatnonzero(body.ravel())[::7]
    pts, gpts = dose_points(dgrid, idx, phantom)
    b = plan.beams[1]
    g = beam_geometry(b.gantry_deg, b.collimator_deg, b.couch_deg, b.isocenter_lps_mm)
    d = beam_point_depths(phantom, g, pts, gpts, sad_mm=1000.0)
    expect = radiological_path_lengths(phantom, g.source_lps_mm, pts)
    assert np.allclose(d, expect, rtol=1e-9, atol=1e-9)


def _depth_entries(cache: dict) -> int:
    return sum(1 for k in cache if k[0] == "exact_depth")


def test_depth_cache_reuse_and_invalidation(phantom, plan, bm):
    cache: dict = {}
    kw = {"beam_model": bm, "dose_grid_spacing_mm": 4.0, "depth_cache": cache}
    plan_dose(phantom, plan, **kw)
    assert _depth_entries(cache) == 3  # one entry per beam direction
    # half the fluence resolution: same depths reused, dose still that of the reference
    half = plan_dose(phantom, plan, fluence_resolution_mm=5.0, **kw).array
    assert _depth_entries(cache) == 3
    ref_half = _reference_plan_dose(phantom, plan, bm, 4.0, 5.0)
    assert np.abs(half - ref_half).max() <= 0.005 * ref_half.max()
    # other densities (a new array, or the same array changed in place) must not reuse the
    # old depths
    denser = Volume(phantom.array * 1.1, phantom.grid, phantom.units)
    got = plan_dose(denser, plan, **kw).array
    ref_dense = _reference_plan_dose(denser, plan, bm, 4.0, 2.5)
    assert np.abs(got - ref_dense).max() <= 0.005 * ref_dense.max()
    assert _depth_entries(cache) == 6
    mutable = Volume(phantom.array.copy(), phantom.grid, phantom.units)
    plan_dose(mutable, plan, **kw)
    mutable.array[mutable.array == 1.0] = 1.1  # in place: water -> denser tissue
    got = plan_dose(mutable, plan, **kw).array
    ref_mut = _reference_plan_dose(mutable, plan, bm, 4.0, 2.5)
    assert np.abs(got - ref_mut).max() <= 0.005 * ref_mut.max()
    cache.clear()
    # another dose grid: separate entries
    plan_dose(phantom, plan, **kw)
    plan_dose(phantom, plan, beam_model=bm, dose_grid_spacing_mm=6.0, depth_cache=cache)
    assert _depth_entries(cache) == 6
    # another body (dose voxels): not served from the entry of the full body
    body = np.asarray(phantom.array) > 0.5
    body[:, :, : body.shape[2] // 2] = False
    part = plan_dose(phantom, plan, body_mask=body, **kw).array
    full = plan_dose(phantom, plan, **kw).array
    sel = part > 0
    assert sel.any() and np.allclose(part[sel], full[sel], rtol=1e-9, atol=1e-12)


def test_one_density_and_body_per_ct_in_a_shared_cache(phantom, plan, bm, monkeypatch):
    """A CT in HU is converted to density once per cache and CT content, and the body on the
    dose grid found once; the dose is the same as without the cache. A CT changed in place is
    converted again."""
    import adaptive.dose.depth_cache as dc

    calls = []
    real = dc.hu_to_density
    monkeypatch.setattr(dc, "hu_to_density", lambda ct: calls.append(1) or real(ct))
    hu = Volume((np.asarray(phantom.array, dtype=np.float32) - 1.0) * 1000.0, phantom.grid, "HU")
    cache: dict = {}
    kw = {"beam_model": bm, "dose_grid_spacing_mm": 4.0}
    first = plan_dose(hu, plan, depth_cache=cache, **kw).array
    again = plan_dose(hu, plan, depth_cache=cache, **kw).array
    assert len(calls) == 1 and sum(1 for k in cache if k[0] in ("density", "body")) == 2
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, plan_dose(hu, plan, **kw).array)   # no cache
    hu.array[hu.array > -100.0] += 100.0                                      # in place
    changed = plan_dose(hu, plan, depth_cache=cache, **kw).array
    np.testing.assert_array_equal(changed, plan_dose(hu, plan, **kw).array)
    assert not np.array_equal(changed, first) and len(calls) == 4


def test_dij_depths_serve_the_plan_dose(phantom, plan, bm):
    """The Dij stores its exact depths (rows and scatter nodes, per beam) in the depth cache;
    the plan dose on the same CT and dose grid takes them and traces only the body voxels the
    Dij has no row for. Same dose as without the cache (the same rays, traced once)."""
    from adaptive.dose.dij import compute_dij
    from adaptive.dose.plan_dose import scatter_stride

    spacing = 3.0
    assert scatter_stride([spacing] * 3) == 2            # the coarse nodes are shared too
    cache: dict = {}
    dij = compute_dij(phantom, plan.beams, None, None, beam_model=bm,
                      dose_grid_spacing_mm=spacing, depth_cache=cache)
    assert len(cache) == 2 * len(plan.beams)             # rows and nodes, per beam
    dij_rows = {k: len(v[0]) for k, v in cache.items()}
    assert all(n > 0 for n in dij_rows.values())
    got = plan_dose(phantom, plan, beam_model=bm, dose_grid_spacing_mm=spacing,
                    depth_cache=cache).array
    ref = plan_dose(phantom, plan, beam_model=bm, dose_grid_spacing_mm=spacing).array
    assert ref.max() > 0.5
    assert np.abs(got - ref).max() <= 1e-9 * ref.max()
    # the same entries, completed to the plan dose's body voxels (no second set of keys)
    assert {k for k in cache if k[0] == "exact_depth"} == set(dij_rows)
    n_body = int((ref > 0).sum())
    voxel_keys = [k for k in cache if k[0] == "exact_depth" and k[-1] == 0]
    assert all(len(cache[k][0]) >= dij.n_voxels for k in voxel_keys)
    assert all(len(cache[k][0]) >= 0.9 * n_body for k in voxel_keys)
