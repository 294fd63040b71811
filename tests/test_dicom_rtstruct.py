"""RT Structure Set: round-trip, references, dciodvfy, bad input."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pydicom
import pytest

from adaptive import RESEARCH_USE_STATEMENT
from adaptive.dicom import (
    read_ct_series,
    read_provenance,
    read_rtstruct,
    write_ct_series,
    write_rtstruct,
)
from adaptive.dicom.provenance import Provenance
from adaptive.dicom.study import new_study
from adaptive.errors import ContourOutsideImageError, MissingTagError, UnknownReferencedSeriesError
from adaptive.geometry import Grid, Volume
from adaptive.model import PatientInfo, Roi, SeriesInfo, StructureSet
from adaptive.registration.evaluate import dice as _dice


def _oblique():
    a = np.deg2rad(15)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


@pytest.fixture
def ct(tmp_path):
    g = Grid((20, 32, 40), origin=[-40.0, -30.0, -20.0], spacing=[2.0, 2.0, 2.5], direction=_oblique())
    a = np.full(g.shape, -1000, np.float32)
    info = write_ct_series(Volume(a, g, "HU"), SeriesInfo(PatientInfo("P7", "A^B"), "", "", ""),
                           tmp_path / "ct", study=new_study(PatientInfo("P7", "A^B")))
    return g, info


def _masks(g):
    k, j, i = np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij")
    ptv = (i - 20) ** 2 + (j - 16) ** 2 + ((k - 10) * 1.25) ** 2 < 7 ** 2
    rho = np.sqrt((i - 20) ** 2 + (j - 16) ** 2)
    ring = (rho > 9) & (rho < 13) & (k >= 4) & (k <= 15)  # annulus: hole on each slice
    return ptv, ring




def _ss(g, info):
    ptv, ring = _masks(g)
    square = g.ijk_to_lps(np.array([[2, 2, 3], [8, 2, 3], [8, 6, 3], [2, 6, 3]], float))
    rois = [Roi(1, "PTV", (255, 0, 0), "PTV", mask=Volume(ptv, g, "mask"), generation_algorithm="AUTOMATIC"),
            Roi(2, "Ring", (0, 255, 0), "AVOIDANCE", mask=Volume(ring, g, "mask")),
            Roi(5, "Box", (0, 0, 255), "ORGAN", contours=[square]),
            Roi(7, "Empty", (9, 9, 9), "ORGAN")]
    return StructureSet(rois=rois, referenced_series=info, label="adapt", name="fraction 1")


def test_roundtrip_and_dciodvfy(tmp_path, ct, dciodvfy):
    g, info = ct
    ss = _ss(g, info)
    uid = write_rtstruct(ss, tmp_path / "RS.dcm", study=info.study,
                         provenance=Provenance(input_uids={"ct": info.series_instance_uid}))
    assert ss.sop_instance_uid == uid
    errors, text = dciodvfy(tmp_path / "RS.dcm")
    assert not errors and "RTStructureSet" in text, text  # IOD recognised, no crash

    back = read_rtstruct(tmp_path / "RS.dcm", series=info, grid=g)
    assert back.sop_instance_uid == uid and back.label == "adapt" and back.name == "fraction 1"
    assert [r.number for r in back.rois] == [1, 2, 5, 7]
    assert back.names() == ["PTV", "Ring", "Box", "Empty"]
    assert [r.color for r in back.rois] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    assert [r.interpreted_type for r in back.rois] == ["PTV", "AVOIDANCE", "ORGAN", "ORGAN"]
    assert back.rois[0].generation_algorithm == "AUTOMATIC"
    ptv, ring = _masks(g)
    assert _dice(back.get("PTV").mask.array, ptv) >= 0.98
    assert _dice(back.get("Ring").mask.array, ring) >= 0.98
    assert not back.get("Ring").mask.array[10, 16, 20]  # hole survives
    np.testing.assert_allclose(back.get("Box").contours[0], ss.rois[2].contours[0], atol=1e-6)
    assert back.get("Box").mask.array.sum() == 7 * 5  # vertices on voxel centres: boundary in
    assert back.get("Empty").contours == [] and not back.get("Empty").mask.array.any()
    assert back.referenced_series.series_instance_uid == info.series_instance_uid

    # references: FoR → study → series → every CT slice; each contour → its slice
    ds = pydicom.dcmread(tmp_path / "RS.dcm")
    rf = ds.ReferencedFrameOfReferenceSequence[0]
    assert rf.FrameOfReferenceUID == info.frame_of_reference_uid
    st = rf.RTReferencedStudySequence[0]
    assert st.ReferencedSOPInstanceUID == info.study_instance_uid
    se = st.RTReferencedSeriesSequence[0]
    assert se.SeriesInstanceUID == info.series_instance_uid
    assert [im.ReferencedSOPInstanceUID for im in se.ContourImageSequence] == info.sop_instance_uids
    box = next(rc for rc in ds.ROIContourSequence if rc.ReferencedROINumber == 5)
    assert box.ContourSequence[0].ContourImageSequence[0].ReferencedSOPInstanceUID == info.sop_instance_uids[3]
    assert box.ContourSequence[0].ContourGeometricType == "CLOSED_PLANAR"
    assert RESEARCH_USE_STATEMENT in ds.StructureSetDescription
    assert read_provenance(ds)["input_uids"] == {"ct": info.series_instance_uid}


def test_without_series_reads_references(tmp_path, ct):
    g, info = ct
    write_rtstruct(_ss(g, info), tmp_path / "RS.dcm", study=info.study)
    back = read_rtstruct(tmp_path / "RS.dcm")
    r = back.referenced_series
    assert (r.series_instance_uid, r.frame_of_reference_uid, r.study_instance_uid) == (
        info.series_instance_uid, info.frame_of_reference_uid, info.study_instance_uid)
    assert r.sop_instance_uids == info.sop_instance_uids and r.patient.patient_id == "P7"
    assert back.get("PTV").mask is None and len(back.get("PTV").contours) > 5


def test_with_real_ct_read_back(tmp_path, ct):
    g, info = ct
    write_rtstruct(_ss(g, info), tmp_path / "RS.dcm", study=info.study)
    vol, info2 = read_ct_series(tmp_path / "ct")
    back = read_rtstruct(tmp_path / "RS.dcm", series=info2, grid=vol.grid)
    assert back.get("Box").mask.array.sum() == 7 * 5  # vertices on voxel centres: boundary in


def test_unknown_referenced_series(tmp_path, ct):
    g, info = ct
    write_rtstruct(_ss(g, info), tmp_path / "RS.dcm", study=info.study)
    other = dataclasses.replace(info, series_instance_uid="1.2.3.4.999")
    with pytest.raises(UnknownReferencedSeriesError, match=re.escape("RS.dcm")) as e:
        read_rtstruct(tmp_path / "RS.dcm", series=other)
    assert "1.2.3.4.999" in str(e.value) and info.series_instance_uid in str(e.value)
    other_for = dataclasses.replace(info, frame_of_reference_uid="1.2.3.4.888")
    with pytest.raises(UnknownReferencedSeriesError, match=re.escape("1.2.3.4.888")):
        read_rtstruct(tmp_path / "RS.dcm", series=other_for)


def test_contour_outside_image(tmp_path, ct):
    g, info = ct
    ss = _ss(g, info)
    write_rtstruct(ss, tmp_path / "RS.dcm", study=ss.referenced_series.study)
    small = Grid((10, 32, 40), origin=g.origin, spacing=g.spacing, direction=g.direction)
    with pytest.raises(ContourOutsideImageError, match=re.escape("RS.dcm")) as e:
        read_rtstruct(tmp_path / "RS.dcm", grid=small)
    assert "ROI 'PTV'" in str(e.value) or "ROI 'Ring'" in str(e.value)
    # writing a contour off the referenced grid is refused too, naming the ROI
    off = g.ijk_to_lps(np.array([[2, 2, 30], [8, 2, 30], [8, 6, 30]], float))
    ss.rois.append(Roi(9, "Off", contours=[off]))
    with pytest.raises(ContourOutsideImageError, match="Off"):
        write_rtstruct(ss, tmp_path / "RS2.dcm", study=ss.referenced_series.study, grid=g)


def test_missing_required_tag(tmp_path, ct):
    g, info = ct
    write_rtstruct(_ss(g, info), tmp_path / "RS.dcm", study=info.study)
    ds = pydicom.dcmread(tmp_path / "RS.dcm")
    del ds.StructureSetROISequence
    ds.save_as(tmp_path / "RS_bad.dcm")
    with pytest.raises(MissingTagError, match="StructureSetROISequence") as e:
        read_rtstruct(tmp_path / "RS_bad.dcm")
    assert "RS_bad.dcm" in str(e.value)


def test_refuses_other_patient_or_contradicting_study(ct, tmp_path):
    from adaptive.errors import StudyMismatchError

    g, info = ct
    other = new_study(PatientInfo("P8", "C^D"))
    with pytest.raises(StudyMismatchError, match="another patient"):
        write_rtstruct(_ss(g, info), tmp_path / "RS.dcm", study=other)
    # same Study Instance UID, other Study Date: what dcentvfy reports as an error
    moved = dataclasses.replace(info.study, study_date="19990101")
    with pytest.raises(StudyMismatchError, match="study_date"):
        write_rtstruct(_ss(g, info), tmp_path / "RS.dcm", study=moved)
    assert not (tmp_path / "RS.dcm").exists()
