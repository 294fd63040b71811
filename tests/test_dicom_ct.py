"""CT series read/write: round-trip geometry and values, dciodvfy, and bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from adaptive import RESEARCH_USE_STATEMENT
from adaptive.dicom import Provenance, read_ct_series, read_provenance, write_ct_series
from adaptive.dicom.study import new_study
from adaptive.errors import (
    EmptySeriesError,
    GeometryError,
    MissingPixelDataError,
    MissingTagError,
    MixedFrameOfReferenceError,
    MixedSeriesError,
    NotDicomError,
    SeriesGapError,
)
from adaptive.geometry import Grid, Volume
from adaptive.model import PatientInfo, SeriesInfo


def _rot(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def make_ct(tmp_path: Path, name="ct", direction=None, seed=0, nz=20, **kw):
    g = Grid((nz, 32, 40), origin=[-100.0, -80.0, -30.0], spacing=[1.5, 1.2, 2.5],
             direction=np.eye(3) if direction is None else direction)
    a = np.random.default_rng(seed).integers(-1024, 2500, g.shape).astype(np.float32)
    info = SeriesInfo(PatientInfo("PAT1", "Test^Patient", "19700101", "O"), "", "", "",
                      study_id="S1", series_number=3)
    out = tmp_path / name
    study = kw.pop("study", None) or new_study(info.patient, study_id="S1")
    done = write_ct_series(Volume(a, g, "HU"), info, out, study=study, **kw)
    return out, a, g, done


def test_roundtrip_oblique(tmp_path, dciodvfy):
    d = _rot(20, 10)
    out, a, g, done = make_ct(tmp_path, direction=d, provenance=Provenance(
        input_uids={"source": "1.2.3"}, parameters={"x": np.float64(1.5)}, timings_s={"w": 0.1}),
        description="planning CT")
    vol, info = read_ct_series(out)
    assert vol.units == "HU" and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, a)
    assert vol.grid.same_as(g, tol_mm=1e-4)
    np.testing.assert_allclose(vol.grid.direction, d, atol=1e-6)
    assert info.series_instance_uid == done.series_instance_uid
    assert info.study_instance_uid == done.study_instance_uid
    assert info.frame_of_reference_uid == done.frame_of_reference_uid
    assert info.sop_instance_uids == done.sop_instance_uids
    assert len(set(done.sop_instance_uids)) == 20
    assert info.patient.patient_id == "PAT1" and info.patient.patient_name == "Test^Patient"
    assert info.series_number == 3 and info.study_id == "S1"
    assert RESEARCH_USE_STATEMENT in info.series_description
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 20
    ds = pydicom.dcmread(files[0])
    prov = read_provenance(ds)
    assert prov["input_uids"] == {"source": "1.2.3"} and prov["parameters"] == {"x": 1.5}
    assert ds.Manufacturer == "adaptive" and RESEARCH_USE_STATEMENT in ds.ImageComments
    errors, text = dciodvfy(files[0])
    assert not errors and "CTImage" in text, text  # IOD recognised, no crash
    # slice k position follows the grid; PixelSpacing = [row spacing (j), column spacing (i)]
    k = info.sop_instance_uids.index(ds.SOPInstanceUID)
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                               g.ijk_to_lps([0, 0, k]), atol=1e-4)
    assert [float(v) for v in ds.PixelSpacing] == [1.2, 1.5]


def test_file_list_shuffled_and_uids_kept(tmp_path):
    out, a, _g, _done = make_ct(tmp_path)
    files = sorted(out.glob("*.dcm"))
    rng = np.random.default_rng(1)
    files = [files[i] for i in rng.permutation(len(files))]
    vol, info = read_ct_series(files, modality="CT")
    np.testing.assert_array_equal(vol.array, a)
    # writing again with the same info reuses the SOP UIDs
    again = write_ct_series(vol, info, tmp_path / "again", study=info.study)
    assert again.sop_instance_uids == info.sop_instance_uids


def test_rescale_for_large_range(tmp_path):
    g = Grid((3, 8, 9), origin=[0, 0, 0], spacing=[1, 1, 2])
    a = np.linspace(-5000.0, 90000.0, g.n_voxels).reshape(g.shape).astype(np.float32)
    write_ct_series(Volume(a, g, "HU"), SeriesInfo(PatientInfo("P"), "", "", ""), tmp_path / "x",
                    study=new_study(PatientInfo("P")))
    vol, _ = read_ct_series(tmp_path / "x")
    slope = (a.max() - a.min()) / 65535
    assert np.abs(vol.array - a).max() <= slope * 0.51 + 1e-3


def test_non_dicom_file_named(tmp_path):
    out, *_ = make_ct(tmp_path)
    (out / "notes.txt").write_text("hello, not DICOM")
    with pytest.raises(NotDicomError, match=re.escape("notes.txt")):
        read_ct_series(out)


def test_missing_slice_is_gap(tmp_path):
    out, _a, _g, done = make_ct(tmp_path)
    (out / f"CT.{done.sop_instance_uids[7]}.dcm").unlink()
    with pytest.raises(SeriesGapError) as e:
        read_ct_series(out)
    assert done.sop_instance_uids[6] in str(e.value) and done.sop_instance_uids[8] in str(e.value)


def test_duplicate_slice_is_gap(tmp_path):
    out, _a, _g, done = make_ct(tmp_path)
    ds = pydicom.dcmread(out / f"CT.{done.sop_instance_uids[4]}.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    ds.save_as(out / "dup.dcm")
    with pytest.raises(SeriesGapError, match="duplicate"):
        read_ct_series(out)


def test_mixed_series(tmp_path):
    out, *_ = make_ct(tmp_path, name="a")
    out2, *_ = make_ct(tmp_path, name="b", seed=2)
    shutil.copy(next(out2.glob("*.dcm")), out / "other.dcm")
    with pytest.raises(MixedSeriesError):
        read_ct_series(out)


def test_mixed_frame_of_reference(tmp_path):
    out, _a, _g, done = make_ct(tmp_path)
    p = out / f"CT.{done.sop_instance_uids[3]}.dcm"
    ds = pydicom.dcmread(p)
    ds.FrameOfReferenceUID = "1.2.3.999"
    ds.save_as(p)
    with pytest.raises(MixedFrameOfReferenceError, match=re.escape("1.2.3.999")):
        read_ct_series(out)


def test_missing_and_truncated_pixel_data(tmp_path):
    out, _a, _g, done = make_ct(tmp_path)
    p = out / f"CT.{done.sop_instance_uids[5]}.dcm"
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    with pytest.raises(MissingPixelDataError, match=p.name):
        read_ct_series(out)
    out2, _a, _g, done2 = make_ct(tmp_path, name="t")
    p2 = out2 / f"CT.{done2.sop_instance_uids[2]}.dcm"
    data = p2.read_bytes()
    p2.write_bytes(data[:-1000])  # truncated transfer
    with pytest.raises(MissingPixelDataError, match=p2.name):
        read_ct_series(out2)


def test_missing_required_tag(tmp_path):
    out, _a, _g, done = make_ct(tmp_path)
    p = out / f"CT.{done.sop_instance_uids[9]}.dcm"
    ds = pydicom.dcmread(p)
    del ds.ImagePositionPatient
    ds.save_as(p)
    with pytest.raises(MissingTagError, match="ImagePositionPatient") as e:
        read_ct_series(out)
    assert p.name in str(e.value)


def test_non_orthonormal_orientation(tmp_path):
    out, _a, _g, _done = make_ct(tmp_path, nz=3)
    for p in out.glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [1, 0, 0, 0.3, 1, 0]
        ds.save_as(p)
    with pytest.raises(GeometryError, match="orthonormal"):
        read_ct_series(out)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySeriesError):
        read_ct_series(tmp_path / "empty")


def test_non_finite_values_rejected(tmp_path):
    g = Grid((2, 4, 5), origin=[0, 0, 0], spacing=[1, 1, 1])
    a = np.zeros(g.shape, np.float32)
    a[1, 2, 3] = np.nan
    with pytest.raises(GeometryError, match="non-finite"):
        write_ct_series(Volume(a, g, "HU"), SeriesInfo(PatientInfo("P"), "", "", ""), tmp_path / "x",
                        study=new_study(PatientInfo("P")))


def test_rt_objects_next_to_series_are_skipped(tmp_path):
    from adaptive.dicom import write_rtstruct
    from adaptive.model import Roi, StructureSet

    out, a, _g, done = make_ct(tmp_path, nz=4)
    write_rtstruct(StructureSet([Roi(1, "A")], done), out / "RS.dcm", study=done.study)
    vol, info = read_ct_series(out)
    np.testing.assert_array_equal(vol.array, a)
    assert info.sop_instance_uids == done.sop_instance_uids
    with pytest.raises(EmptySeriesError, match="MR"):
        read_ct_series(out, modality="MR")
