"""Deformable Spatial Registration object: dciodvfy-clean and exact round trip."""

from __future__ import annotations

import numpy as np
import pydicom

from adaptive.model.identity import PatientInfo, SeriesInfo
from adaptive.registration.core import RegistrationResult
from adaptive.registration.dicom_reg import (
    read_deformable_registration,
    write_deformable_registration,
)
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
        uid = write_deformable_registration(p, r, cb, ct, study=cb.study)
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


def _standard_source_points(reg: dict) -> np.ndarray:
    """Source RCS point of every grid point, written here from PS3.3 C.20.3 (not our reader):
    "First, transform the coordinates using the matrix described in the Pre Deformation Matrix
    Registration Sequence. Next apply the deformation offsets to the resulting coordinates.
    Finally, transform those coordinates using the matrix described in the Post Deformation
    Matrix Registration Sequence. The resulting coordinate addresses the sample point within
    the Source RCS." Grid point (i, j, k) is at Image Position + i·Δx·X + j·Δy·Y + k·Δz·(X×Y)
    in the Registered RCS (X, Y: row / column direction cosines), vectors x fastest."""
    nx, ny, nz = (int(v) for v in reg["dims"])
    dx, dy, dz = (float(v) for v in reg["res"])
    iop = np.asarray(reg["iop"], float)
    row, col = iop[:3], iop[3:]
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    p = (np.asarray(reg["ipp"], float) + i[..., None] * dx * row + j[..., None] * dy * col
         + k[..., None] * dz * np.cross(row, col))
    hom = np.concatenate([p, np.ones(p.shape[:-1] + (1,))], axis=-1)
    pre = np.asarray(reg["pre"], float).reshape(4, 4)
    post = np.asarray(reg["post"], float).reshape(4, 4)
    v = np.asarray(reg["vectors"], float).reshape(nz, ny, nx, 3)
    q = hom @ pre.T
    q[..., :3] += v
    return (q @ post.T)[..., :3]


def test_reg_applied_as_the_standard_says_reaches_the_planning_points(tmp_path):
    """The REG read with pydicom attributes and applied with the standard's formula maps every
    CBCT grid point to its planning point x + u(x); pydicomrt (an independent parser) finds
    the same matrices and vectors and accepts the object's IOD."""
    from pydicomrt.reg.check import check_deformable_reg_iod
    from pydicomrt.reg.parser import get_deformable_registrations

    cb, ct = _infos()
    r = _result()
    p = tmp_path / "REG.dcm"
    write_deformable_registration(p, r, cb, ct, study=cb.study)
    ds = pydicom.dcmread(p)
    item = ds.DeformableRegistrationSequence[0]
    gi = item.DeformableRegistrationGridSequence[0]
    raw = {"dims": gi.GridDimensions, "res": gi.GridResolution,
           "iop": gi.ImageOrientationPatient, "ipp": gi.ImagePositionPatient,
           "pre": item.PreDeformationMatrixRegistrationSequence[0].FrameOfReferenceTransformationMatrix,
           "post": item.PostDeformationMatrixRegistrationSequence[0].FrameOfReferenceTransformationMatrix,
           "vectors": np.frombuffer(gi.VectorGridData, "<f4")}
    truth = r.fixed_grid.voxel_centers_lps() + r.dvf_lps_mm
    np.testing.assert_allclose(_standard_source_points(raw), truth, atol=1e-3)
    # the old writer's direction (Pre = planning -> CBCT) lands far away: the test can fail
    wrong = dict(raw, pre=np.linalg.inv(np.asarray(raw["pre"], float).reshape(4, 4)))
    assert np.abs(_standard_source_points(wrong) - truth).max() > 10.0

    check = check_deformable_reg_iod(ds)
    assert check["result"], check["content"]
    regs = get_deformable_registrations(ds)
    assert len(regs) == 1 and regs[0]["SourceFrameOfReferenceUID"] == ct.frame_of_reference_uid
    g = regs[0]["DeformableRegistrationGrid"]
    parsed = {"dims": g["GridDimensions"], "res": g["GridResolution"],
              "iop": g["ImageOrientationPatient"], "ipp": g["ImagePositionPatient"],
              "pre": regs[0]["PreDeformationMatrixRegistration"],
              "post": regs[0]["PostDeformationMatrixRegistration"],
              "vectors": g["VectorGridData"]}
    np.testing.assert_allclose(_standard_source_points(parsed), truth, atol=1e-3)
    # our reader agrees with the standard's formula
    back = read_deformable_registration(p)
    np.testing.assert_allclose(back.grid.voxel_centers_lps() + back.dvf_lps_mm, truth, atol=1e-3)


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
