"""DICOM Deformable Spatial Registration (1.2.840.10008.5.1.4.1.1.66.3) for a CBCT ↔ planning CT
registration result.

Frames (PS3.3 C.20.3): the instance's own Frame of Reference (the *Registered RCS*) is the
CBCT's; the Deformable Registration Sequence has one item whose Source Frame of Reference is
the planning CT's. Spatial registration matrices map Source RCS points to the Registered RCS,
so the Pre Deformation Matrix is ``inv(rigid_matrix)`` (planning LPS → CBCT LPS, rigid part).
The Vector Grid Data are given on the CBCT grid (Image Position/Orientation (Patient), Grid
Dimensions, Grid Resolution of the CBCT voxels, Registered RCS) as float32 (x, y, z) mm
triplets, x fastest, then y, then z (slice order): at grid point x the vector v(x) is the
non-rigid residual, i.e. the CBCT point x corresponds to the pre-matrix–mapped planning point
x + v(x):

    planning point = rigid_matrix · (x + v(x)),   v(x) = inv(rigid_matrix)·(x + u(x)) − x

where u is the pipeline's DVF (CBCT x ↦ planning x + u(x)). The Post Deformation Matrix is
the identity. :func:`read_deformable_registration` inverts this exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import adaptive
from adaptive.dicom._common import (
    DEFORMABLE_REG_STORAGE,
    ds_list,
    new_dataset,
    new_series,
    read_dataset,
    require,
    save_atomic,
    set_patient_study,
)
from adaptive.dicom.provenance import Provenance, apply_provenance, dicom_date_time, new_uid
from adaptive.errors import DicomInputError, UnsupportedObjectError
from adaptive.geometry.volume import Grid
from adaptive.model.identity import SeriesInfo
from adaptive.registration.core import RegistrationResult


@dataclass
class DeformableRegistration:
    """A Deformable Spatial Registration read back (see the module doc for semantics)."""

    dvf_lps_mm: np.ndarray  # (nz, ny, nx, 3) float32: registered x ↦ source x + u(x)
    grid: Grid  # in the registered RCS
    rigid_matrix: np.ndarray  # registered → source (inverse of the pre-deformation matrix)
    registered_frame_of_reference_uid: str
    source_frame_of_reference_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def _matrix_item(m: np.ndarray, kind: str) -> Dataset:
    it = Dataset()
    it.FrameOfReferenceTransformationMatrixType = kind
    it.FrameOfReferenceTransformationMatrix = ds_list(m.reshape(-1))
    return it


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return c


def _series_ref(info: SeriesInfo) -> Dataset:
    s = Dataset()
    s.SeriesInstanceUID = info.series_instance_uid
    items = []
    for uid in info.sop_instance_uids:
        r = Dataset()
        r.ReferencedSOPClassUID = info.sop_class_uid
        r.ReferencedSOPInstanceUID = uid
        items.append(r)
    s.ReferencedInstanceSequence = Sequence(items)
    return s


def _image_refs(info: SeriesInfo) -> Sequence:
    items = []
    for uid in info.sop_instance_uids:
        r = Dataset()
        r.ReferencedSOPClassUID = info.sop_class_uid
        r.ReferencedSOPInstanceUID = uid
        items.append(r)
    return Sequence(items)


def residual_vectors(result: RegistrationResult) -> np.ndarray:
    """v(x) = inv(rigid_matrix)·(x + u(x)) − x on the CBCT grid, float32 (nz, ny, nx, 3)."""
    x = result.fixed_grid.voxel_centers_lps()
    target = x + result.dvf_lps_mm.astype(np.float64)
    inv = np.linalg.inv(result.rigid_matrix)
    return (target @ inv[:3, :3].T + inv[:3, 3] - x).astype(np.float32)


def write_deformable_registration(path: str | Path, result: RegistrationResult,
                                  cbct_info: SeriesInfo, ct_info: SeriesInfo,
                                  provenance: Provenance | None = None) -> str:
    """Write ``result`` as a Deformable Spatial Registration in the CBCT's study and Frame of
    Reference. Returns the SOP Instance UID. Atomic write."""
    path = Path(path)
    for what, info in (("CBCT", cbct_info), ("planning CT", ct_info)):
        if not info.frame_of_reference_uid or not info.series_instance_uid:
            raise DicomInputError(f"{what} series info lacks Frame of Reference / series UID", path)
    g = result.fixed_grid
    sop = new_uid()
    date, tm = dicom_date_time()
    ds = new_dataset(DEFORMABLE_REG_STORAGE, sop)
    set_patient_study(ds, cbct_info.patient, cbct_info.study_instance_uid,
                      study_id=cbct_info.study_id, study_date=cbct_info.study_date or date,
                      accession=cbct_info.accession_number,
                      referring=cbct_info.referring_physician_name)
    # General Series / Spatial Registration Series
    new_series(ds, "REG", "Deformable registration CBCT to planning CT", date, tm,
               series_number=900)
    ds.Laterality = ""  # Type 2C (General Series); the registration is of no paired organ
    # Frame of Reference (Registered RCS = CBCT)
    ds.FrameOfReferenceUID = cbct_info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General + Enhanced General Equipment
    ds.Manufacturer = adaptive.SOFTWARE_NAME
    ds.ManufacturerModelName = adaptive.SOFTWARE_NAME
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = f"{adaptive.SOFTWARE_NAME} {adaptive.__version__}"
    # Deformable Spatial Registration (Content Identification)
    ds.InstanceNumber = 1
    ds.ContentLabel = "DEFORMABLE_REG"
    ds.ContentDescription = "CBCT to planning CT (elastix B-spline)"
    ds.ContentCreatorName = ""
    ds.ContentDate, ds.ContentTime = date, tm

    item = Dataset()
    item.SourceFrameOfReferenceUID = ct_info.frame_of_reference_uid
    if ct_info.sop_instance_uids:
        item.ReferencedImageSequence = _image_refs(ct_info)
    kind = "rigid" if result.fallback else "deformable"
    item.RegistrationTypeCodeSequence = Sequence([
        _code("125024", "DCM", "Image Content-based Alignment")])
    item.FrameOfReferenceTransformationComment = f"{kind}: CBCT x -> planning pre-matrix x+v(x)"[:64]
    item.PreDeformationMatrixRegistrationSequence = Sequence([
        _matrix_item(np.linalg.inv(result.rigid_matrix), "RIGID")])
    item.PostDeformationMatrixRegistrationSequence = Sequence([_matrix_item(np.eye(4), "RIGID")])
    grid_item = Dataset()
    grid_item.ImageOrientationPatient = ds_list(np.concatenate([g.direction[:, 0],
                                                               g.direction[:, 1]]))
    grid_item.ImagePositionPatient = ds_list(g.origin)
    grid_item.GridDimensions = [int(v) for v in g.size_ijk]
    grid_item.GridResolution = [float(v) for v in g.spacing]
    grid_item.VectorGridData = np.ascontiguousarray(residual_vectors(result), "<f4").tobytes()
    item.DeformableRegistrationGridSequence = Sequence([grid_item])
    ds.DeformableRegistrationSequence = Sequence([item])

    # Common Instance Reference: both series (CBCT in this study; planning CT maybe not)
    if ct_info.study_instance_uid == cbct_info.study_instance_uid:
        ds.ReferencedSeriesSequence = Sequence([_series_ref(cbct_info), _series_ref(ct_info)])
    else:
        ds.ReferencedSeriesSequence = Sequence([_series_ref(cbct_info)])
        st = Dataset()
        st.StudyInstanceUID = ct_info.study_instance_uid
        st.ReferencedSeriesSequence = Sequence([_series_ref(ct_info)])
        ds.StudiesContainingOtherReferencedInstancesSequence = Sequence([st])
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, tm
    prov = provenance or Provenance(
        input_uids={"cbct_series": cbct_info.series_instance_uid,
                    "planning_ct_series": ct_info.series_instance_uid},
        parameters={"fallback": result.fallback,
                    "initial_alignment": result.initial_alignment},
        timings_s=dict(result.timings_s), description="deformable registration")
    apply_provenance(ds, prov)
    save_atomic(ds, path)
    return sop


def read_deformable_registration(path: str | Path) -> DeformableRegistration:
    """Read a Deformable Spatial Registration written as described in the module doc (one
    deformable item with a grid). Returns the DVF in the pipeline's convention."""
    path = Path(path)
    ds = read_dataset(path)
    if str(ds.get("SOPClassUID", "")) != DEFORMABLE_REG_STORAGE:
        raise UnsupportedObjectError(
            f"not a Deformable Spatial Registration (SOP class {ds.get('SOPClassUID', '?')})", path)
    items = require(ds, "DeformableRegistrationSequence", path)
    item = next((it for it in items if "DeformableRegistrationGridSequence" in it), None)
    if item is None:
        raise DicomInputError("no Deformable Registration Grid Sequence", path)
    gi = item.DeformableRegistrationGridSequence[0]
    dims = [int(v) for v in require(gi, "GridDimensions", path)]
    res = [float(v) for v in require(gi, "GridResolution", path)]
    iop = np.array([float(v) for v in require(gi, "ImageOrientationPatient", path)])
    ipp = np.array([float(v) for v in require(gi, "ImagePositionPatient", path)])
    row, col = iop[:3], iop[3:]
    direction = np.stack([row, col, np.cross(row, col)], axis=1)
    grid = Grid(shape=(dims[2], dims[1], dims[0]), origin=ipp, spacing=res, direction=direction)
    raw = np.frombuffer(require(gi, "VectorGridData", path), dtype="<f4")
    if raw.size != grid.n_voxels * 3:
        raise DicomInputError(f"VectorGridData has {raw.size} floats, expected "
                              f"{grid.n_voxels * 3}", path)
    v = raw.reshape(grid.shape + (3,)).astype(np.float64)

    def matrix(seq_name):
        if seq_name not in item or not len(item[seq_name].value):
            return np.eye(4)
        m = np.array([float(x) for x in item[seq_name][0].FrameOfReferenceTransformationMatrix])
        return m.reshape(4, 4)

    pre, post = matrix("PreDeformationMatrixRegistrationSequence"), matrix(
        "PostDeformationMatrixRegistrationSequence")
    if not np.allclose(post, np.eye(4), atol=1e-6):
        raise DicomInputError("non-identity Post Deformation Matrix is not supported", path)
    rigid = np.linalg.inv(pre)
    x = grid.voxel_centers_lps()
    target = (x + v) @ rigid[:3, :3].T + rigid[:3, 3]
    return DeformableRegistration(
        dvf_lps_mm=(target - x).astype(np.float32), grid=grid, rigid_matrix=rigid,
        registered_frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        source_frame_of_reference_uid=str(item.get("SourceFrameOfReferenceUID", "")),
        sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID))


