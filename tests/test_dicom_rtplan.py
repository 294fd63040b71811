"""RT Plan: exact round-trip of beams/control points/MU/references, dciodvfy, bad input."""

from __future__ import annotations

import re

import numpy as np
import pydicom
import pytest

from adaptive import RESEARCH_USE_STATEMENT
from adaptive.dicom import Provenance, new_uid, read_rtplan, write_rtplan
from adaptive.errors import DicomWriteError, MissingTagError, NotDicomError, StudyMismatchError
from adaptive.model import Beam, ControlPoint, PatientInfo, Plan, Prescription
from adaptive.model.identity import StudyIdentity

STUDY = StudyIdentity(PatientInfo("P9", "Doe^Jane"), "1.2.826.0.1.3680043.8.498.77", "20260101")


def _plan(n_leaves=10, with_refs=True):
    rng = np.random.default_rng(3)
    bounds = np.linspace(-50, 50, n_leaves + 1)
    beams = []
    for b, gantry in enumerate([0.0, 72.5, 215.25]):
        cps = []
        weights = [0.0, 0.0, 0.4, 0.4, 1.0, 1.0] if b != 1 else [0.0, 1.0]
        for i, w in enumerate(weights):
            x1 = np.round(rng.uniform(-40, 0, n_leaves), 1)
            x2 = np.round(x1 + rng.uniform(0, 30, n_leaves), 1)
            if i % 2 == 1:  # step-and-shoot: pairs of identical apertures
                x1, x2 = cps[-1].mlc_x1_mm.copy(), cps[-1].mlc_x2_mm.copy()
            cps.append(ControlPoint(i, w, jaw_x_mm=(-42.5, 37.0 + i), jaw_y_mm=(-30.0, 31.5),
                                    mlc_x1_mm=x1, mlc_x2_mm=x2,
                                    gantry_deg=gantry + 2.0 if (b == 2 and i == 3) else None))
        beams.append(Beam(number=b + 1, name=f"G{gantry:g}", gantry_deg=gantry, collimator_deg=5.0 * b,
                          couch_deg=0.0 if b < 2 else 350.0,
                          isocenter_lps_mm=np.array([1.25, -20.5, 33.0]), control_points=cps,
                          meterset_mu=123.456 + b, energy_mv=6.0, leaf_boundaries_mm=bounds,
                          beam_type="DYNAMIC" if b != 1 else "STATIC", description="seg" if b == 0 else ""))
    return Plan(label="ADAPT_F1", beams=beams, frame_of_reference_uid=new_uid(),
                prescription=Prescription(2.0, 30, "PTV_60"), name="Adapted fraction 1",
                referenced_structure_set_uid=new_uid() if with_refs else "",
                predecessor_plan_uid=new_uid() if with_refs else "",
                patient_id="P9", patient_name="Doe^Jane")


def _assert_same(a: Plan, b: Plan):
    assert (a.label, a.name, a.frame_of_reference_uid, a.referenced_structure_set_uid,
            a.predecessor_plan_uid, a.plan_intent, a.sop_instance_uid) == (
        b.label, b.name, b.frame_of_reference_uid, b.referenced_structure_set_uid,
        b.predecessor_plan_uid, b.plan_intent, b.sop_instance_uid)
    assert a.prescription == b.prescription
    assert len(a.beams) == len(b.beams)
    assert a.total_mu == pytest.approx(b.total_mu, abs=1e-9)
    for x, y in zip(a.beams, b.beams):
        for f in ("number", "name", "gantry_deg", "collimator_deg", "couch_deg", "meterset_mu",
                  "energy_mv", "sad_mm", "radiation_type", "beam_type", "treatment_machine_name",
                  "final_cumulative_meterset_weight", "description"):
            assert getattr(x, f) == getattr(y, f), f
        np.testing.assert_array_equal(x.isocenter_lps_mm, y.isocenter_lps_mm)
        np.testing.assert_array_equal(x.leaf_boundaries_mm, y.leaf_boundaries_mm)
        assert len(x.control_points) == len(y.control_points)
        for c, d in zip(x.control_points, y.control_points):
            assert (c.index, c.cumulative_meterset_weight, tuple(c.jaw_x_mm), tuple(c.jaw_y_mm),
                    c.gantry_deg, c.collimator_deg, c.couch_deg) == (
                d.index, d.cumulative_meterset_weight, tuple(d.jaw_x_mm), tuple(d.jaw_y_mm),
                d.gantry_deg, d.collimator_deg, d.couch_deg)
            np.testing.assert_array_equal(c.mlc_x1_mm, d.mlc_x1_mm)
            np.testing.assert_array_equal(c.mlc_x2_mm, d.mlc_x2_mm)
        assert [mu for _, mu in x.segments()] == pytest.approx([mu for _, mu in y.segments()])


