"""RT Dose: round-trip of values/geometry/references, dciodvfy, bad input."""

from __future__ import annotations

import re

import numpy as np
import pydicom
import pytest

from adaptive import RESEARCH_USE_STATEMENT
from adaptive.dicom import Provenance, new_uid, read_rtdose
from adaptive.dicom import write_rtdose as _write_rtdose
from adaptive.dicom.enums import DoseSummationType as DST
from adaptive.errors import (
    DicomWriteError,
    GridOutsideImageError,
    MissingPixelDataError,
    MissingTagError,
    StudyMismatchError,
)
from adaptive.geometry import Grid, Volume
from adaptive.model import Beam, ControlPoint, PatientInfo, Plan, SeriesInfo


def _series():
    return SeriesInfo(PatientInfo("P3", "Roe^R"), new_uid(), new_uid(), new_uid(),
                      sop_instance_uids=[new_uid() for _ in range(5)], study_date="20260101")


def _plan(series):
    b = Beam(1, "AP", 0, 0, 0, [0, 0, 0], [ControlPoint(0, 0.0), ControlPoint(1, 1.0)], 100.0)
    return Plan("P", [b], series.frame_of_reference_uid, sop_instance_uid=new_uid(), fraction_group_number=2)


def _dose(direction=None):
    g = Grid((12, 20, 24), origin=[-23.0, -19.0, -11.0], spacing=[2.0, 2.0, 3.0],
             direction=np.eye(3) if direction is None else direction)
    c = g.voxel_centers_lps()
    a = 2.0 * np.exp(-np.sum((c - g.center_lps()) ** 2, axis=-1) / 400.0)
    return Volume(a.astype(np.float32), g, "Gy")


#: an image grid enclosing every dose grid of these tests (the dose was "computed on" it)
IMAGE = Grid((40, 60, 60), origin=[-60.0, -60.0, -60.0], spacing=[2.0, 2.0, 3.0])


def write_rtdose(d, path, *, series, summation=DST.PLAN, image_grid=IMAGE, study=None, **kw):
    return _write_rtdose(d, path, series=series, summation=summation, image_grid=image_grid,
                         study=study or series.study, **kw)


def _rot():
    a = np.deg2rad(30)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


@pytest.mark.parametrize("direction", [None, "oblique"])
def test_roundtrip_and_dciodvfy(tmp_path, dciodvfy, direction):
    s = _series()
    plan = _plan(s)
    d = _dose(_rot() if direction else None)
    uid = write_rtdose(d, tmp_path / "RD.dcm", plan=plan, series=s, comment="adapted",
                       provenance=Provenance(timings_s={"dose": 1.5}))
    errors, text = dciodvfy(tmp_path / "RD.dcm")
    assert not errors and "RTDose" in text, text
    back, info = read_rtdose(tmp_path / "RD.dcm")
    assert back.units == "Gy" and back.grid.same_as(d.grid, tol_mm=1e-5)
    assert np.abs(back.array - d.array).max() <= 2.0 / 65535 * 0.51
    assert info["sop_instance_uid"] == uid and info["referenced_plan_uid"] == plan.sop_instance_uid
    assert info["frame_of_reference_uid"] == s.frame_of_reference_uid
    assert info["dose_summation_type"] == "PLAN" and info["study_instance_uid"] == s.study_instance_uid
    assert info["patient"].patient_id == "P3" and info["provenance"]["timings_s"] == {"dose": 1.5}
    assert RESEARCH_USE_STATEMENT in info["comment"] and "adapted" in info["comment"]
    ds = pydicom.dcmread(tmp_path / "RD.dcm")
    assert ds.DoseUnits == "GY" and ds.DoseType == "PHYSICAL" and int(ds.NumberOfFrames) == 12
    assert [float(v) for v in ds.GridFrameOffsetVector] == pytest.approx(np.arange(12) * 3.0)


def test_left_handed_grid_and_fraction_type(tmp_path, dciodvfy):
    s = _series()
    d = _dose(np.diag([1.0, 1.0, -1.0]))  # slices stacked towards −z (feet first)
    write_rtdose(d, tmp_path / "RD.dcm", plan=_plan(s), series=s, summation=DST.FRACTION)
    errors, text = dciodvfy(tmp_path / "RD.dcm")
    assert not errors and "RTDose" in text, text
    back, _info = read_rtdose(tmp_path / "RD.dcm")
    # read back as the equivalent right-handed grid: same dose at the same LPS points
    pts = d.grid.voxel_centers_lps().reshape(-1, 3)
    np.testing.assert_allclose(back.sample_lps(pts, order=0), d.array.reshape(-1), atol=2.0 / 65535)
    assert ds_ref_fg(tmp_path / "RD.dcm") == 2


def ds_ref_fg(p):
    ds = pydicom.dcmread(p)
    return int(ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence[0].ReferencedFractionGroupNumber)


