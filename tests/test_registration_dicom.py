"""Deformable Spatial Registration object: dciodvfy-clean and exact round trip."""

from __future__ import annotations

import numpy as np
import pydicom

from adaptive.model.identity import PatientInfo, SeriesInfo
from adaptive.registration.core import RegistrationResult
from adaptive.registration.dicom_reg import (read_deformable_registration,
                                             write_deformable_registration)

from registration_phantom import cbct_grid, smooth_dvf


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
