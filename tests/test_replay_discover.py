"""Discovery of replayable fractions in a clinic-style DICOM folder: which series is a daily
image, which plan it belongs to, what cannot be replayed and why. The files are written here
with pydicom (headers a TPS / imager would write), not with our writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from adaptive.dicom.daily_image import is_daily_image
from adaptive.replay.discover import discover, safe_name

CT = "1.2.840.10008.5.1.4.1.1.2"
RS = "1.2.840.10008.5.1.4.1.1.481.3"
RP = "1.2.840.10008.5.1.4.1.1.481.5"
REG = "1.2.840.10008.5.1.4.1.1.66.1"


def _base(sop_class: str, pid: str, study: str, modality: str) -> Dataset:
    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.PatientID, ds.PatientName, ds.StudyInstanceUID = pid, f"TEST^{pid}", study
    ds.Modality, ds.SeriesInstanceUID = modality, generate_uid()
    return ds


def ct_series(folder: Path, pid: str, *, description: str, for_uid: str, date: str = "",
              number: int = 1, slices: int = 4, gap: bool = False,
              image_type=("ORIGINAL", "PRIMARY", "AXIAL")) -> str:
    study = generate_uid()
    series = generate_uid()
    z = [float(k) * 3.0 for k in range(slices)]
    if gap:
        z[-1] += 6.0
    for k, zk in enumerate(z):
        ds = _base(CT, pid, study, "CT")
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series, number, description
        ds.FrameOfReferenceUID, ds.ImageType = for_uid, list(image_type)
        ds.StudyDate = ds.AcquisitionDate = date
        ds.ImagePositionPatient = [0.0, 0.0, zk]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.Rows, ds.Columns = [2.0, 2.0], 4, 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((4, 4), np.int16).tobytes()
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{series[-12:]}-{k}.dcm", enforce_file_format=True)
    return series


def planning(folder: Path, pid: str, *, label: str = "PLAN", date: str = "",
             predecessor: str = "", ct_description: str = "Planning CT") -> dict:
    """Planning CT + RT Struct referencing it + RT Plan referencing the RT Struct."""
    for_uid = generate_uid()
    ct = ct_series(folder / f"ct-{label}", pid, description=ct_description, for_uid=for_uid)
    rs = _base(RS, pid, generate_uid(), "RTSTRUCT")
    rs.StructureSetLabel = label
    se = Dataset()
    se.SeriesInstanceUID = ct
    st = Dataset()
    st.RTReferencedSeriesSequence = Sequence([se])
    fr = Dataset()
    fr.FrameOfReferenceUID = for_uid
    fr.RTReferencedStudySequence = Sequence([st])
    rs.ReferencedFrameOfReferenceSequence = Sequence([fr])
    rs.save_as(folder / f"rs-{label}.dcm", enforce_file_format=True)
    rp = _base(RP, pid, generate_uid(), "RTPLAN")
    rp.RTPlanLabel, rp.RTPlanDate, rp.FrameOfReferenceUID = label, date, for_uid
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = rs.SOPInstanceUID
    rp.ReferencedStructureSetSequence = Sequence([ref])
    if predecessor:
        pr = Dataset()
        pr.ReferencedSOPInstanceUID, pr.RTPlanRelationship = predecessor, "PREDECESSOR"
        rp.ReferencedRTPlanSequence = Sequence([pr])
    rp.save_as(folder / f"rp-{label}.dcm", enforce_file_format=True)
    return {"for": for_uid, "ct": ct, "rs": rs.SOPInstanceUID, "rp": rp.SOPInstanceUID}


def spatial_reg(folder: Path, pid: str, for_a: str, for_b: str) -> Path:
    ds = _base(REG, pid, generate_uid(), "REG")
    items = []
    for f in (for_a, for_b):
        it = Dataset()
        it.FrameOfReferenceUID = f
        items.append(it)
    ds.RegistrationSequence = Sequence(items)
    p = folder / f"reg-{ds.SOPInstanceUID[-8:]}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


def test_daily_image_rule_is_the_orchestrators():
    m = ("CBCT", "CONE BEAM")
    args = {"planning_ct_series_uid": "p", "planning_frame_of_reference_uid": "F"}
    assert is_daily_image("CT", "s", "Daily CBCT", [], "F", markers=m, **args)  # marker
    assert is_daily_image("CT", "s", "", ["ORIGINAL", "CONE BEAM"], "F", markers=m, **args)
    assert is_daily_image("CT", "s", "kV", [], "G", markers=m, **args)  # own frame
    assert not is_daily_image("CT", "s", "second CT", [], "F", markers=m, **args)
    assert not is_daily_image("CT", "p", "CBCT", [], "G", markers=m, **args)  # planning CT
    assert not is_daily_image("MR", "s", "CBCT", [], "G", markers=m, **args)
    assert not is_daily_image("CT", "s", "Synthetic CT (CBCT)", [], "G", markers=m, **args)
    # planning CT unknown: only a marker tells
    assert is_daily_image("CT", "s", "CBCT", [], "G", None, None, m)
    assert not is_daily_image("CT", "s", "kV", [], "G", None, None, m)


def test_patients_fractions_and_what_is_not_a_daily_image(tmp_path):
    a, b = "PAT-A", "PAT^B/2"  # an identifier that is no file name
    pa = planning(tmp_path / "x", a)
    ct_series(tmp_path / "x" / "d2", a, description="CBCT", for_uid=generate_uid(),
              date="20250302", number=12)
    ct_series(tmp_path / "x" / "d1", a, description="kV image", for_uid=generate_uid(),
              date="20250301", number=11)  # no marker, own frame: daily
    ct_series(tmp_path / "x" / "resim", a, description="second CT", for_uid=pa["for"])
    ct_series(tmp_path / "x" / "sct", a, description="Synthetic CT", for_uid=generate_uid())
    planning(tmp_path / "y", b)
    ct_series(tmp_path / "y" / "d", b, description="CBCT", for_uid=generate_uid(),
              date="20250401")
    got = discover(tmp_path, markers=("CBCT",))
    assert got.patients() == sorted([a, b]) and not got.unusable
    fa = [f for f in got.fractions if f.patient_id == a]
    assert [(f.label, f.cbct.description, f.cbct.date) for f in fa] == [
        ("fx01", "kV image", "20250301"), ("fx02", "CBCT", "20250302")]
    assert all(f.planning.rtplan_uid == pa["rp"] and f.planning.rtstruct_uid == pa["rs"]
               and f.planning.planning_ct.series_instance_uid == pa["ct"] for f in fa)
    assert all(len(f.planning.planning_ct.files) == 4 and len(f.cbct.files) == 4 for f in fa)
    fb = [f for f in got.fractions if f.patient_id == b]
    assert len(fb) == 1 and fb[0].label == "fx01"
    assert "/" not in safe_name(b) and safe_name(b) != safe_name("PAT^B_2")


def test_plan_of_each_daily_image_registration_date_or_ambiguous(tmp_path):
    pid = "PAT-C"
    old = planning(tmp_path, pid, label="PLAN1", date="20250101")
    new = planning(tmp_path, pid, label="PLAN2", date="20250201")
    f_reg = generate_uid()
    ct_series(tmp_path / "a", pid, description="CBCT", for_uid=f_reg, date="20250301", number=1)
    reg = spatial_reg(tmp_path, pid, f_reg, old["for"])  # IGR match to the older plan
    ct_series(tmp_path / "b", pid, description="CBCT", for_uid=generate_uid(),
              date="20250115", number=2)  # only the older plan existed then
    ct_series(tmp_path / "c", pid, description="CBCT", for_uid=generate_uid(),
              date="20250215", number=3)  # the newer
    ct_series(tmp_path / "d", pid, description="CBCT", for_uid=generate_uid(), number=4)
    got = discover(tmp_path, markers=("CBCT",))
    by_num = {f.cbct.number: f for f in got.fractions}
    assert by_num[1].planning.rtplan_uid == old["rp"]
    assert by_num[1].spatial_registration == str(reg) and "Spatial Registration" in \
        by_num[1].matched_by
    assert by_num[2].planning.rtplan_uid == old["rp"] and "dated" in by_num[2].matched_by
    assert by_num[3].planning.rtplan_uid == new["rp"]
    assert by_num[3].spatial_registration is None
    assert len(got.unusable) == 1 and "ambiguous" in got.unusable[0].reason
    assert "PLAN1" in got.unusable[0].reason and "PLAN2" in got.unusable[0].reason


def test_adapted_plans_and_their_synthetic_ct_are_not_replayed(tmp_path):
    pid = "PAT-D"
    sched = planning(tmp_path, pid, label="SCHED")
    # an earlier session's adapted plan, drawn on its synthetic CT (own frame, no marker)
    planning(tmp_path, pid, label="ADAPTED", predecessor=sched["rp"], ct_description="sCT")
    ct_series(tmp_path / "d", pid, description="CBCT", for_uid=generate_uid())
    got = discover(tmp_path, markers=("CBCT",))
    assert len(got.fractions) == 1 and not got.unusable
    assert got.fractions[0].planning.rtplan_uid == sched["rp"]
    assert got.fractions[0].cbct.description == "CBCT"


def test_broken_series_and_missing_plans_are_reported_with_reasons(tmp_path):
    planning(tmp_path, "PAT-E")
    gap = ct_series(tmp_path / "g", "PAT-E", description="CBCT", for_uid=generate_uid(),
                    gap=True)
    ct_series(tmp_path / "n", "PAT-F", description="CBCT", for_uid=generate_uid())
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    got = discover(tmp_path, markers=("CBCT",))
    assert not got.fractions
    why = {u.patient_id: u for u in got.unusable}
    assert why["PAT-E"].series_instance_uid == gap
    assert "series_gap" in why["PAT-E"].reason and "gap" in why["PAT-E"].reason
    assert "no scheduled plan" in why["PAT-F"].reason


def test_not_a_folder():
    from adaptive.errors import ReplayDataError

    with pytest.raises(ReplayDataError):
        discover("/nonexistent/archive")
