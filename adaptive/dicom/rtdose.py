"""RT Dose (grid dose, multi-frame) write/read. Doses in Gy; geometry in LPS mm.

Frames are the grid's k slices. Image Position (Patient) is the first frame's first voxel
centre; Grid Frame Offset Vector holds each frame's offset (mm) from it along the slice
normal (row × column of Image Orientation (Patient)), first value 0 (relative form).
Stored as unsigned integers with Dose Grid Scaling (Gy per unit) ≈ max dose / (2^bits − 1)
(a 16-character DS): 16 bits by default (quantisation error ≤ max dose × 7.7e-6, e.g.
0.5 mGy at 70 Gy), 32 bits on request (≤ max dose × 1.2e-10). 16 is the default because
dicom3tools' dciodvfy (our independent validator) aborts on 32-bit pixel data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from adaptive.dicom._common import (
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    ds_list,
    ds_str,
    new_dataset,
    new_series,
    patient_from_ds,
    read_dataset,
    require,
    save_atomic,
    set_patient_study,
)
from adaptive.dicom.enums import WRITABLE_SUMMATION_TYPES, DoseSummationType
from adaptive.dicom.provenance import (
    Provenance,
    apply_provenance,
    dicom_date_time,
    new_uid,
    read_provenance,
)
from adaptive.errors import (
    DicomWriteError,
    GeometryError,
    GridOutsideImageError,
    MissingPixelDataError,
    StudyMismatchError,
    UnsupportedObjectError,
)
from adaptive.geometry.volume import Grid, Volume
from adaptive.log import get_logger
from adaptive.model.identity import SeriesInfo, StudyIdentity
from adaptive.model.plan import Plan

log = get_logger(__name__)

def dose_grid_outside_image(dose_grid: Grid, image_grid: Grid, tol_mm: float = 0.01) -> list:
    """Corners (LPS mm) of ``dose_grid``'s voxel-centre box that lie outside ``image_grid``'s
    voxel-centre box (empty: the dose grid is inside the image; both boxes are convex)."""
    nx, ny, nz = dose_grid.size_ijk
    corners = dose_grid.ijk_to_lps(np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1)
                                             for k in (0, nz - 1)], dtype=np.float64))
    margin = tol_mm / float(np.min(image_grid.spacing))
    return [c for c, ok in zip(corners, image_grid.contains_lps(corners, margin_vox=margin))
            if not ok]


def _check_writable(dose: Volume, summation: DoseSummationType, plan: Plan | None,
                    series: SeriesInfo, image_grid: Grid, study: StudyIdentity, bits: int,
                    path: Path) -> None:
    """Refuse a dose :func:`write_rtdose` cannot write: unsupported summation type, missing or
    unwritten plan, plan or series in another frame, patient or study, dose grid outside the
    image grid (LPS mm), stored integer size other than 16 or 32 bits."""
    if not isinstance(summation, DoseSummationType):
        raise DicomWriteError(f"summation must be a DoseSummationType, got {summation!r} [{path}]")
    st = summation
    if st not in WRITABLE_SUMMATION_TYPES:
        raise DicomWriteError(f"dose summation type {st.value} not supported (use one of "
                              f"{[t.value for t in WRITABLE_SUMMATION_TYPES]}) [{path}]")
    if st.needs_plan:
        if plan is None:
            raise DicomWriteError(f"dose summation type {st.value} requires the plan it belongs "
                                  f"to [{path}]")
        if not plan.sop_instance_uid:
            raise DicomWriteError(f"plan {plan.label!r} has no SOP Instance UID: write the plan "
                                  f"before its dose [{path}]")
    if not series.frame_of_reference_uid:
        raise DicomWriteError(f"series {series.series_instance_uid} has no Frame of Reference UID [{path}]")
    if plan is not None and plan.frame_of_reference_uid != series.frame_of_reference_uid:
        raise DicomWriteError(f"plan {plan.label!r} is in Frame of Reference "
                              f"{plan.frame_of_reference_uid or '(none)'}, the dose's image series "
                              f"in {series.frame_of_reference_uid} [{path}]")
    study.check_series(series, f"image series {series.series_instance_uid} of the dose")
    if plan is not None and plan.patient_id and plan.patient_id != study.patient.patient_id:
        raise StudyMismatchError(f"plan {plan.label!r} is for patient {plan.patient_id!r}, the "
                                 f"study's patient is {study.patient.patient_id!r} [{path}]")
    outside = dose_grid_outside_image(dose.grid, image_grid)
    if outside:
        raise GridOutsideImageError(f"the dose grid reaches outside the image it was computed on "
                                    f"(e.g. {np.round(outside[0], 2).tolist()} LPS mm; image "
                                    f"voxel centres span {[np.round(b, 2).tolist() for b in image_grid.bounds_lps()]}) [{path}]")
    if bits not in (16, 32):
        raise DicomWriteError(f"bits must be 16 or 32, got {bits} [{path}]")


def write_rtdose(dose: Volume, path: str | Path, *, summation: DoseSummationType,
                 plan: Plan | None, series: SeriesInfo, image_grid: Grid, study: StudyIdentity,
                 provenance: Provenance | None = None, comment: str = "",
                 bits: int = 16) -> str:
    """Write ``dose`` (Gy, any grid) as RT Dose Storage in ``series``' Frame of Reference.

    ``summation`` (no default: the caller states what the values mean, see
    :class:`~adaptive.dicom.enums.DoseSummationType`): e.g. PLAN for the dose of every
    fraction of ``plan`` together, FRACTION_SESSION for the dose of one session of its
    fraction group ``plan.fraction_group_number``. ``plan``: referenced in Referenced RT Plan
    Sequence (its ``sop_instance_uid`` must be set, i.e. the plan has been written) and must
    be in ``series``' Frame of Reference; required for every summation type but RECORD.
    ``series`` / ``image_grid``: the image series the dose was computed on and its grid: the
    dose grid must lie inside it (:class:`GridOutsideImageError`), so a receiver holding that
    series can recompute and check the dose. ``study``: the session's study identity
    (:class:`StudyMismatchError` if ``series`` or ``plan`` contradict it). Returns the new
    SOP Instance UID. Raises DicomWriteError for negative/non-finite doses, a missing plan
    reference or an unsupported summation type. ``bits``: 16 or 32 (stored integer size).
    Atomic write.
    """
    path = Path(path)
    _check_writable(dose, summation, plan, series, image_grid, study, bits, path)
    st = summation
    umax = 2**bits - 1
    a = np.asarray(dose.array, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise DicomWriteError(f"dose contains non-finite values [{path}]")
    dmax = float(a.max()) if a.size else 0.0
    if a.size and float(a.min()) < -1e-6 * max(dmax, 1e-9):
        raise DicomWriteError(f"dose contains negative values (min {a.min():.4g} Gy) [{path}]")
    # 1e-9 headroom: the DS rounding (≤ 14 significant digits) never pushes the maximum past umax
    scaling_str = ds_str(dmax / umax * (1 + 1e-9)) if dmax > 0 else "1"
    scaling = float(scaling_str)
    stored = np.clip(np.rint(a / scaling), 0, umax).astype("<u4" if bits == 32 else "<u2")

    g = dose.grid
    nz, ny, nx = g.shape
    row, col = g.direction[:, 0], g.direction[:, 1]
    normal = np.cross(row, col)
    sign = float(np.sign(g.direction[:, 2] @ normal)) or 1.0
    offsets = np.arange(nz) * g.spacing[2] * sign

    sop_uid = new_uid()
    date, tm = dicom_date_time()
    ds = new_dataset(RT_DOSE_STORAGE, sop_uid)
    set_patient_study(ds, study)
    new_series(ds, "RTDOSE", f"dose {st.value.lower()}", date, tm)
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = date, tm
    ds.ImagePositionPatient = ds_list(g.origin)
    ds.ImageOrientationPatient = ds_list(np.concatenate([row, col]))
    ds.PixelSpacing = ds_list([g.spacing[1], g.spacing[0]])
    ds.SliceThickness = ds_str(g.spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseComment = comment[:64]  # LO
    ds.DoseSummationType = st.value
    ds.GridFrameOffsetVector = ds_list(offsets)
    ds.DoseGridScaling = scaling_str
    if plan is not None and plan.sop_instance_uid:
        r = Dataset()
        r.ReferencedSOPClassUID = RT_PLAN_STORAGE
        r.ReferencedSOPInstanceUID = plan.sop_instance_uid
        if st.needs_fraction_group:
            f = Dataset()
            f.ReferencedFractionGroupNumber = int(plan.fraction_group_number)
            r.ReferencedFractionGroupSequence = Sequence([f])
        ds.ReferencedRTPlanSequence = Sequence([r])
    apply_provenance(ds, provenance)
    ds.PixelData = stored.tobytes()
    save_atomic(ds, path)
    log.debug("rtdose_written", path=str(path), shape=list(g.shape), max_gy=dmax, sop_uid=sop_uid)
    return sop_uid


def _stored_frames(ds: Dataset, nf: int, rows: int, cols: int, path: Path) -> np.ndarray:
    """The stored Pixel Data values (16 or 32 bits, signed or not, any byte order or a
    compressed transfer syntax) as (frames, rows, columns), before Dose Grid Scaling."""
    if "PixelData" not in ds:
        raise MissingPixelDataError("RT Dose has no Pixel Data", path)
    bits = int(require(ds, "BitsAllocated", path))
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dt = {16: (np.uint16, np.int16), 32: (np.uint32, np.int32)}.get(bits)
    if dt is None:
        raise UnsupportedObjectError(f"RT Dose BitsAllocated {bits} not supported", path)
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None and ts.is_compressed:
        return np.asarray(ds.pixel_array).reshape(nf, rows, cols)
    dtype = np.dtype(dt[1 if signed else 0]).newbyteorder("<" if ts is None or ts.is_little_endian else ">")
    need = nf * rows * cols * dtype.itemsize
    if len(ds.PixelData) < need:
        raise MissingPixelDataError(f"RT Dose Pixel Data truncated: {len(ds.PixelData)} bytes, "
                                    f"expected {need}", path)
    return np.frombuffer(ds.PixelData, dtype=dtype, count=nf * rows * cols).reshape(nf, rows, cols)


def read_rtdose(path: str | Path) -> tuple[Volume, dict]:
    """Read an RT Dose grid: (Volume in Gy (float32, (nz, ny, nx)), info dict).

    The grid is right-handed with k along row × column; frames are reordered if the Grid
    Frame Offset Vector decreases. Both offset forms are accepted (first value 0: relative
    to Image Position; otherwise positions along the normal, e.g. absolute z).
    info keys: sop_instance_uid, referenced_plan_uid, frame_of_reference_uid,
    dose_summation_type, dose_type, dose_units, series_instance_uid, study_instance_uid,
    patient (PatientInfo), comment, provenance (dict or None).
    """
    path = Path(path)
    ds = read_dataset(path)
    if str(ds.get("SOPClassUID", "")) != RT_DOSE_STORAGE:
        raise UnsupportedObjectError(f"not an RT Dose (SOP class {ds.get('SOPClassUID', '?')})", path)
    units = str(ds.get("DoseUnits", "") or "").upper()
    if units not in ("GY", ""):
        raise UnsupportedObjectError(f"DoseUnits {units} (only GY is supported)", path)
    rows, cols = int(require(ds, "Rows", path)), int(require(ds, "Columns", path))
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    ipp = np.asarray([float(v) for v in require(ds, "ImagePositionPatient", path)])
    iop = np.asarray([float(v) for v in require(ds, "ImageOrientationPatient", path)])
    ps = np.asarray([float(v) for v in require(ds, "PixelSpacing", path)])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if nf > 1:
        off = np.asarray([float(v) for v in require(ds, "GridFrameOffsetVector", path)])
        if off.size != nf:
            raise GeometryError(f"GridFrameOffsetVector has {off.size} values for {nf} frames [{path}]")
        if off[0] != 0.0:
            off = off - float(ipp @ normal)  # absolute form: positions along the normal
    else:
        off = np.zeros(1)
    if "DoseGridScaling" not in ds and int(ds.get("BitsAllocated", 32)) != 32:
        log.debug("rtdose_no_scaling", path=str(path))
    scaling = float(ds.get("DoseGridScaling", 1.0) or 1.0)
    raw = _stored_frames(ds, nf, rows, cols, path)
    order = np.argsort(off, kind="stable")
    off = off[order]
    arr = (raw[order].astype(np.float64) * scaling).astype(np.float32)
    if nf > 1:
        d = np.diff(off)
        if np.any(d <= 0) or np.ptp(d) > max(0.01, 0.01 * float(np.median(d))):
            raise GeometryError(f"GridFrameOffsetVector is not uniformly spaced: {off.tolist()} [{path}]")
        dz = float(np.median(d))
    else:
        dz = float(ds.get("SliceThickness", 0) or 0) or 1.0
    grid = Grid(shape=(nf, rows, cols), origin=ipp + off[0] * normal, spacing=[ps[1], ps[0], dz],
                direction=np.column_stack([row, col, normal]))
    ref_plan = ""
    for r in ds.get("ReferencedRTPlanSequence") or []:
        ref_plan = str(r.get("ReferencedSOPInstanceUID", "") or "")
        break
    info = {
        "sop_instance_uid": str(require(ds, "SOPInstanceUID", path)),
        "referenced_plan_uid": ref_plan,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "") or ""),
        "dose_summation_type": str(ds.get("DoseSummationType", "") or ""),
        "dose_type": str(ds.get("DoseType", "") or ""),
        "dose_units": units or "GY",
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "patient": patient_from_ds(ds),
        "comment": str(ds.get("DoseComment", "") or ""),
        "provenance": read_provenance(ds),
    }
    return Volume(arr, grid, "Gy"), info