def test_32_bit_precision(tmp_path):
    # (dciodvfy cannot check 32-bit pixel data: it aborts; the 16-bit default is validated above)
    s = _series()
    d = _dose(_rot())
    write_rtdose(d, tmp_path / "RD32.dcm", plan=_plan(s), series=s, bits=32)
    back, _ = read_rtdose(tmp_path / "RD32.dcm")
    assert int(pydicom.dcmread(tmp_path / "RD32.dcm").BitsAllocated) == 32
    assert np.abs(back.array.astype(np.float64) - d.array).max() <= 2.0e-9
    assert back.grid.same_as(d.grid, tol_mm=1e-5)


def test_absolute_offsets_accepted(tmp_path):
    s = _series()
    d = _dose()
    write_rtdose(d, tmp_path / "RD.dcm", plan=_plan(s), series=s)
    ds = pydicom.dcmread(tmp_path / "RD.dcm")
    ds.GridFrameOffsetVector = [str(-11.0 + 3.0 * k) for k in range(12)]  # absolute z form
    ds.save_as(tmp_path / "RD_abs.dcm")
    back, _ = read_rtdose(tmp_path / "RD_abs.dcm")
    assert back.grid.same_as(d.grid, tol_mm=1e-5)


def test_bad_input(tmp_path):
    s = _series()
    d = _dose()
    with pytest.raises(DicomWriteError, match="requires the plan"):
        write_rtdose(d, tmp_path / "RD.dcm", plan=None, series=s)
    unwritten = _plan(s)
    unwritten.sop_instance_uid = ""
    with pytest.raises(DicomWriteError, match="write the plan"):
        write_rtdose(d, tmp_path / "RD.dcm", plan=unwritten, series=s)
    neg = d.with_array(d.array - 1.0)
    with pytest.raises(DicomWriteError, match="negative"):
        write_rtdose(neg, tmp_path / "RD.dcm", plan=_plan(s), series=s)
    assert not (tmp_path / "RD.dcm").exists()
    write_rtdose(d, tmp_path / "RD.dcm", plan=None, series=s, summation=DST.RECORD)
    ds = pydicom.dcmread(tmp_path / "RD.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "RD_trunc.dcm")
    with pytest.raises(MissingPixelDataError, match=re.escape("RD_trunc.dcm")):
        read_rtdose(tmp_path / "RD_trunc.dcm")
    ds = pydicom.dcmread(tmp_path / "RD.dcm")
    del ds.GridFrameOffsetVector
    ds.save_as(tmp_path / "RD_nogfov.dcm")
    with pytest.raises(MissingTagError, match="GridFrameOffsetVector") as e:
        read_rtdose(tmp_path / "RD_nogfov.dcm")
    assert "RD_nogfov.dcm" in str(e.value)


def test_summation_type_is_stated_and_one_session_references_its_fraction_group(tmp_path, dciodvfy):
    s = _series()
    plan = _plan(s)  # fraction group 2
    with pytest.raises(TypeError, match="summation"):
        _write_rtdose(_dose(), tmp_path / "RD.dcm", plan=plan, series=s, image_grid=IMAGE,
                      study=s.study)  # no silent default
    with pytest.raises(DicomWriteError, match="DoseSummationType"):
        write_rtdose(_dose(), tmp_path / "RD.dcm", plan=plan, series=s, summation="PLAN")
    with pytest.raises(DicomWriteError, match="not supported"):
        write_rtdose(_dose(), tmp_path / "RD.dcm", plan=plan, series=s, summation=DST.BEAM)
    write_rtdose(_dose(), tmp_path / "RD.dcm", plan=plan, series=s,
                 summation=DST.FRACTION_SESSION)
    errors, text = dciodvfy(tmp_path / "RD.dcm")
    assert not errors, text
    ds = pydicom.dcmread(tmp_path / "RD.dcm")
    assert ds.DoseSummationType == "FRACTION_SESSION"
    ref = ds.ReferencedRTPlanSequence[0]
    assert ref.ReferencedSOPInstanceUID == plan.sop_instance_uid
    assert int(ref.ReferencedFractionGroupSequence[0].ReferencedFractionGroupNumber) == 2


def test_refuses_dose_outside_its_image_other_frame_or_study(tmp_path):
    s = _series()
    d = _dose()
    small = Grid((5, 10, 10), origin=[-5.0, -5.0, -5.0], spacing=[2.0, 2.0, 3.0])
    with pytest.raises(GridOutsideImageError, match="outside the image"):
        write_rtdose(d, tmp_path / "RD.dcm", plan=_plan(s), series=s, image_grid=small)
    # a dose grid exactly on the image's voxel centres is inside
    write_rtdose(d, tmp_path / "RD.dcm", plan=_plan(s), series=s, image_grid=d.grid)
    other_frame = _plan(s)
    other_frame.frame_of_reference_uid = new_uid()
    with pytest.raises(DicomWriteError, match="Frame of Reference"):
        write_rtdose(d, tmp_path / "RD2.dcm", plan=other_frame, series=s)
    import dataclasses
    with pytest.raises(StudyMismatchError, match="study_time"):
        write_rtdose(d, tmp_path / "RD2.dcm", plan=_plan(s), series=s,
                     study=dataclasses.replace(s.study, study_time="101010"))
    assert not (tmp_path / "RD2.dcm").exists()
