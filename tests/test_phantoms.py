"""Phantoms, daily deformations and CBCT simulation checked against analytic truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from adaptive.geometry.jacobian import jacobian_determinant
from adaptive.geometry.volume import Grid
from adaptive.phantoms.cbct import CbctDegradation, CbctGeometry, simulate_fraction
from adaptive.phantoms.deformation import (
    DailyVariation,
    OrganMotionField,
    daily_dvf,
)
from adaptive.phantoms.pelvis import (
    HU,
    PelvisAnatomy,
    default_planning_grid,
    isocenter_from_ptv,
    pelvis_phantom,
)
from adaptive.phantoms.shapes import rotation_matrix

SMALL_PLAN = {"spacing_mm": (3.5, 3.5, 3.5), "size_ijk": (116, 80, 44)}
SMALL_CBCT = CbctGeometry(size_ijk=(73, 73, 35), spacing_mm=(3.5, 3.5, 3.5), fov_diameter_mm=240.0)


@pytest.fixture(scope="module")
def pelvis():
    anat = PelvisAnatomy.sample(7, gas_pockets=())
    grid = default_planning_grid(anat, **SMALL_PLAN)
    return anat, pelvis_phantom(grid, 7, anatomy=anat)


def test_pelvis_is_deterministic_and_seed_dependent(pelvis):
    anat, ph = pelvis
    again = pelvis_phantom(ph.grid, 7, anatomy=anat)
    assert np.array_equal(ph.ct.array, again.ct.array)
    for name in ph.masks:
        assert np.array_equal(ph.masks[name], again.masks[name]), name
    other = pelvis_phantom(ph.grid, 8)
    assert not np.array_equal(ph.ct.array, other.ct.array)
    assert PelvisAnatomy.sample(8) != PelvisAnatomy.sample(9)


def test_pelvis_rois_names_types_and_plausible_volumes(pelvis):
    _, ph = pelvis
    assert [r.name for r in ph.rois] == ["BODY", "BLADDER", "RECTUM", "PROSTATE", "SEMINAL_VESICLES",
                                         "FEMUR_L", "FEMUR_R", "PTV"]
    types = {r.name: r.interpreted_type for r in ph.rois}
    assert types["BODY"] == "EXTERNAL" and types["PROSTATE"] == "CTV" and types["PTV"] == "PTV"
    assert 20 < ph.volume_cc("PROSTATE") < 45
    assert 120 < ph.volume_cc("BLADDER") < 450
    assert 40 < ph.volume_cc("RECTUM") < 160
    assert 2 < ph.volume_cc("SEMINAL_VESICLES") < 20
    # organs are mutually exclusive and inside the body
    organs = ["BLADDER", "RECTUM", "PROSTATE", "SEMINAL_VESICLES", "FEMUR_L", "FEMUR_R"]
    total = sum(ph.masks[n].astype(int) for n in organs)
    assert total.max() == 1
    for n in organs + ["PTV"]:
        assert not np.any(ph.masks[n] & ~ph.masks["BODY"]), n
    # femora are mirror images about the phantom's sagittal midplane
    assert abs(ph.volume_cc("FEMUR_L") - ph.volume_cc("FEMUR_R")) < 0.05 * ph.volume_cc("FEMUR_L")


def test_pelvis_hu_per_tissue(pelvis):
    _anat, ph = pelvis
    ct = ph.ct.array
    def ero(m):
        return ndimage.binary_erosion(m, iterations=2)
    assert abs(np.median(ct[ero(ph.masks["BLADDER"])]) - HU["urine"]) < 8
    assert abs(np.median(ct[ero(ph.masks["PROSTATE"])]) - HU["prostate"]) < 10
    # noise level ~12 HU in homogeneous urine
    assert 8 < np.std(ct[ero(ph.masks["BLADDER"])]) < 18
    # subcutaneous fat: just inside the skin
    body = ph.masks["BODY"]
    skin_layer = body & ~ndimage.binary_erosion(body, iterations=3) & ndimage.binary_erosion(body, iterations=1)
    assert -130 < np.median(ct[skin_layer]) < -60
    # air outside
    outside = ~ndimage.binary_dilation(body, iterations=2)
    assert abs(np.median(ct[outside]) + 1000) < 15
    # bone: cortex > 700 HU somewhere in each femur, cancellous interior ~220
    for side in ("FEMUR_L", "FEMUR_R"):
        m = ph.masks[side]
        assert np.percentile(ct[m], 95) > 700
        inner = ndimage.binary_erosion(m, iterations=2)
        assert 120 < np.median(ct[inner]) < 400
    # HU stay in the CT range
    assert ct.min() >= -1024 and ct.max() <= 3071


def test_planning_gas_renders_as_air_in_rectum():
    anat = PelvisAnatomy()
    anat = dataclasses.replace(anat, gas_pockets=(anat.rectal_gas_pocket(0.0, 9.0),))
    grid = default_planning_grid(anat, **SMALL_PLAN)
    ph = pelvis_phantom(grid, 1, anatomy=anat, noise_hu=0)
    assert ph.ct.array[ph.masks["RECTUM"]].min() < -700
    ph0 = pelvis_phantom(grid, 1, anatomy=dataclasses.replace(anat, gas_pockets=()), noise_hu=0)
    assert ph0.ct.array[ph0.masks["RECTUM"]].min() > -200


def test_ptv_is_prostate_plus_margin(pelvis):
    anat, ph = pelvis
    ptv, pro = ph.masks["PTV"], ph.masks["PROSTATE"]
    assert np.all(ptv[pro])
    # independent check of the expansion with a k-d tree of prostate voxel centres
    pts = ph.grid.voxel_centers_lps()
    tree = cKDTree(pts[pro])
    d_ptv, _ = tree.query(pts[ptv])
    assert d_ptv.max() <= anat.ptv_margin_mm + 1e-6
    ring = ndimage.binary_dilation(ptv, iterations=2) & ~ptv
    d_out, _ = tree.query(pts[ring])
    assert d_out.min() > anat.ptv_margin_mm
    # volume grows as expected for a 6 mm margin on a ~30 cc ellipsoid (roughly doubles)
    assert 1.6 < ph.volume_cc("PTV") / ph.volume_cc("PROSTATE") < 2.8


def test_isocenter_is_ptv_centroid(pelvis):
    anat, ph = pelvis
    iso = isocenter_from_ptv(ph)
    assert np.linalg.norm(iso - anat.isocenter_lps_mm()) < 3.0  # near the analytic prostate centre


def test_jacobian_of_known_affine_field():
    g = Grid(shape=(10, 11, 12), origin=(-5, 3, 7), spacing=(1.5, 2.0, 2.5),
             direction=rotation_matrix(0, 0, 30))
    a = np.array([[0.1, 0.02, 0.0], [-0.05, -0.2, 0.03], [0.0, 0.04, 0.15]])
    x = g.voxel_centers_lps()
    u = x @ a.T + np.array([3.0, -2.0, 1.0])
    det = jacobian_determinant(u, g)
    assert np.allclose(det, np.linalg.det(np.eye(3) + a), atol=1e-9)


@pytest.mark.parametrize("seed,fraction", [(7, 1), (7, 2), (11, 3), (12, 4)])
def test_daily_dvf_never_folds(pelvis, seed, fraction):
    anat, ph = pelvis
    v = DailyVariation.sample(seed, fraction, anat)
    # exaggerate to stress the construction: bladder ±, rectum +, big prostate motion
    strong = dataclasses.replace(v, bladder_scale=1.25 if fraction % 2 else 0.75, rectum_scale=1.35,
                                 prostate_translation_mm=(3.0, 8.0, -8.0),
                                 prostate_rotation_deg=(10.0, 3.0, -3.0))
    for var in (v, strong):
        dvf = daily_dvf(SMALL_CBCT.grid(), anat, var, isocenter_from_ptv(ph))
        det = jacobian_determinant(dvf, SMALL_CBCT.grid())
        assert det.min() > 0.2, det.min()
        assert det.max() < 5.0


def test_setup_only_field_is_exact_rigid_map_to_isocenter(pelvis):
    anat, ph = pelvis
    iso = isocenter_from_ptv(ph)
    g = SMALL_CBCT.grid()
    zero = DailyVariation()
    dvf = daily_dvf(g, anat, zero, iso)
    assert np.allclose(dvf, iso[None, None, None, :].astype(np.float32), atol=1e-3)
    # the centre voxel of the CBCT is the CBCT-frame origin = isocenter
    c = tuple(s // 2 for s in g.shape)
    assert np.allclose(g.voxel_centers_lps()[c], 0.0)
    t, r = (2.0, -3.5, 4.0), (1.0, -2.0, 1.5)
    setup = DailyVariation(setup_translation_mm=t, setup_rotation_deg=r)
    dvf = daily_dvf(g, anat, setup, iso)
    x = g.voxel_centers_lps()
    expected = iso + np.asarray(t) + x @ rotation_matrix(*r).T - x
    assert np.abs(dvf - expected).max() < 1e-3
    assert np.allclose(dvf[c], iso + np.asarray(t), atol=1e-3)


def test_prostate_motion_direction_and_size(pelvis):
    anat, _ = pelvis
    tau = (1.5, 4.0, -3.0)
    field = OrganMotionField(anat, DailyVariation(prostate_translation_mm=tau))
    c = np.asarray(anat.origin_lps_mm) + np.asarray(anat.prostate_center_mm)
    # the daily prostate centre sits at c + tau: it flows back to the planning centre c
    back = field.flow((c + np.asarray(tau))[None])[0]
    assert np.linalg.norm(back - c) < 0.3
    # far from the prostate (femoral head) nothing moves
    far = np.asarray(anat.origin_lps_mm) + np.array([anat.femoral_head_x_mm, -5.0, 0.0])
    assert np.linalg.norm(field.flow(far[None])[0] - far) < 1e-6


def test_bladder_scale_changes_bladder_volume_by_its_cube(pelvis):
    anat, ph = pelvis
    iso = isocenter_from_ptv(ph)
    geom = CbctGeometry(size_ijk=(61, 61, 51), spacing_mm=(3.5, 3.5, 3.5), fov_diameter_mm=210)
    # shift the CBCT so that it covers the whole bladder: put the isocenter on the bladder
    b_iso = np.asarray(anat.origin_lps_mm) + np.asarray(anat.bladder_center_mm)
    for s in (0.85, 1.15):
        fx = simulate_fraction(ph, anat, b_iso, 1, 3, geometry=geom,
                               variation=DailyVariation(bladder_scale=s))
        ratio = fx.truth_masks["BLADDER"].sum() * geom.grid().voxel_volume_mm3 / 1000 / ph.volume_cc("BLADDER")
        assert abs(ratio - s ** 3) < 0.08 * s ** 3, (s, ratio)
    assert iso is not None


def test_cbct_simulation(pelvis):
    anat, ph = pelvis
    iso = isocenter_from_ptv(ph)
    var = DailyVariation(gas_pockets=(anat.rectal_gas_pocket(5.0, 9.0),), rectum_scale=1.2)
    deg = CbctDegradation(noise_hu=25.0, cupping_hu=80.0, offset_hu=-20.0)
    fx = simulate_fraction(ph, anat, iso, 2, 7, variation=var, geometry=SMALL_CBCT, degradation=deg)
    again = simulate_fraction(ph, anat, iso, 2, 7, variation=var, geometry=SMALL_CBCT, degradation=deg)
    assert np.array_equal(fx.cbct.array, again.cbct.array) and np.array_equal(fx.dvf, again.dvf)
    g = fx.cbct.grid
    x = g.voxel_centers_lps()
    r = np.hypot(x[..., 0], x[..., 1])
    radius = SMALL_CBCT.fov_diameter_mm / 2
    # truncated field of view: padding outside the cylinder, body cut laterally
    assert np.all(fx.cbct.array[r > radius] == -1000)
    assert np.any(fx.truth_masks["BODY"] & (r > radius))
    # cupping: the deficit (clean - cbct) in soft tissue is larger at the centre than near the edge
    soft = (fx.clean_hu > -50) & (fx.clean_hu < 80)
    diff = fx.clean_hu - fx.cbct.array
    centre = np.mean(diff[soft & (r < 40)])
    edge = np.mean(diff[soft & (r > 100) & (r < radius)])
    assert 50 < centre - edge < 95, (centre, edge)
    # clean - cbct = cupping * (1 - (r/R)^2) * (HU + 1000)/1000 - offset (offset = -20 HU)
    c = soft & (r < 40)
    expected = np.mean(80 * (1 - (r[c] / radius) ** 2) * (fx.clean_hu[c] + 1000) / 1000) + 20
    assert abs(np.mean(diff[c]) - expected) < 3
    # noise ~25 HU in the degraded image (in homogeneous regions)
    urine = ndimage.binary_erosion(fx.truth_masks["BLADDER"], iterations=2) & (r < radius)
    assert 18 < np.std(fx.cbct.array[urine]) < 33
    # the day's rectal gas appears in the CBCT although the planning CT has none
    assert ph.ct.array[ph.masks["RECTUM"]].min() > -300
    assert fx.cbct.array[fx.truth_masks["RECTUM"]].min() < -600
