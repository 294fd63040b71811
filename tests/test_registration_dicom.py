"""Deformable Spatial Registration object: dciodvfy-clean and exact round trip."""

from __future__ import annotations

import numpy as np
import pydicom
from registration_phantom import cbct_grid, smooth_dvf

from adaptive.model.identity import PatientInfo, SeriesInfo
from adaptive.registration.core import RegistrationResult
from adaptive.registration.dicom_reg import (
    read_deformable_registration,
    write_deformable_registration,
)


def _rot(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _infos(same_study=False):
    pat = PatientInfo("REG-1", "Test^Reg")
    cb = SeriesInfo(pat, "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2",
                    "1.2.826.0.1.3680043.8.498.3", modality="CT",
                    sop_instance_uids=[f"1.2.826.0.1.3680043.8.498.4.{k}" for k in range(3)],
                    study_date="20240101")
    ct = SeriesInfo(pat, cb.study_instance_uid if same_study else "1.2.826.0.1.3680043.8.498.5",
                    "1.2.826.0.1.3680043.8.498.6", "1.2.826.0.1.3680043.8.498.7",
                    sop_instance_uids=[f"1.2.826.0.1.3680043.8.498.8.{k}" for k in range(4)])
    return cb, ct


def _result():
    g = cbct_grid(shape=(6, 8, 10), spacing=(3.0, 3.5, 4.0), center=(5.0, -3.0, 12.0))
    m = np.eye(4)
    m[:3, :3] = _rot(3.0)
    m[:3, 3] = (10.0, -20.0, 7.5)
    x = g.voxel_centers_lps()
    u = ((x @ m[:3, :3].T + m[:3, 3]) - x + smooth_dvf(g, amplitude=(2.0, -1.5, 1.0),
                                                       sigma_mm=20.0, centre=(5, -3, 12)))
    return RegistrationResult(dvf_lps_mm=u.astype(np.float32), fixed_grid=g, rigid_matrix=m,
                              fallback=None, quality={}, timings_s={"total": 1.0},
                              parameters={})


def test_reg_dciodvfy_clean_and_round_trip(tmp_path, dciodvfy):
    for same in (False, True):
        cb, ct = _infos(same)
        r = _result()
        p = tmp_path / f"REG{same}.dcm"
        uid = write_deformable_registration(p, r, cb, ct)
        errors, out = dciodvfy(p)
        assert not errors, out
        ds = pydicom.dcmread(p)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.3" and ds.Modality == "REG"
        assert ds.FrameOfReferenceUID == cb.frame_of_reference_uid
        item = ds.DeformableRegistrationSequence[0]
        assert item.SourceFrameOfReferenceUID == ct.frame_of_reference_uid
        assert ds.DeviceSerialNumber and ds.SoftwareVersions
        back = read_deformable_registration(p)
        assert back.sop_instance_uid == uid
        assert back.grid.same_as(r.fixed_grid)
        np.testing.assert_allclose(back.rigid_matrix, r.rigid_matrix, atol=1e-6)
        np.testing.assert_allclose(back.dvf_lps_mm, r.dvf_lps_mm, atol=1e-3)
        # the stored vectors are the non-rigid residual: small, unlike the full DVF
        v = np.frombuffer(item.DeformableRegistrationGridSequence[0].VectorGridData, "<f4")
        assert np.abs(v).max() < 2.6 < np.abs(r.dvf_lps_mm).max()


def _spatial_reg(path, own_for, other_for, matrix):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from adaptive.dicom._common import new_dataset, save_atomic
    ds = new_dataset("1.2.840.10008.5.1.4.1.1.66.1", "1.2.826.0.1.3680043.8.498.99")
    ds.FrameOfReferenceUID = own_for
    items = []
    for uid, m in ((own_for, np.eye(4)), (other_for, matrix)):
        mt = Dataset()
        mt.FrameOfReferenceTransformationMatrixType = "RIGID"
        mt.FrameOfReferenceTransformationMatrix = [f"{v:.10g}" for v in m.reshape(-1)]
        mr = Dataset()
        mr.MatrixSequence = Sequence([mt])
        it = Dataset()
        it.FrameOfReferenceUID = uid
        it.MatrixRegistrationSequence = Sequence([mr])
        items.append(it)
    ds.RegistrationSequence = Sequence(items)
    save_atomic(ds, path)


def test_initial_matrix_from_spatial_registration(tmp_path):
    from adaptive.errors import DicomInputError
    from adaptive.registration.dicom_reg import initial_matrix_from_spatial_registration

    m = np.eye(4)
    m[:3, :3] = _rot(4.0)
    m[:3, 3] = (12.0, -30.0, 400.0)  # CBCT -> planning
    # REG in the planning frame: item for the CBCT frame maps CBCT -> planning = m
    _spatial_reg(tmp_path / "a.dcm", "1.2.3.PLAN", "1.2.3.CBCT", m)
    got = initial_matrix_from_spatial_registration(tmp_path / "a.dcm", "1.2.3.CBCT", "1.2.3.PLAN")
    np.testing.assert_allclose(got, m, atol=1e-8)
    # REG in the CBCT frame: item for the planning frame maps planning -> CBCT = inv(m)
    _spatial_reg(tmp_path / "b.dcm", "1.2.3.CBCT", "1.2.3.PLAN", np.linalg.inv(m))
    got = initial_matrix_from_spatial_registration(tmp_path / "b.dcm", "1.2.3.CBCT", "1.2.3.PLAN")
    np.testing.assert_allclose(got, m, atol=1e-6)
    import pytest
    with pytest.raises(DicomInputError, match="not the"):
        initial_matrix_from_spatial_registration(tmp_path / "b.dcm", "1.2.3.CBCT", "9.9")