SPATIAL_REG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"


def initial_matrix_from_spatial_registration(path: str | Path, cbct_frame_uid: str,
                                             planning_frame_uid: str) -> np.ndarray:
    """4×4 CBCT LPS → planning LPS from a (rigid) Spatial Registration object.

    Each Registration Sequence item's matrix maps points of the item's Frame of Reference to
    the object's own Frame of Reference (PS3.3 C.20.2). Whichever of the two frames the
    object is in, the matrix is composed (and inverted when needed) so that it maps CBCT
    points to planning points. Raises :class:`DicomInputError` when the object does not
    relate the two frames.
    """
    path = Path(path)
    ds = read_dataset(path)
    if str(ds.get("SOPClassUID", "")) != SPATIAL_REG_STORAGE:
        raise UnsupportedObjectError(
            f"not a Spatial Registration (SOP class {ds.get('SOPClassUID', '?')})", path)
    own = str(require(ds, "FrameOfReferenceUID", path))
    to_own: dict[str, np.ndarray] = {own: np.eye(4)}
    for item in require(ds, "RegistrationSequence", path):
        src = str(item.get("FrameOfReferenceUID", ""))
        m = np.eye(4)
        for mr in item.get("MatrixRegistrationSequence", []):
            for mt in mr.get("MatrixSequence", []):
                mm = np.array([float(v) for v in mt.FrameOfReferenceTransformationMatrix])
                if mm.size != 16:
                    raise DicomInputError("FrameOfReferenceTransformationMatrix must have 16 "
                                          "values", path)
                m = mm.reshape(4, 4) @ m
        if src:
            to_own[src] = m
    if cbct_frame_uid not in to_own or planning_frame_uid not in to_own:
        raise DicomInputError(f"Spatial Registration relates frames {sorted(to_own)}, not the "
                              f"CBCT ({cbct_frame_uid}) and planning ({planning_frame_uid}) "
                              f"frames", path)
    # CBCT -> own -> planning
    return np.linalg.inv(to_own[planning_frame_uid]) @ to_own[cbct_frame_uid]
