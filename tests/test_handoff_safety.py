"""Hand-off safety checks: registration Jacobian and propagated-contour sanity."""

import numpy as np
import pytest

from adaptive.errors import ConfigError
from adaptive.geometry import Grid, Volume
from adaptive.model import PatientInfo, Roi, SeriesInfo, StructureSet
from adaptive.pipeline.safety import (
    SafetySettings,
    contour_checks,
    registration_checks,
    roi_volumes_cc,
)

GRID = Grid((20, 30, 30), origin=[-45, -45, -30], spacing=[3, 3, 3])


def ball(center_ijk, radius_vox, grid=GRID):
    k, j, i = np.indices(grid.shape)
    c = center_ijk
    return (i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2 <= radius_vox ** 2


def sset(masks: dict[str, np.ndarray], types=None) -> StructureSet:
    info = SeriesInfo(PatientInfo("P"), "1.2", "1.2.3", "1.2.3.4")
    rois = [Roi(n + 1, name, interpreted_type=(types or {}).get(name, "ORGAN"),
                mask=Volume(m, GRID)) for n, (name, m) in enumerate(masks.items())]
    return StructureSet(rois, info)


def by_name(items):
    return {i.name: i for i in items}


def test_defaults_load_and_typo_is_refused(tmp_path):
    s = SafetySettings.load()
    assert s.min_jacobian == 0.0 and s.target_volume_ratio[0] < 1 < s.target_volume_ratio[1]
    bad = tmp_path / "safety.toml"
    bad.write_text("[registration]\nmin_jacobian = 0\nmax_fraction_folded = 0\n"
                   "allow_rigid_fallback = true\nmin_jacobain = 1\n[contours]\n")
    with pytest.raises(ConfigError, match="min_jacobain"):
        SafetySettings.load(bad)


def test_registration_folding_blocks_and_clean_field_passes():
    s = SafetySettings()
    ok = by_name(registration_checks({"jacobian_min": 0.4,
                                      "jacobian_fraction_nonpositive": 0.0}, None, s))
    assert ok["registration_jacobian"].passed
    folded = by_name(registration_checks({"jacobian_min": -0.2,
                                          "jacobian_fraction_nonpositive": 1e-4}, None, s))
    assert not folded["registration_jacobian"].passed
    assert folded["registration_jacobian"].blocking
    missing = by_name(registration_checks({}, None, s))
    assert not missing["registration_jacobian"].passed
    rigid = by_name(registration_checks({"jacobian_min": 1.0,
                                         "jacobian_fraction_nonpositive": 0.0}, "rigid", s))
    assert rigid["registration_fallback"].passed and not rigid["registration_fallback"].blocking
    strict = SafetySettings(allow_rigid_fallback=False)
    r2 = by_name(registration_checks({"jacobian_min": 1.0,
                                      "jacobian_fraction_nonpositive": 0.0}, "rigid", strict))
    assert not r2["registration_fallback"].passed and r2["registration_fallback"].blocking


def test_contours_plausible_pass_and_implausible_fail():
    s = SafetySettings()
    planning = sset({"PTV": ball((15, 15, 10), 4), "BLADDER": ball((15, 8, 10), 4)},
                    {"PTV": "PTV"})
    vols = roi_volumes_cc(planning, GRID)
    assert vols["PTV"] == pytest.approx(ball((15, 15, 10), 4).sum() * 27 / 1000)
    # today: target shifted (same volume), bladder twice as full -> plausible
    today = sset({"PTV": ball((16, 15, 10), 4), "BLADDER": ball((15, 8, 10), 5)})
    items = by_name(contour_checks(vols, today, GRID, ["PTV", "BLADDER"], "PTV",
                                   {"PTV": "PTV"}, s))
    assert all(i.passed for i in items.values()), [i.detail for i in items.values()]
    # a target that grew by 1.7x is an implausible propagation
    grown = sset({"PTV": ball((15, 15, 10), 4.8), "BLADDER": ball((15, 8, 10), 4)})
    items = by_name(contour_checks(vols, grown, GRID, ["PTV", "BLADDER"], "PTV",
                                   {"PTV": "PTV"}, s))
    assert not items["contour_volumes"].passed and "PTV" in items["contour_volumes"].detail
    # an empty organ and a missing one
    gone = sset({"PTV": ball((15, 15, 10), 4), "BLADDER": np.zeros(GRID.shape, bool)})
    items = by_name(contour_checks(vols, gone, GRID, ["PTV", "BLADDER", "RECTUM"], "PTV",
                                   {"PTV": "PTV"}, s))
    assert not items["contours_present"].passed
    assert "BLADDER (empty)" in items["contours_present"].detail
    assert "RECTUM (absent)" in items["contours_present"].detail


def test_target_truncated_by_field_of_view_fails():
    s = SafetySettings()
    vols = {"PTV": ball((15, 15, 10), 4).sum() * 27 / 1000}
    cut = ball((15, 15, 1), 4)  # reaches slice 0: truncated by the scan length
    items = by_name(contour_checks(vols, sset({"PTV": cut}), GRID, ["PTV"], "PTV",
                                   {"PTV": "PTV"}, s))
    assert not items["target_inside_image"].passed
