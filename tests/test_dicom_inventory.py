"""Folder inventory and the ``adaptive info`` command on CT + RS + RP + RD + junk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptive.cli import main
from adaptive.dicom import (
    inventory,
    new_uid,
    write_ct_series,
    write_rtdose,
    write_rtplan,
    write_rtstruct,
)
from adaptive.dicom.enums import DoseSummationType
from adaptive.dicom.study import new_study
from adaptive.geometry import Grid, Volume
from adaptive.model import Beam, ControlPoint, PatientInfo, Plan, Roi, SeriesInfo, StructureSet


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "case"
    g = Grid((10, 16, 20), origin=[-20.0, -15.0, -10.0], spacing=[2.0, 2.0, 3.0])
    info = write_ct_series(Volume(np.zeros(g.shape, np.float32), g, "HU"),
                           SeriesInfo(PatientInfo("PX1", "Inv^Test"), "", "", "", study_id="ST1"),
                           root / "ct", description="planning CT",
                           study=new_study(PatientInfo("PX1", "Inv^Test"), study_id="ST1"))
    mask = np.zeros(g.shape, bool)
    mask[3:7, 4:10, 5:12] = True
    ss = StructureSet([Roi(1, "PTV", mask=Volume(mask, g, "mask"), interpreted_type="PTV"),
                       Roi(2, "Bladder", mask=Volume(np.roll(mask, 3, axis=2), g, "mask"))],
                      referenced_series=info, label="SS1")
    ss_uid = write_rtstruct(ss, root / "RS.dcm", study=info.study)
    cps = [ControlPoint(0, 0.0), ControlPoint(1, 1.0)]
    plan = Plan("PLAN_A", [Beam(1, "AP", 0, 0, 0, [0, 0, 0], cps, 111.5),
                           Beam(2, "PA", 180, 0, 0, [0, 0, 0], cps, 100.0)],
                info.frame_of_reference_uid, referenced_structure_set_uid=ss_uid,
                predecessor_plan_uid=new_uid())
    plan_uid = write_rtplan(plan, root / "RP.dcm", study=info.study)
    write_rtdose(Volume(np.ones(g.shape, np.float32), g, "Gy"), root / "RD.dcm",
                 summation=DoseSummationType.PLAN, plan=plan, series=info, image_grid=g,
                 study=info.study)
    (root / "readme.txt").write_text("not a DICOM file")
    return root, info, ss_uid, plan_uid, plan.predecessor_plan_uid


def test_inventory_content(folder):
    root, info, ss_uid, plan_uid, _pred = folder
    inv = inventory(root)
    assert inv.n_files == 10 + 3 + 1 and inv.n_dicom == 13
    assert inv.patients == {"PX1": "Inv^Test"}
    assert list(inv.studies) == [info.study_instance_uid]
    assert len(inv.series) == 1
    s = inv.series[0]
    assert (s.modality, s.n_instances, s.series_instance_uid, s.slice_spacing_mm, s.geometry_ok) == (
        "CT", 10, info.series_instance_uid, 3.0, True)
    kinds = {o.kind: o for o in inv.rt_objects}
    assert set(kinds) == {"RTSTRUCT", "RTPLAN", "RTDOSE"}
    assert kinds["RTSTRUCT"].details["roi_names"] == ["PTV", "Bladder"]
    assert kinds["RTSTRUCT"].details["referenced_series_uid"] == info.series_instance_uid
    assert kinds["RTPLAN"].details["total_mu"] == pytest.approx(211.5)
    assert kinds["RTPLAN"].details["referenced_structure_set_uid"] == ss_uid
    assert kinds["RTDOSE"].details["referenced_plan_uid"] == plan_uid
    assert len(inv.frames_of_reference[info.frame_of_reference_uid]) == 4
    probs = {(p.kind, p.path.split("/")[-1]) for p in inv.problems}
    assert ("not_dicom", "readme.txt") in probs
    assert ("missing_reference", "RP.dcm") in probs  # predecessor plan is not in the folder
    assert len(inv.problems) == 2


def test_inventory_finds_gap_and_missing_references(folder):
    root, info, *_ = folder
    (root / "ct" / f"CT.{info.sop_instance_uids[4]}.dcm").unlink()
    (root / "RP.dcm").unlink()
    inv = inventory(root)
    kinds = [p.kind for p in inv.problems]
    assert "series_gap" in kinds and not inv.series[0].geometry_ok
    assert any(p.kind == "missing_reference" and "plan" in p.message and p.path.endswith("RD.dcm")
               for p in inv.problems)


def test_info_command_text_and_json(folder, capsys):
    root, info, _ss_uid, plan_uid, pred = folder
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    for needle in ("PX1", "Series CT", info.series_instance_uid, "RTSTRUCT", "PTV", "Bladder", "RTPLAN",
                   "PLAN_A", "211.5 MU", "RTDOSE", plan_uid, "readme.txt", "not_dicom", pred):
        assert needle in out, needle
    assert main(["info", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {o["kind"] for o in data["rt_objects"]} == {"RTSTRUCT", "RTPLAN", "RTDOSE"}
    assert any(p["kind"] == "not_dicom" for p in data["problems"])
