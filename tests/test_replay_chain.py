"""The offline adaptive chain (`adaptive replay`) on a committed fraction: registration →
synthetic CT + propagated structures → re-optimisation warm-started from the scheduled
plan → checks → scheduled-vs-adapted comparison, with every output checked through the
written DICOM files."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from adaptive.config import config_path
from adaptive.optimization.goals import load_goals
from adaptive.replay import load_manifest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from adaptive.pipeline.fraction import run_fraction
    from adaptive.pipeline.planning import PlanSettings

    m = load_manifest(REPO / "replay_data")
    case = m.case("pelvis01")
    assert case.has_rtplan, "the scheduled plan of pelvis01 must be committed"
    fx = case.fraction(1)
    out = tmp_path_factory.mktemp("chain")
    goals = load_goals(config_path("goals", "prostate.toml"))
    # short optimiser deadline: the warm start from the scheduled plan is already close
    res = run_fraction(case.directory, fx.directory, goals,
                       settings=PlanSettings(deadline_s=5.0), out_dir=out)
    return res, out, case, goals


def test_outputs_exist(chain):
    res, out, _, _ = chain
    for p in ("dvf.mha", "RS.dcm", "REG.dcm", "registration.json", "comparison.json",
              "plan_report.json", "timings.json", "scheduled_today/RD.dcm"):
        assert (out / p).is_file(), p
    assert len(list((out / "synthetic_ct").glob("*.dcm"))) > 10
    if res.result["adapted"]["checks_passed"]:
        assert (out / "RP.dcm").is_file() and (out / "RD.dcm").is_file()
    else:  # a failed plan is never written, and the failure is reported
        assert not (out / "RP.dcm").exists()
        rep = json.loads((out / "plan_report.json").read_text())
        assert rep["written"] == [] and not rep["checks"]["passed"]
        pytest.fail(f"adapted plan failed its checks: {res.adapted.checks.summary()}")


def test_adapted_plan_references_scheduled_plan_and_propagated_structures(chain):
    _res, out, case, _ = chain
    sched = pydicom.dcmread(case.planning_rtplan, stop_before_pixels=True)
    rp = pydicom.dcmread(out / "RP.dcm", stop_before_pixels=True)
    rs = pydicom.dcmread(out / "RS.dcm", stop_before_pixels=True)
    ref = rp.ReferencedRTPlanSequence[0]
    assert ref.ReferencedSOPInstanceUID == sched.SOPInstanceUID
    assert ref.RTPlanRelationship == "PREDECESSOR"
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    # today's plan lives in today's frame (CBCT = synthetic CT), not the planning frame
    sct = pydicom.dcmread(next((out / "synthetic_ct").glob("*.dcm")), stop_before_pixels=True)
    assert rp.FrameOfReferenceUID == sct.FrameOfReferenceUID == rs.FrameOfReferenceUID
    assert rp.FrameOfReferenceUID != sched.FrameOfReferenceUID
    rd = pydicom.dcmread(out / "scheduled_today/RD.dcm", stop_before_pixels=True)
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == sched.SOPInstanceUID


def test_comparison_has_every_goal_for_both_plans(chain):
    _res, out, _, goals = chain
    cmp = json.loads((out / "comparison.json").read_text())
    assert cmp["n_goals"] == len(goals.goals) == len(cmp["rows"])
    assert [(r["structure"], r["goal"].split()[0]) for r in cmp["rows"]] == \
        [(g.structure, g.metric) for g in goals.goals]
    for r in cmp["rows"]:
        assert isinstance(r["scheduled_value"], float) and isinstance(r["adapted_value"], float)
        assert isinstance(r["scheduled_passed"], bool) and isinstance(r["adapted_passed"], bool)
    # the adapted plan is re-optimised for today's anatomy: it meets at least as many goals
    # as the scheduled plan does on the same anatomy, and covers the target
    assert cmp["adapted_goals_passed"] >= cmp["scheduled_goals_passed"]
    d95 = next(r for r in cmp["rows"] if r["structure"] == "PTV" and "D95" in r["goal"])
    assert d95["adapted_passed"] and d95["adapted_value"] >= 57.0


def test_checks_reported_and_timings_present(chain):
    res, out, _, _ = chain
    names = {c["name"] for c in res.result["adapted"]["checks"]}
    assert {"dose_finite", "dose_recalculation", "mu_sanity", "deliverability"} <= names
    t = json.loads((out / "timings.json").read_text())
    for k in ("registration_total", "plan.dij", "plan.fluence_optimization", "plan.sequencing",
              "plan.deliverable_dose", "plan.checks", "planning.scheduled_recalc", "total"):
        assert t[k] > 0, k
    assert res.registration["fallback"] in (None, "rigid")


def test_failed_deformable_checks_leave_the_rigid_match_and_no_adapted_plan(tmp_path,
                                                                             monkeypatch):
    """The real stages on fx01 with a deformable-level limit no registration can meet
    (NMI 1.9): the gate keeps the rigid match (it passed its own checks), the outputs are made
    from it, no adapted plan is optimised, and the scheduled plan's metrics say they rest on
    the rigid match."""
    import dataclasses

    import numpy as np

    from adaptive.geometry.dvf_io import read_dvf
    from adaptive.pipeline import registration_gate
    from adaptive.pipeline.fraction import planning_stage, registration_stage
    from adaptive.pipeline.safety import SafetySettings
    from adaptive.registration.quality import affine_field

    strict = dataclasses.replace(SafetySettings.load(), min_nmi=1.9)
    monkeypatch.setattr(registration_gate.SafetySettings, "load", classmethod(lambda c: strict))
    case = load_manifest(REPO / "replay_data").case("pelvis01")
    fx = case.fraction(1)
    rp = case.directory / "planning" / "RP.dcm"
    reg = registration_stage(case.planning_ct_dir, case.planning_rtstruct, rp, fx.cbct_dir,
                             tmp_path / "reg")
    assert reg["validity"] == "rigid", reg["registration_summary"]
    assert reg["registration_failed"] == ["registration_similarity"]
    assert reg["fallback"] == "rigid" and "failed its checks" in \
        reg["quality"]["fallback_reason"]
    dvf, grid = read_dvf(reg["dvf"])
    np.testing.assert_allclose(dvf, affine_field(np.asarray(reg["rigid_matrix"]),
                                                 grid.voxel_centers_lps()), atol=1e-3)
    assert len(reg["review_images"]) == 3 and all(Path(p).is_file()
                                                  for p in reg["review_images"])
    goals = load_goals(config_path("goals", "prostate.toml"))
    po = planning_stage(rp, reg, tmp_path / "plan", goals)
    r = po.result
    assert r["adapted"]["rtplan"] is None and not r["adapted"]["checks_passed"]
    assert r["adapted"]["blocked_by"] == "registration"
    assert "registration_similarity" in r["adapted"]["reason"]
    assert "rigid match, which passed its checks" in r["metrics"]["on"]
    assert r["metrics"]["n_goals"] == len(goals.goals) == len(r["metrics"]["rows"])
    assert all(row["adapted_value"] is None and row["scheduled_value"] is not None
               for row in r["metrics"]["rows"])
    ds = pydicom.dcmread(r["scheduled"]["rtdose_today"])
    assert ds.Modality == "RTDOSE"
    assert not (tmp_path / "plan" / "RP.dcm").exists()
