"""DICOM Deformable Spatial Registration (1.2.840.10008.5.1.4.1.1.66.3) for a CBCT ↔ planning CT
registration result, written and read as PS3.3 C.20.3 (Deformable Spatial Registration Module)
specifies it.

Frames: the instance's own Frame of Reference (the *Registered RCS*) is the CBCT's; the
Deformable Registration Sequence has one item whose Source Frame of Reference is the planning
CT's. The standard applies the item to Registered RCS coordinates (PS3.3 C.20.3.1.1)::

    "The registrations in this module are applied to the Registered RCS coordinates in the
    following order. First, transform the coordinates using the matrix described in the Pre
    Deformation Matrix Registration Sequence (0064,000F). Next apply the deformation offsets to
    the resulting coordinates. Finally, transform those coordinates using the matrix described
    in the Post Deformation Matrix Registration Sequence (0064,0010). The resulting coordinate
    addresses the sample point within the Source RCS."

with the deformation offset of grid point (i, j, k) located at Image Position (Patient) +
i·Δx·row + j·Δy·column + k·Δz·(row × column) of the Deformable Registration Grid (Registered
RCS, Grid Resolution Δ), Vector Grid Data holding float32 (x, y, z) triplets, x fastest, then
y, then z. So for a CBCT grid point x::

    planning point = M_post · (M_pre · x + v(x))

We write ``M_pre = rigid_matrix`` (CBCT LPS → planning LPS, the rigid stage),
``v(x) = x + u(x) − rigid_matrix · x`` (the non-rigid residual, planning-frame mm) and
``M_post`` = identity, where u is the pipeline's DVF (CBCT x ↦ planning x + u(x)), on the
CBCT's grid. :func:`read_deformable_registration` applies the same formula (any Post matrix).
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
    SPATIAL_REG_STORAGE,
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
from adaptive.model.identity import SeriesInfo, StudyIdentity
from adaptive.registration.core import RegistrationResult


@dataclass
class DeformableRegistration:
    """A Deformable Spatial Registration read back (see the module doc for semantics)."""

    dvf_lps_mm: np.ndarray  # (nz, ny, nx, 3) float32: registered x ↦ source x + u(x)
    grid: Grid  # in the registered RCS
    rigid_matrix: np.ndarray  # registered → source: M_post · M_pre (the linear part)
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
    """v(x) = x + u(x) − rigid_matrix·x on the CBCT grid (planning-frame mm), float32
    (nz, ny, nx, 3): the offsets added after the Pre Deformation Matrix (= rigid_matrix)."""
    # v = u(x) + (I - M) x - t, with x = origin + (direction * spacing) ijk: the affine part
    # built per index axis by broadcasting, without the (n, 3) voxel centres
    g = result.fixed_grid
    m = np.asarray(result.rigid_matrix, dtype=np.float64)
    ia = np.eye(3) - m[:3, :3]
    a = ia @ (g.direction * g.spacing[None, :])           # column c: per unit of index c
    c = ia @ g.origin - m[:3, 3]
    nz, ny, nx = g.shape
    out = np.asarray(result.dvf_lps_mm, dtype=np.float64) + c
    out += np.arange(nx, dtype=np.float64)[None, None, :, None] * a[:, 0]
    out += np.arange(ny, dtype=np.float64)[None, :, None, None] * a[:, 1]
    out += np.arange(nz, dtype=np.float64)[:, None, None, None] * a[:, 2]
    return out.astype(np.float32)


def write_deformable_registration(path: str | Path, result: RegistrationResult,
                                  cbct_info: SeriesInfo, ct_info: SeriesInfo, *,
                                  study: StudyIdentity,
                                  registered_series: tuple[SeriesInfo, ...] = (),
                                  provenance: Provenance | None = None) -> str:
    """Write ``result`` as a Deformable Spatial Registration in ``study`` (the session's) and
    the CBCT's Frame of Reference (the Registered RCS), as the module doc describes.

    ``registered_series``: further series in the CBCT's frame to list as referenced (e.g. the
    synthetic CT made with this registration). A series of another patient, or one in the
    study with other study attributes, raises :class:`StudyMismatchError`; a registered
    series outside the CBCT's frame raises :class:`DicomInputError`. Returns the SOP Instance
    UID. Atomic write."""
    path = Path(path)
    for what, info in (("CBCT", cbct_info), ("planning CT", ct_info)):
        if not info.frame_of_reference_uid or not info.series_instance_uid:
            raise DicomInputError(f"{what} series info lacks Frame of Reference / series UID", path)
    study.check_series(cbct_info, "CBCT")
    study.check_patient(ct_info.patient, "planning CT")
    for info in registered_series:
        study.check_series(info, f"series {info.series_instance_uid}")
        if info.frame_of_reference_uid != cbct_info.frame_of_reference_uid:
            raise DicomInputError(f"series {info.series_instance_uid} is not in the CBCT's Frame "
                                  f"of Reference (the registered RCS)", path)
    sop = new_uid()
    date, tm = dicom_date_time()
    ds = new_dataset(DEFORMABLE_REG_STORAGE, sop)
    set_patient_study(ds, study)
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

    ds.DeformableRegistrationSequence = Sequence([_registration_item(result, ct_info)])
    _set_instance_references(ds, study, cbct_info, ct_info, registered_series)
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


def _registration_item(result: RegistrationResult, ct_info: SeriesInfo) -> Dataset:
    """Deformable Registration Sequence item: source frame (the planning CT's), pre-deformation
    matrix (the rigid match, CBCT LPS -> planning LPS), identity post-deformation matrix and
    the residual vector grid (LPS mm, float32) on the registration's grid."""
    g = result.fixed_grid
    item = Dataset()
    item.SourceFrameOfReferenceUID = ct_info.frame_of_reference_uid
    if ct_info.sop_instance_uids:
        item.ReferencedImageSequence = _image_refs(ct_info)
    kind = "rigid" if result.fallback else "deformable"
    item.RegistrationTypeCodeSequence = Sequence([
        _code("125024", "DCM", "Image Content-based Alignment")])
    item.FrameOfReferenceTransformationComment = f"{kind}: planning = Mpre CBCT + v; Mpost = I"[:64]
    item.PreDeformationMatrixRegistrationSequence = Sequence([
        _matrix_item(np.asarray(result.rigid_matrix, dtype=np.float64), "RIGID")])
    item.PostDeformationMatrixRegistrationSequence = Sequence([_matrix_item(np.eye(4), "RIGID")])
    grid_item = Dataset()
    grid_item.ImageOrientationPatient = ds_list(np.concatenate([g.direction[:, 0],
                                                               g.direction[:, 1]]))
    grid_item.ImagePositionPatient = ds_list(g.origin)
    grid_item.GridDimensions = [int(v) for v in g.size_ijk]
    grid_item.GridResolution = [float(v) for v in g.spacing]
    grid_item.VectorGridData = np.ascontiguousarray(residual_vectors(result), "<f4").tobytes()
    item.DeformableRegistrationGridSequence = Sequence([grid_item])
    return item


def _set_instance_references(ds: Dataset, study: StudyIdentity, cbct_info: SeriesInfo,
                             ct_info: SeriesInfo, registered_series: tuple[SeriesInfo, ...]
                             ) -> None:
    """Common Instance Reference: the series of this study (CBCT, synthetic CT, ...) and the
    planning CT (in its own study unless it shares this one)."""
    same = [cbct_info, *registered_series]
    if ct_info.study_instance_uid == study.study_instance_uid:
        ds.ReferencedSeriesSequence = Sequence([_series_ref(i) for i in (*same, ct_info)])
    else:
        ds.ReferencedSeriesSequence = Sequence([_series_ref(i) for i in same])
        st = Dataset()
        st.StudyInstanceUID = ct_info.study_instance_uid
        st.ReferencedSeriesSequence = Sequence([_series_ref(ct_info)])
        ds.StudiesContainingOtherReferencedInstancesSequence = Sequence([st])


def read_deformable_registration(path: str | Path) -> DeformableRegistration:
    """Read a Deformable Spatial Registration (its first item with a grid) and apply it as
    PS3.3 C.20.3 specifies (module doc). Returns the DVF in the pipeline's convention."""
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
    # PS3.3 C.20.3: source = M_post · (M_pre · x + v(x)), x in the registered RCS
    x = grid.voxel_centers_lps()
    y = x @ pre[:3, :3].T + pre[:3, 3] + v
    target = y @ post[:3, :3].T + post[:3, 3]
    rigid = post @ pre
    return DeformableRegistration(
        dvf_lps_mm=(target - x).astype(np.float32), grid=grid, rigid_matrix=rigid,
        registered_frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        source_frame_of_reference_uid=str(item.get("SourceFrameOfReferenceUID", "")),
        sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID))


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
