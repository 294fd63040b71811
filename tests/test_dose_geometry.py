"""IEC 61217 beam geometry (HFS) and its effect on dose."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.dose.beam_geometry import beam_geometry
from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.plan_dose import plan_dose
from adaptive.errors import DoseError
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Beam, ControlPoint, Plan

ISO = np.array([10.0, -20.0, 30.0])


@pytest.mark.parametrize("gantry, direction", [(0, [0, -1, 0]), (90, [1, 0, 0]),
                                               (180, [0, 1, 0]), (270, [-1, 0, 0])])
def test_source_position_hfs(gantry, direction):
    g = beam_geometry(gantry, 0, 0, ISO)
    assert np.allclose(g.source_lps_mm, ISO + 1000.0 * np.array(direction), atol=1e-9)


def test_collimator_axes_at_gantry0():
    g = beam_geometry(0, 0, 0, ISO)
    assert np.allclose(g.rotation[:, 0], [1, 0, 0])  # IEC X -> patient left
    assert np.allclose(g.rotation[:, 1], [0, 0, 1])  # IEC Y -> superior (towards gantry)
    g90 = beam_geometry(0, 90, 0, ISO)
    assert np.allclose(g90.rotation[:, 0], [0, 0, 1])  # leaf travel now superior-inferior
    assert np.allclose(g90.rotation[:, 1], [-1, 0, 0])
    assert np.allclose(g90.source_lps_mm, g.source_lps_mm)


def test_couch_rotation_about_vertical_axis():
    # couch 90 (counter-clockwise from above) turns the head to the left of an observer at the
    # couch foot; the gantry-90 source then lies towards the patient's feet.
    g = beam_geometry(90, 0, 90, ISO)
    assert np.allclose(g.source_lps_mm, ISO + [0, 0, -1000.0], atol=1e-9)
    # the vertical beam is unchanged by couch rotation; the isocenter stays fixed
    g0 = beam_geometry(0, 0, 90, ISO)
    assert np.allclose(g0.source_lps_mm, ISO + [0, -1000.0, 0], atol=1e-9)
    # towards the gantry (field Y) now lies the patient's left side (+x LPS)
    assert np.allclose(g0.rotation[:, 1], [1, 0, 0])


def test_projection_round_trip():
    g = beam_geometry(33, 17, 8, ISO)
    p = np.array([[5.0, 40.0, -7.0], [-60.0, 3.0, 20.0]])
    assert np.allclose(g.beam_to_lps(g.lps_to_beam(p)), p)
    x, y, z = g.project_to_isoplane(ISO + 0 * p)
    assert np.allclose(x, 0) and np.allclose(y, 0) and np.allclose(z, 1000.0)


def test_non_hfs_patient_position_raises():
    with pytest.raises(DoseError, match="HFS"):
        beam_geometry(0, 0, 0, ISO, patient_position="FFS")


# --- dose-level checks on a small water cube ---------------------------------------------


@pytest.fixture(scope="module")
def cube():
    s = 4.0
    n = 41  # 160 mm cube centred on the origin
    g = Grid((n, n, n), origin=[-80.0] * 3, spacing=[s] * 3)
    return Volume(np.ones(g.shape, np.float32), g, "relative electron density")


@pytest.fixture(scope="module")
def bm():
    return load_beam_model()


def _dose(cube, bm, *beams):
    return plan_dose(cube, Plan("t", list(beams), "1"), beam_model=bm,
                     dose_grid_spacing_mm=None).array


def _beam(gantry, coll=0.0, couch=0.0, jx=(-30.0, 30.0), jy=(-30.0, 30.0), number=1):
    cps = [ControlPoint(0, 0.0, jx, jy), ControlPoint(1, 1.0, jx, jy)]
    return Beam(number, "b", gantry, coll, couch, np.zeros(3), cps, 100.0)


def test_gantry90_enters_from_patient_left(cube, bm):
    d = _dose(cube, bm, _beam(90))
    c = 20
    # entrance side (+x, patient left) near-surface dose > exit side
    assert d[c, c, 40 - 4] > 1.3 * d[c, c, 4]
    d270 = _dose(cube, bm, _beam(270))
    assert d270[c, c, 4] > 1.3 * d270[c, c, 40 - 4]
    # mirror images of each other in x (within 0.5 % of the maximum dose)
    assert np.max(np.abs(d270 - d[:, :, ::-1])) < 5e-3 * d.max()


def test_opposed_beams_symmetric(cube, bm):
    d = _dose(cube, bm, _beam(0, number=1), _beam(180, number=2))
    prof = d[20, :, 20]
    assert np.allclose(prof, prof[::-1], rtol=5e-3)


def test_collimator_90_swaps_elongated_field(cube, bm):
    d0 = _dose(cube, bm, _beam(0, jx=(-60.0, 60.0), jy=(-20.0, 20.0)))
    d90 = _dose(cube, bm, _beam(0, coll=90.0, jx=(-60.0, 60.0), jy=(-20.0, 20.0)))
    j = 20 + 12  # ~50 mm deep (source anterior)

    def width(p):
        return np.count_nonzero(p > 0.5 * p.max()) * 4.0
    # collimator 0: long axis along x (left-right); collimator 90: along z (sup-inf)
    assert width(d0[20, j, :]) > 2 * width(d0[:, j, 20])
    assert width(d90[:, j, 20]) > 2 * width(d90[20, j, :])
    assert np.allclose(d90[:, j, 20], d0[20, j, :], rtol=0.02, atol=0.002 * d0.max())


def test_couch90_gantry90_enters_from_feet(cube, bm):
    d = _dose(cube, bm, _beam(90, couch=90.0))
    c = 20
    # beam from inferior (-z) travelling superior: entrance at low k
    assert d[4, c, c] > 1.3 * d[40 - 4, c, c]
    # field spreads along x (patient left-right) and y, not along z
    assert d[c, c, c] > 0
