"""Registration core against known truth (analytic phantom, known displacements)."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest

from adaptive.config import load_toml
from adaptive.errors import ConfigError, PatientMismatchError, RegistrationError
from adaptive.geometry.jacobian import jacobian_determinant
from adaptive.geometry.volume import Volume
from adaptive.model.identity import PatientInfo, SeriesInfo
from adaptive.registration import register, synthetic_ct
from adaptive.registration.evaluate import dice, dilate_mm, hausdorff95, tre
from adaptive.registration.quality import affine_field
from adaptive.registration.settings import DEFAULT_CONFIG, load_registration_settings
from registration_phantom import (
    cbct_grid,
    phantom_hu,
    planning_ct,
    planning_grid,
    simulate_cbct,
    smooth_dvf,
    structure_masks,
)

SHIFT = np.array([4.0, 3.0, -5.0])
ISO = np.array([12.0, -18.0, 9.0])


@pytest.fixture(scope="module")
def ct():
    return planning_ct()


def roi(cbct: Volume, result, margin_mm=8.0):
    """Region of interest: CBCT body inside the field of view, away from its edge."""
    from scipy import ndimage
    d = ndimage.distance_transform_edt(result.fixed_mask, sampling=cbct.grid.spacing[::-1])
    return result.body_mask & (d > margin_mm)


@pytest.fixture(scope="module")
def shifted(ct):
    g = cbct_grid()
    u = np.broadcast_to(SHIFT, g.shape + (3,)).astype(np.float32)
    cb = simulate_cbct(g, u, noise_hu=15.0, seed=1)
    return cb, u, register(cb, ct)


@pytest.fixture(scope="module")
def deformed(ct):
    """Daily CBCT in its own Frame of Reference (origin = isocenter), smooth deformation,
    strong cupping, truncated FOV, a gas bubble the planning CT lacks."""
    g = cbct_grid()
    u = smooth_dvf(g, amplitude=(5.0, -7.0, 4.0), sigma_mm=40.0, centre=(0.0, -25.0, 5.0))
    # bubble in the rectum region (CBCT frame): anatomy point (0, 30, 0) is at q = p - ISO - u
    bubble_c = np.array([0.0, 30.0, -5.0]) - ISO
    cb = simulate_cbct(g, u, frame_shift=ISO, noise_hu=20.0, cupping_hu=100.0, offset_hu=-60.0,
                       fov_radius_mm=110.0, pad_value=-1000.0, gas_bubble=(bubble_c, 9.0), seed=2)
    truth = (u + ISO).astype(np.float32)
    return cb, truth, bubble_c, register(cb, ct, isocenter_lps_mm=ISO)


def test_rigid_shift_recovered(shifted):
    cb, u, r = shifted
    assert r.fallback is None
    # CBCT and planning CT in the same coordinates: the identity convention wins the
    # candidate search (every candidate scored and recorded)
    assert r.initial_alignment == "identity"
    rec = r.quality["initial_alignment"]
    assert {c["name"] for c in rec["candidates"]} >= {"identity", "image_centres",
                                                      "body_centroids"}
    assert all(c["nmi"] is not None for c in rec["candidates"])
    assert r.quality["setup_correction"]["convention"] == "identity"
    np.testing.assert_allclose(r.quality["setup_correction"]["translation_norm_mm"],
                               np.linalg.norm(SHIFT), atol=0.5)
    np.testing.assert_allclose(r.rigid_matrix[:3, 3], SHIFT, atol=0.5)
    np.testing.assert_allclose(r.rigid_matrix[:3, :3], np.eye(3), atol=0.01)
    err = tre(r.dvf_lps_mm, u, roi(cb, r), cb.grid)
    # The full field on these coarse 4 mm test volumes: the B-spline stage follows image-
    # content differences between the two renderings below the voxel size (measured 0.67 mm
    # mean = 1/6 voxel). The 0.5 mm requirement is checked at a clinical voxel size below.
    assert err["mean_mm"] < 1.0, err
    assert r.dvf_lps_mm.dtype == np.float32 and r.dvf_lps_mm.shape == cb.grid.shape + (3,)


@pytest.mark.slow
def test_pure_shift_full_field_within_half_mm_at_clinical_voxel_size():
    """The issue's pure rigid shift: the FULL returned field (rigid + B-spline) comes back
    within 0.5 mm, on 2 mm voxels (clinical CT/CBCT voxels are 0.5-1 mm in-plane, 1-3 mm
    slices). The spurious deformation scales with the voxel size (measured mean field error on
    this phantom without cupping: 4 mm 0.67, 2 mm 0.16, 1.5 mm 0.13 mm; the pelvis phantom with
    1 x 1 x 3 mm CT and 0.9 x 0.9 x 2 mm CBCT: 0.25-0.29 mm; see config/registration.toml), so the
    coarse CI volumes above cannot show the requirement and this test does (with cupping)."""
    sp = 2.0
    ct = planning_ct(planning_grid(spacing=(sp,) * 3, shape=(72, 128, 168)))
    g = cbct_grid(spacing=(sp,) * 3, shape=(60, 120, 120))
    shift = np.array([3.3, -2.6, 4.1])  # not a multiple of the voxel size
    u = np.broadcast_to(shift, g.shape + (3,)).astype(np.float32)
    cb = simulate_cbct(g, u, noise_hu=15.0, cupping_hu=40.0, seed=5)
    r = register(cb, ct)
    assert r.fallback is None
    np.testing.assert_allclose(r.rigid_matrix[:3, 3], shift, atol=0.25)
    full = tre(r.dvf_lps_mm, u, roi(cb, r), cb.grid)
    print("pure shift, full field", full, r.timings_s)
    assert full["mean_mm"] < 0.5, full  # measured 0.31 mm (p95 1.19, max 2.3 mm)
    assert full["p95_mm"] < 1.5, full
    assert r.quality["jacobian_fraction_nonpositive"] == 0.0


def test_bending_energy_removes_spurious_deformation(shifted, ct):
    """Multi-metric (MI + bending energy) through the global thread count (number_of_threads=
    with multi-metric segfaults): on a pure shift the FULL field comes back within 0.5 mm mean
    in the body, without the B-spline noise of the unregularised default (measured 0.43 mm
    mean, 1.2 mm max; default 0.78 / 5.0 mm)."""
    cb, u, r0 = shifted
    cfg = _config(bspline__Registration="MultiMetricMultiResolutionRegistration",
                  bspline__Metric=["AdvancedMattesMutualInformation",
                                   "TransformBendingEnergyPenalty"],
                  bspline__Metric0Weight=1.0, bspline__Metric1Weight=10000.0)
    r = register(cb, ct, config=cfg)
    assert r.fallback is None
    assert r.parameters["bspline_transform"]["Transform"] == ["BSplineTransform"]
    err = tre(r.dvf_lps_mm, u, r.body_mask, cb.grid)
    assert err["mean_mm"] < 0.5, err
    assert err["max_mm"] < 2.0, err
    assert err["max_mm"] < tre(r0.dvf_lps_mm, u, r0.body_mask, cb.grid)["max_mm"]
    assert r.quality["jacobian_min"] > 0.9


def test_smooth_deformation_with_cupping_and_truncated_fov(deformed, ct):
    cb, truth, _, r = deformed
    assert r.fallback is None and r.initial_alignment == "isocenter"
    m = roi(cb, r)
    assert m.sum() > 2000
    err = tre(r.dvf_lps_mm, truth, m, cb.grid)
    rigid_only = tre(affine_field(r.rigid_matrix, cb.grid.voxel_centers_lps()).astype(np.float32),
                     truth, m, cb.grid)
    print("deformable", err, "rigid-only", rigid_only, r.timings_s)
    assert err["mean_mm"] < 1.5, err
    assert err["mean_mm"] < 0.7 * rigid_only["mean_mm"], (err, rigid_only)
    q = r.quality
    assert q["jacobian_fraction_nonpositive"] == 0.0 and q["jacobian_min"] > 0.2
    assert q["similarity_final"]["mi"] > q["similarity_initial"]["mi"]
    assert q["deformation_mean_mm"] > 0.5  # it did deform (beyond the rigid part)
    for k in ("prepare", "rigid", "deformable", "field", "quality", "total"):
        assert r.timings_s[k] >= 0
    # propagated organs vs. the truth (masks of the deformed anatomy on the CBCT grid)
    from adaptive.registration.propagate import propagate_mask
    true_masks = structure_masks(cb.grid, truth)
    plan_masks = structure_masks(ct.grid)
    for name in ("Bladder", "Prostate"):
        prop = propagate_mask(Volume(plan_masks[name], ct.grid, "mask"), r.dvf_lps_mm, cb.grid)
        assert dice(prop, true_masks[name]) > 0.85, name
        assert hausdorff95(prop, true_masks[name], cb.grid) < 5.0, name


def test_synthetic_ct_has_cbct_gas_and_outline(deformed, ct):
    cb, truth, bubble_c, r = deformed
    sct = synthetic_ct(ct, cb, r.dvf_lps_mm)
    assert sct.grid.same_as(cb.grid) and sct.units == "HU"
    pts = cb.grid.voxel_centers_lps()
    in_bubble = np.linalg.norm(pts - bubble_c, axis=-1) < 6.0
    assert in_bubble.sum() > 5
    assert np.all(sct.array[in_bubble] < -500), sct.array[in_bubble]
    # the planning CT had tissue there: without the CBCT the bubble would not be in the sCT
    plan_there = phantom_hu(pts[in_bubble] + truth[in_bubble])
    assert np.all(plan_there > -200)
    # inside the body, away from the bubble, the sCT matches the true anatomy's HU (the
    # planning phantom deformed by the truth), not the CBCT's cupped/offset values
    m = roi(cb, r, 12.0) & (np.linalg.norm(pts - bubble_c, axis=-1) > 20)
    true_hu = phantom_hu(pts[m] + truth[m])
    assert np.median(np.abs(sct.array[m] - true_hu)) < 30.0
    assert np.median(np.abs(cb.array[m] - true_hu)) > 40.0
    # outside the body inside the FOV: air; truncated region outside the FOV: deformed CT
    from adaptive.registration.masks import valid_region_mask
    fov = valid_region_mask(cb)
    outside = ~fov
    true_out = phantom_hu(pts[outside] + truth[outside])
    assert np.mean(np.abs(sct.array[outside] - true_out) < 100) > 0.9


def test_deterministic_with_same_threads(shifted, ct):
    cb, _, r1 = shifted
    r2 = register(cb, ct)
    d = np.abs(r1.dvf_lps_mm - r2.dvf_lps_mm).max()
    # measured: identical with the same thread count (fixed RandomSeed, fixed thread split)
    assert d == 0.0, f"runs differ by up to {d} mm"
    np.testing.assert_array_equal(r1.rigid_matrix, r2.rigid_matrix)
    # another thread count: different summation order -> bounded float-rounding drift
    r3 = register(cb, ct, config=_config(registration__threads=1))
    d3 = np.linalg.norm(r1.dvf_lps_mm - r3.dvf_lps_mm, axis=-1).max()
    assert d3 < 0.5, d3
    from adaptive.registration.elastix_backend import itk_module
    assert itk_module(2).MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 2


def test_a_thread_count_set_behind_the_backend_does_not_change_the_result(shifted, ct):
    """Anything in a long-lived process (a Dask worker's set-up, a library, another test)
    may set ITK's global thread count; the next registration must still run on its
    configured count and give the same result bit for bit (the archive replay once differed
    from a single-fraction replay this way)."""
    from adaptive.registration.elastix_backend import itk_module

    cb, _, r1 = shifted
    itk = itk_module(2)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)   # behind the backend's back
    r2 = register(cb, ct)
    d = np.abs(r1.dvf_lps_mm - r2.dvf_lps_mm).max()
    # measured with the backend trusting its remembered count (before the fix): the fields
    # differed by up to 0.096 mm on this phantom, and the rigid matrices too
    assert d == 0.0, f"the fields differ by up to {d} mm"
    np.testing.assert_array_equal(r1.rigid_matrix, r2.rigid_matrix)
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 2


def _config(**changes):
    raw = load_toml(DEFAULT_CONFIG)
    raw = copy.deepcopy(raw)
    for path, v in changes.items():
        sec, key = path.split("__")
        if sec in ("rigid", "bspline"):
            raw["elastix"][sec][key] = v
        else:
            raw[sec][key] = v
    return raw


def test_deadline_tiny_budget_returns_rigid(shifted, ct):
    cb, u, _ = shifted
    r = register(cb, ct, budget_s=0.01)
    assert r.fallback == "rigid" and "no time left" in r.quality["fallback_reason"]
    np.testing.assert_allclose(r.dvf_lps_mm, affine_field(r.rigid_matrix,
                               cb.grid.voxel_centers_lps()), atol=1e-3)
    assert tre(r.dvf_lps_mm, u, roi(cb, r), cb.grid)["mean_mm"] < 0.8
    assert r.quality["jacobian_min"] > 0.99


def test_deadline_kills_deformable_stage(shifted, ct, monkeypatch):
    """The deformable stage gets what is left of the budget and is killed when that runs
    out. Load-independent: register()'s clock is held still (types.SimpleNamespace in place
    of its time module), so however long preparation and the rigid stage take on a loaded
    machine, exactly budget - reserve = 2 s is left for the B-spline stage, which runs for
    real (100000 iterations: many minutes) and must be stopped after those 2 s."""
    import types

    from adaptive.registration import core

    cb, u, _ = shifted
    # the rigid stage keeps its full iterations: cut to 60 it stops 2.6 mm short of the
    # shift from the candidate search's start (what the gate's rigid_converged flags)
    cfg = _config(bspline__MaximumNumberOfIterations=100000, registration__finish_reserve_s=0.0,
                  registration__min_deformable_s=0.1)
    calls = []
    real_run = core._run_bspline

    def timed_run(args, timeout_s, in_subprocess):
        t0 = time.perf_counter()
        out = real_run(args, timeout_s, in_subprocess)
        calls.append((timeout_s, in_subprocess, out, time.perf_counter() - t0))
        return out
    monkeypatch.setattr(core, "_run_bspline", timed_run)
    monkeypatch.setattr(core, "time", types.SimpleNamespace(perf_counter=lambda: 1000.0))
    r = register(cb, ct, config=cfg, budget_s=2.0)
    assert r.fallback == "rigid"
    assert "exceeded" in r.quality["fallback_reason"], r.quality["fallback_reason"]
    [(timeout_s, in_subprocess, out, took)] = calls
    assert timeout_s == 2.0 and in_subprocess and out is None     # killed, no result
    assert 2.0 <= took < 2.0 + 30.0, took   # waited its time, then killed (kill + join 5 s)
    assert tre(r.dvf_lps_mm, u, roi(cb, r), cb.grid)["mean_mm"] < 1.0


def test_constant_image_refused(ct):
    g = cbct_grid()
    with pytest.raises(RegistrationError, match="empty or constant"):
        register(Volume(np.full(g.shape, 40.0, np.float32), g, "HU"), ct)
    with pytest.raises(RegistrationError, match="planning CT is constant"):
        register(simulate_cbct(g, np.zeros(g.shape + (3,), np.float32)),
                 Volume(np.zeros(ct.grid.shape, np.float32), ct.grid, "HU"))


def test_non_overlapping_refused(ct):
    """A received matrix or an isocenter that puts the CBCT nowhere near the planning CT is
    one candidate among others (identity, image centres, body centroids find the overlap);
    with only such candidates and no search the registration is refused."""
    g = cbct_grid()
    cb = simulate_cbct(g, np.zeros(g.shape + (3,), np.float32))
    m = np.eye(4)
    m[:3, 3] = (0.0, 0.0, 800.0)
    only = _config(initial_alignment__search=False, initial_alignment__use_identity=False,
                   initial_alignment__use_image_centres=False,
                   initial_alignment__use_body_centroids=False)
    with pytest.raises(RegistrationError, match="no initial alignment brings the CBCT"):
        register(cb, ct, initial_matrix=m, config=only)
    with pytest.raises(RegistrationError, match="no initial alignment brings the CBCT"):
        register(cb, ct, isocenter_lps_mm=(500.0, 0.0, 0.0), config=only)


def test_other_patient_refused(ct):
    g = cbct_grid()
    cb = simulate_cbct(g, np.zeros(g.shape + (3,), np.float32))
    a = SeriesInfo(PatientInfo("PAT-1"), "1.2.3", "1.2.3.4", "1.2.3.5", modality="CT")
    b = SeriesInfo(PatientInfo("PAT-2"), "1.2.3", "1.2.3.6", "1.2.3.7", modality="CT")
    with pytest.raises(PatientMismatchError, match="PAT-1"):
        register(cb, ct, cbct_info=a, ct_info=b)


def test_same_id_under_another_name_refused_before_registering(ct):
    """A CBCT with the planning CT's Patient ID but another Patient's Name (or a known birth
    date that differs) is refused before any registration work, by the rule the writers
    apply (it used to pass here and fail only when the synthetic CT was written)."""
    g = cbct_grid()
    cb = simulate_cbct(g, np.zeros(g.shape + (3,), np.float32))
    plan = SeriesInfo(PatientInfo("PAT-1", "DOE^JANE", "19600101"), "1.2.3", "1.2.3.4",
                      "1.2.3.5", modality="CT")
    other = SeriesInfo(PatientInfo("PAT-1", "ROE^RICHARD", "19600101"), "1.2.3", "1.2.3.6",
                       "1.2.3.7", modality="CT")
    with pytest.raises(PatientMismatchError, match=r"patient_name 'ROE\^RICHARD' != 'DOE\^JANE'"):
        register(cb, ct, cbct_info=other, ct_info=plan)
    born = SeriesInfo(PatientInfo("PAT-1", "DOE^JANE", "19610101"), "1.2.3", "1.2.3.6",
                      "1.2.3.7", modality="CT")
    with pytest.raises(PatientMismatchError, match="birth_date"):
        register(cb, ct, cbct_info=born, ct_info=plan)


def test_patient_mismatch_rule():
    me = PatientInfo("PAT-1", "DOE^JANE", "19600101", "F")
    assert me.mismatches(PatientInfo("PAT-1", "DOE^JANE", "19600101", "F")) == []
    # birth date and sex count only when both sides know them
    assert me.mismatches(PatientInfo("PAT-1", "DOE^JANE")) == []
    assert PatientInfo("PAT-1", "DOE^JANE").mismatches(me) == []
    assert me.mismatches(PatientInfo("PAT-1", "DOE^JANE", "19600101", "M")) == ["sex 'M' != 'F'"]
    # ID and name always count, an empty one included
    assert me.mismatches(PatientInfo("PAT-1", "", "19600101", "F")) == \
        ["patient_name '' != 'DOE^JANE'"]
    assert [m.split()[0] for m in me.mismatches(PatientInfo("PAT-2", "ROE^R"))] == \
        ["patient_id", "patient_name"]


def test_bad_initial_matrix_and_config(ct):
    g = cbct_grid()
    cb = simulate_cbct(g, np.zeros(g.shape + (3,), np.float32))
    with pytest.raises(RegistrationError, match="rotation"):
        register(cb, ct, initial_matrix=np.diag([2.0, 1, 1, 1]))
    with pytest.raises(ConfigError, match="unknown key"):
        load_registration_settings(_config(quality__max_fold=1))
    raw = _config()
    raw["elastix"]["bspline"]["RandomSeed"] = 3
    with pytest.raises(ConfigError, match="set by the code"):
        load_registration_settings(raw)


def test_settings_convert_to_elastix_strings():
    s = load_registration_settings()
    m = s.parameter_map("bspline")
    assert m["Transform"] == ["BSplineTransform"]
    assert m["WriteResultImage"] == ["false"]
    assert m["RandomSeed"] == [str(s.random_seed)]
    assert all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in m.values())


def test_jacobian_of_known_fields():
    g = cbct_grid(shape=(10, 12, 14), spacing=(2.0, 3.0, 4.0))
    p = g.voxel_centers_lps()
    a = 0.1
    det = jacobian_determinant((a * p).astype(np.float32), g)  # x -> (1+a) x
    np.testing.assert_allclose(det, (1 + a) ** 3, rtol=1e-4)
    fold = np.zeros(g.shape + (3,), np.float32)
    fold[..., 0] = -2.0 * p[..., 0]  # x -> -x: mirrored, det = -1
    assert np.allclose(jacobian_determinant(fold, g), -1.0, atol=1e-4)


def test_evaluate_metrics_known_shapes():
    g = cbct_grid(shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0))
    p = g.voxel_centers_lps()
    a = np.linalg.norm(p, axis=-1) < 10
    b = np.linalg.norm(p - [3.0, 0, 0], axis=-1) < 10
    assert dice(a, a) == 1.0
    assert 0.6 < dice(a, b) < 0.8
    assert 2.0 <= hausdorff95(a, b, g) <= 3.5
    assert dilate_mm(a, g, 2.0).sum() > a.sum()
    u = np.zeros(g.shape + (3,), np.float32)
    v = u.copy()
    v[..., 1] = 2.0
    e = tre(v, u, a, g)
    assert e["mean_mm"] == pytest.approx(2.0) and e["max_mm"] == pytest.approx(2.0)


def test_bspline_field_matches_transformix():
    from adaptive.geometry.volume import Grid
    from adaptive.registration import elastix_backend as eb

    g = Grid(shape=(12, 15, 17), origin=(-40.3, -31.1, -20.7), spacing=(5.3, 4.1, 4.4))
    size = (7, 6, 5)
    rng = np.random.default_rng(3)
    m = {"Transform": ["BSplineTransform"], "BSplineTransformSplineOrder": ["3"],
         "UseCyclicTransform": ["false"], "GridSize": [str(v) for v in size],
         "GridIndex": ["0", "0", "0"], "GridSpacing": ["20", "20", "20"],
         "GridOrigin": ["-70", "-60", "-50"], "GridDirection": ["1", "0", "0", "0", "1", "0", "0", "0", "1"],
         "NumberOfParameters": [str(3 * int(np.prod(size)))],
         "TransformParameters": [repr(float(v)) for v in rng.normal(0, 3, 3 * int(np.prod(size)))],
         "InitialTransformParameterFileName": ["NoInitialTransform"],
         "HowToCombineTransforms": ["Compose"], "FixedImageDimension": ["3"],
         "MovingImageDimension": ["3"], "FixedInternalImagePixelType": ["float"],
         "MovingInternalImagePixelType": ["float"], "UseDirectionCosines": ["true"],
         "ResampleInterpolator": ["FinalLinearInterpolator"], "Resampler": ["DefaultResampler"],
         "DefaultPixelValue": ["0"], "ResultImagePixelType": ["float"],
         "ResultImageFormat": ["mhd"], "CompressResultImage": ["false"]}
    mine = eb.bspline_field(m, g)
    ref = eb.transform_field([m], g)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(mine, ref, atol=1e-4)


def test_warm_up_runs():
    from adaptive.registration import warm_up

    t = warm_up()
    assert t > 0


def test_jacobian_in_slabs_matches_whole_volume(monkeypatch):
    """The slab-wise determinant (bounded memory) equals a whole-volume computation, also at
    slab boundaries and with an oblique grid, and a shear keeps det = 1."""
    from scipy.spatial.transform import Rotation

    import adaptive.geometry.jacobian as jac

    g = cbct_grid(shape=(11, 9, 8), spacing=(0.9, 1.3, 2.0))
    g = type(g)(shape=g.shape, origin=g.origin, spacing=g.spacing,
                direction=Rotation.from_euler("xyz", [10, 20, 30], degrees=True).as_matrix())
    u = np.random.default_rng(3).normal(0.0, 0.4, g.shape + (3,)).astype(np.float32)
    whole = jacobian_determinant(u, g)
    monkeypatch.setattr(jac, "_SLAB_VOXELS", 2 * 9 * 8)  # slabs of 2 slices
    np.testing.assert_allclose(jacobian_determinant(u, g), whole, rtol=1e-6, atol=1e-6)
    p = g.voxel_centers_lps()
    shear = np.zeros(g.shape + (3,), np.float32)
    shear[..., 0] = 0.3 * p[..., 2]  # x += 0.3 z: volume preserving
    np.testing.assert_allclose(jacobian_determinant(shear, g), 1.0, atol=1e-5)