def test_roundtrip_exact_and_dciodvfy(tmp_path, dciodvfy):
    plan = _plan()
    study = StudyIdentity(PatientInfo("P9", "Doe^Jane", "19800101", "F"), "1.2.3.4", "20260102",
                          "101112", "S9", "ACC9", "Ref^Doc")
    uid = write_rtplan(plan, tmp_path / "RP.dcm", provenance=Provenance(parameters={"goal": "x"}),
                       study=study)
    assert plan.sop_instance_uid == uid
    errors, text = dciodvfy(tmp_path / "RP.dcm")
    assert not errors and "RTPlan" in text, text  # IOD recognised, no crash
    back = read_rtplan(tmp_path / "RP.dcm")
    _assert_same(plan, back)
    assert back.patient_id == "P9" and back.study_instance_uid == "1.2.3.4"
    assert back.extra["provenance"]["parameters"] == {"goal": "x"}
    ds = pydicom.dcmread(tmp_path / "RP.dcm")
    assert ds.PlanIntent == "RESEARCH" and ds.RTPlanGeometry == "PATIENT"
    assert RESEARCH_USE_STATEMENT in ds.RTPlanDescription
    assert ds.ReferencedRTPlanSequence[0].RTPlanRelationship == "PREDECESSOR"
    assert float(ds.DoseReferenceSequence[0].TargetPrescriptionDose) == 60.0
    assert int(ds.FractionGroupSequence[0].NumberOfFractionsPlanned) == 30
    # every study-level attribute comes from the one study identity
    assert (ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber,
            str(ds.ReferringPhysicianName), ds.PatientBirthDate, ds.PatientSex) == (
        "20260102", "101112", "S9", "ACC9", "Ref^Doc", "19800101", "F")
    with pytest.raises(StudyMismatchError, match="patient"):
        write_rtplan(_plan(), tmp_path / "RP2.dcm", study=StudyIdentity(PatientInfo("P10"), "1.2.3.4"))
    # MLC positions: first N values bank X1, next N bank X2
    mlc = next(p for p in ds.BeamSequence[0].ControlPointSequence[0].BeamLimitingDevicePositionSequence
           if p.RTBeamLimitingDeviceType == "MLCX")
    np.testing.assert_array_equal(np.array(mlc.LeafJawPositions, float)[:10],
                                  plan.beams[0].control_points[0].mlc_x1_mm)


def test_plan_without_references_or_mlc(tmp_path, dciodvfy):
    plan = _plan(with_refs=False)
    plan.prescription = None
    for b in plan.beams:
        b.leaf_boundaries_mm = None
        for c in b.control_points:
            c.mlc_x1_mm = c.mlc_x2_mm = None
    write_rtplan(plan, tmp_path / "RP.dcm", study=STUDY)
    errors, text = dciodvfy(tmp_path / "RP.dcm")
    assert not errors and "RTPlan" in text, text  # IOD recognised, no crash
    back = read_rtplan(tmp_path / "RP.dcm")
    _assert_same(plan, back)
    assert back.beams[0].control_points[0].mlc_x1_mm is None


def test_write_rejects_inconsistent_plan(tmp_path):
    plan = _plan()
    plan.beams[0].control_points[2].mlc_x1_mm = np.zeros(4)
    with pytest.raises(DicomWriteError, match="leaf positions"):
        write_rtplan(plan, tmp_path / "RP.dcm", study=STUDY)
    assert not (tmp_path / "RP.dcm").exists()


def test_missing_tags_named(tmp_path):
    write_rtplan(_plan(), tmp_path / "RP.dcm", study=STUDY)
    ds = pydicom.dcmread(tmp_path / "RP.dcm")
    del ds.BeamSequence[1].ControlPointSequence[0].GantryAngle
    ds.save_as(tmp_path / "RP_nogantry.dcm")
    with pytest.raises(MissingTagError, match="GantryAngle") as e:
        read_rtplan(tmp_path / "RP_nogantry.dcm")
    assert "RP_nogantry.dcm" in str(e.value) and "beam 2" in str(e.value)
    ds = pydicom.dcmread(tmp_path / "RP.dcm")
    del ds.BeamSequence
    ds.save_as(tmp_path / "RP_nobeams.dcm")
    with pytest.raises(MissingTagError, match="BeamSequence"):
        read_rtplan(tmp_path / "RP_nobeams.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(NotDicomError, match=re.escape("junk.dcm")):
        read_rtplan(tmp_path / "junk.dcm")
