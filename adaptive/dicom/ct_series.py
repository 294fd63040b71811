"""Reading and writing CT image series (CT Image Storage, one file per slice).

Geometry: the returned :class:`~adaptive.geometry.volume.Volume` is on a grid whose
``direction`` columns are [row direction cosine, column direction cosine, slice normal]
with slice normal = row × column (from Image Orientation (Patient)), slices sorted by
increasing position along that normal. Spacing (i, j, k) = (Pixel Spacing[1] (column
spacing), Pixel Spacing[0] (row spacing), slice spacing), in mm; origin = Image Position
(Patient) of the first slice (LPS mm). Values are float32 HU (Rescale Slope/Intercept applied).
A CBCT arriving as CT Image Storage is read the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from adaptive.dicom._common import (
    CT_IMAGE_STORAGE,
    ds_list,
    ds_str,
    new_dataset,
    patient_from_ds,
    read_dataset,
    require,
    save_atomic,
    set_patient_study,
)
from adaptive.dicom.provenance import Provenance, apply_provenance, dicom_date_time, new_uid
from adaptive.errors import (
    EmptySeriesError,
    GeometryError,
    MissingPixelDataError,
    MixedFrameOfReferenceError,
    MixedSeriesError,
    SeriesGapError,
    StudyMismatchError,
    UnsupportedObjectError,
)
from adaptive.geometry.volume import Grid, Volume
from adaptive.log import get_logger
from adaptive.model.identity import SeriesInfo, StudyIdentity

log = get_logger(__name__)

#: Modalities of non-image objects that may sit next to an image series and are skipped.
NON_IMAGE_MODALITIES = {"RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "RTRECORD", "SR", "KO", "PR",
                        "RTIMAGE", "SEG", "PLAN", "RWV"}

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Relative tolerance on slice spacing uniformity (and absolute floor in mm).
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.01


def _single_uid(items, keyword: str, error, message: str, where) -> str:
    """The one value of UID ``keyword`` shared by all ``items`` ((path, dataset) pairs); raises
    ``error(message.format(n=...) + the UIDs with an example file each, where)`` otherwise."""
    uids: dict[str, Path] = {}
    for f, ds in items:
        uids.setdefault(str(require(ds, keyword, f)), f)
    if len(uids) > 1:
        desc = ", ".join(f"{u} (e.g. {p.name})" for u, p in uids.items())
        raise error(f"{message.format(n=len(uids))}: {desc}", where)
    return next(iter(uids))


def _list_files(source) -> list[Path]:
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
        where = "file list"
    else:
        src = Path(source)
        if src.is_file():
            files = [src]
        elif src.is_dir():
            files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            raise EmptySeriesError("no such file or folder", src)
        where = str(src)
    if not files:
        raise EmptySeriesError(f"no files in {where}", None if where == "file list" else where)
    return files


def _orientation(ds: Dataset, path) -> tuple[np.ndarray, np.ndarray]:
    iop = np.asarray([float(v) for v in require(ds, "ImageOrientationPatient", path)], dtype=np.float64)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise GeometryError(f"ImageOrientationPatient must have 6 finite values, got {iop.tolist()} [{path}]")
    row, col = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(float(row @ col)) > 1e-3):
        raise GeometryError(f"ImageOrientationPatient is not orthonormal: {iop.tolist()} [{path}]")
    return row, col


def _pixels(ds: Dataset, path) -> np.ndarray:
    """Raw stored pixel values (rows, cols) of one single-frame image."""
    if "PixelData" not in ds:
        raise MissingPixelDataError("image instance has no Pixel Data", path)
    rows = int(require(ds, "Rows", path))
    cols = int(require(ds, "Columns", path))
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if nframes != 1:
        raise UnsupportedObjectError(f"multi-frame image ({nframes} frames) is not a slice series", path)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise UnsupportedObjectError("only single-sample (greyscale) images are supported", path)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and ts.is_compressed:
        try:
            arr = ds.pixel_array
        except Exception as e:
            raise MissingPixelDataError(f"cannot decode compressed Pixel Data ({ts.name}): {e}", path) from e
        if arr.shape != (rows, cols):
            raise MissingPixelDataError(f"decoded Pixel Data has shape {arr.shape}, expected {(rows, cols)}", path)
        return arr
    bits = int(require(ds, "BitsAllocated", path))
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dtypes = {8: (np.uint8, np.int8), 16: (np.uint16, np.int16), 32: (np.uint32, np.int32)}
    if bits not in dtypes:
        raise UnsupportedObjectError(f"BitsAllocated {bits} not supported", path)
    dt = np.dtype(dtypes[bits][1 if signed else 0]).newbyteorder("<" if ts is None or ts.is_little_endian else ">")
    data = ds.PixelData
    need = rows * cols * dt.itemsize
    if data is None or len(data) < need:
        got = 0 if data is None else len(data)
        raise MissingPixelDataError(f"Pixel Data truncated: {got} bytes, expected {need}", path)
    arr = np.frombuffer(data, dtype=dt, count=rows * cols).reshape(rows, cols)
    bits_stored = int(ds.get("BitsStored", bits) or bits)
    if bits_stored < bits:  # mask unused high bits and sign-extend
        u = arr.astype(np.int64) & ((1 << bits_stored) - 1)
        if signed:
            u = np.where(u >= (1 << (bits_stored - 1)), u - (1 << bits_stored), u)
        arr = u
    return arr


def read_ct_series(source: str | Path | list[Path], *, modality: str | None = None
                   ) -> tuple[Volume, SeriesInfo]:
    """Read a folder (non-recursive; hidden files skipped) or a list of single-frame image files.

    Non-image objects (RT Struct, Plan, Dose, REG, ..., DICOMDIR) in the folder are skipped; with
    ``modality`` given (e.g. "CT"), instances of other modalities are skipped too.
    Returns ``(Volume in HU (float32, (nz, ny, nx)), SeriesInfo)`` with
    ``SeriesInfo.sop_instance_uids`` in slice order k = 0..nz-1.

    Raises NotDicomError (names the file), MissingTagError, MissingPixelDataError,
    MixedSeriesError, MixedFrameOfReferenceError, SeriesGapError (names the files either
    side of the gap or the duplicates), GeometryError (non-orthonormal or differing
    orientation, gantry tilt, differing rows/columns/pixel spacing), EmptySeriesError.
    """
    items = _image_items(source, modality)

    # identity checks: one series, one Frame of Reference
    where = None if isinstance(source, (list, tuple)) else source
    series_uid = _single_uid(items, "SeriesInstanceUID", MixedSeriesError, "{n} series mixed", where)
    for_uid = _single_uid(items, "FrameOfReferenceUID", MixedFrameOfReferenceError,
                          "series has {n} Frames of Reference", where)

    # geometry
    row, col, rows0, cols0, ps0, positions = _slice_geometry(items)
    normal = np.cross(row, col)
    items, positions, dz = _sorted_slices(items, positions, normal, ps0)
    vol = _hu_volume(items, rows0, cols0)

    direction = np.column_stack([row, col, normal])
    grid = Grid(shape=(len(items), rows0, cols0), origin=positions[0],
                spacing=np.array([ps0[1], ps0[0], dz]), direction=direction)
    return Volume(vol, grid, "HU"), _series_info(items, series_uid, for_uid)


def _image_items(source: str | Path | list[Path], modality: str | None) -> list[tuple[Path, Dataset]]:
    """(path, dataset) of the image instances of ``source`` (of ``modality`` when given);
    raises :class:`EmptySeriesError` when there are none."""
    files = _list_files(source)
    want = modality.upper() if modality else None
    items = []  # (path, ds)
    for f in files:
        ds = read_dataset(f)
        if str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            continue  # DICOMDIR
        mod = str(ds.get("Modality", "") or "").upper()
        if want is not None and mod != want:
            continue
        if want is None and mod in NON_IMAGE_MODALITIES:
            continue
        items.append((f, ds))
    if not items:
        raise EmptySeriesError(f"no {want or 'image'} instances found",
                               None if isinstance(source, (list, tuple)) else source)
    return items


def _slice_geometry(items: list[tuple[Path, Dataset]]
                    ) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray, np.ndarray]:
    """(row and column direction cosines (LPS), Rows, Columns, Pixel Spacing (row, column mm),
    Image Position Patient (LPS mm) per slice); all slices must share orientation, size and
    spacing (:class:`GeometryError` names the file that differs)."""
    f0, ds0 = items[0]
    row, col = _orientation(ds0, f0)
    rows0, cols0 = int(require(ds0, "Rows", f0)), int(require(ds0, "Columns", f0))
    ps0 = np.asarray([float(v) for v in require(ds0, "PixelSpacing", f0)], dtype=np.float64)
    if ps0.shape != (2,) or np.any(ps0 <= 0):
        raise GeometryError(f"invalid PixelSpacing {ps0.tolist()} [{f0}]")
    positions = []
    for f, ds in items:
        r, c = _orientation(ds, f)
        if not (np.allclose(r, row, atol=1e-4) and np.allclose(c, col, atol=1e-4)):
            raise GeometryError(f"ImageOrientationPatient differs from {f0.name} [{f}]")
        if int(require(ds, "Rows", f)) != rows0 or int(require(ds, "Columns", f)) != cols0:
            raise GeometryError(f"Rows/Columns differ from {f0.name} [{f}]")
        ps = np.asarray([float(v) for v in require(ds, "PixelSpacing", f)])
        if ps.shape != (2,) or not np.allclose(ps, ps0, atol=1e-4):
            raise GeometryError(f"PixelSpacing {ps.tolist()} differs from {ps0.tolist()} of {f0.name} [{f}]")
        ipp = np.asarray([float(v) for v in require(ds, "ImagePositionPatient", f)], dtype=np.float64)
        if ipp.shape != (3,) or not np.all(np.isfinite(ipp)):
            raise GeometryError(f"invalid ImagePositionPatient {ipp.tolist()} [{f}]")
        positions.append(ipp)
    positions = np.asarray(positions)
    return row, col, rows0, cols0, ps0, positions


def _sorted_slices(items: list[tuple[Path, Dataset]], positions: np.ndarray, normal: np.ndarray,
                   ps0: np.ndarray) -> tuple[list[tuple[Path, Dataset]], np.ndarray, float]:
    """Slices sorted along the normal, their positions (LPS mm) and the slice spacing (mm);
    raises :class:`SeriesGapError` for duplicate or unevenly spaced slices and
    :class:`GeometryError` for a tilted or sheared stack."""
    s = positions @ normal
    order = np.argsort(s, kind="stable")
    items = [items[i] for i in order]
    positions = positions[order]
    s = s[order]
    nz = len(items)
    if nz > 1:
        d = np.diff(s)
        dup = np.nonzero(d < SPACING_ABS_TOL_MM)[0]
        if dup.size:
            a, b = items[dup[0]][0], items[dup[0] + 1][0]
            raise SeriesGapError(f"duplicate slice position {s[dup[0]]:.3f} mm along the normal: "
                                 f"{a.name} and {b.name}", a.parent)
        dz = float(np.median(d))
        bad = np.nonzero(np.abs(d - dz) > max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * dz))[0]
        if bad.size:
            k = int(bad[0])
            a, b = items[k][0], items[k + 1][0]
            raise SeriesGapError(f"non-uniform slice spacing: {d[k]:.3f} mm between {a.name} "
                                 f"(at {s[k]:.3f} mm) and {b.name} (at {s[k + 1]:.3f} mm), "
                                 f"expected {dz:.3f} mm (missing or extra slice)", a.parent)
        # in-plane shift between slices = gantry tilt / sheared stack: not a regular grid
        rel = positions - positions[0]
        inplane = rel - np.outer(rel @ normal, normal)
        worst = int(np.argmax(np.linalg.norm(inplane, axis=1)))
        if np.linalg.norm(inplane[worst]) > max(0.01, 0.01 * min(ps0)):
            raise GeometryError(f"slice positions are not along the slice normal (gantry tilt or "
                                f"sheared stack; in-plane offset {inplane[worst].round(3).tolist()} mm) "
                                f"[{items[worst][0]}]")
    else:
        dz = float(items[0][1].get("SpacingBetweenSlices", 0) or items[0][1].get("SliceThickness", 0) or 1.0)
        if dz <= 0:
            dz = 1.0
    return items, positions, dz


def _hu_volume(items: list[tuple[Path, Dataset]], rows0: int, cols0: int) -> np.ndarray:
    """The slices' stored values rescaled to HU (Rescale Slope/Intercept), float32 (nz, ny, nx)."""
    vol = np.empty((len(items), rows0, cols0), dtype=np.float32)
    for k, (f, ds) in enumerate(items):
        raw = _pixels(ds, f)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        if slope == 1.0:
            np.add(raw, intercept, out=vol[k], casting="unsafe")
        else:
            vol[k] = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return vol


def _series_info(items: list[tuple[Path, Dataset]], series_uid: str, for_uid: str) -> SeriesInfo:
    """Patient, study and series identity from the first slice; SOP Instance UIDs in slice
    order."""
    f0, ds0 = items[0]
    return SeriesInfo(
        patient=patient_from_ds(ds0),
        study_instance_uid=str(require(ds0, "StudyInstanceUID", f0)),
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        modality=str(ds0.get("Modality", "CT") or "CT"),
        sop_instance_uids=[str(require(ds, "SOPInstanceUID", f)) for f, ds in items],
        sop_class_uid=str(require(ds0, "SOPClassUID", f0)),
        study_id=str(ds0.get("StudyID", "") or ""),
        study_date=str(ds0.get("StudyDate", "") or ""),
        series_description=str(ds0.get("SeriesDescription", "") or ""),
        series_number=int(ds0.get("SeriesNumber", 0) or 0),
        accession_number=str(ds0.get("AccessionNumber", "") or ""),
        referring_physician_name=str(ds0.get("ReferringPhysicianName", "") or ""),
        study_time=str(ds0.get("StudyTime", "") or ""),
    )


def completed_series_info(info: SeriesInfo, study: StudyIdentity, nz: int, description: str,
                          out_dir: Path | str = "") -> SeriesInfo:
    """``info`` with ``study``'s patient and study, and the series, Frame of Reference and
    ``nz`` SOP Instance UIDs it lacks; raises :class:`StudyMismatchError` when it names
    another patient or study. :func:`write_ct_series` given the result (same ``study``,
    slice count and description) writes exactly it: a caller can name the series (e.g. in a
    structure set) before or while it is written."""
    sops = list(info.sop_instance_uids) if len(info.sop_instance_uids) == nz else [new_uid() for _ in range(nz)]
    if info.study_instance_uid and info.study_instance_uid != study.study_instance_uid:
        raise StudyMismatchError(f"series info names study {info.study_instance_uid}, the "
                                 f"study identity is {study.study_instance_uid} [{out_dir}]")
    if info.study_instance_uid:
        study.check_series(info, f"CT series [{out_dir}]")
    else:
        study.check_patient(info.patient, f"CT series [{out_dir}]")
    return dataclasses.replace(
        info,
        patient=study.patient, study_date=study.study_date, study_time=study.study_time,
        study_id=study.study_id, accession_number=study.accession_number,
        referring_physician_name=study.referring_physician_name,
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=info.series_instance_uid or new_uid(),
        frame_of_reference_uid=info.frame_of_reference_uid or new_uid(),
        sop_instance_uids=sops,
        sop_class_uid=CT_IMAGE_STORAGE,
        modality=info.modality or "CT",
        series_description=description or info.series_description,
    )


def _slice_dataset(done: SeriesInfo, study: StudyIdentity, grid: Grid, k: int,
                   date_time: tuple[str, str], derivation: str, slope: float,
                   intercept: float) -> Dataset:
    """CT Image Storage dataset of slice ``k`` without Pixel Data: position (LPS mm),
    orientation and spacing (mm) from ``grid``, rescale to HU."""
    date, tm = date_time
    sops = done.sop_instance_uids
    row, col = grid.direction[:, 0], grid.direction[:, 1]
    normal = np.cross(row, col)
    iop = ds_list(np.concatenate([row, col]))
    pixel_spacing = ds_list([grid.spacing[1], grid.spacing[0]])
    thickness = ds_str(grid.spacing[2])
    wl_center, wl_width = "40", "400"
    ds = new_dataset(CT_IMAGE_STORAGE, sops[k])
    set_patient_study(ds, study)
    ds.Modality = done.modality if done.modality == "CT" else "CT"
    ds.SeriesInstanceUID = done.series_instance_uid
    ds.SeriesNumber = int(done.series_number)
    ds.SeriesDate, ds.SeriesTime = date, tm
    ds.SeriesDescription = (done.series_description or "")[:64]
    ds.PatientPosition = "HFS"
    ds.Laterality = ""
    ds.FrameOfReferenceUID = done.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.InstanceNumber = k + 1
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = date, tm
    ds.AcquisitionNumber = 1
    if derivation:
        ds.DerivationDescription = derivation[:1024]
    ds.ImageComments = derivation[:10240] if derivation else ""
    ipp = grid.ijk_to_lps(np.array([0.0, 0.0, float(k)]))
    ds.ImagePositionPatient = ds_list(ipp)
    ds.ImageOrientationPatient = iop
    ds.PixelSpacing = pixel_spacing
    ds.SliceThickness = thickness
    ds.SliceLocation = ds_str(float(ipp @ normal))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = ds_str(intercept)
    ds.RescaleSlope = ds_str(slope)
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = wl_center, wl_width
    ds.KVP = ""
    return ds


def _rescale(arr: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) so that value ≈ stored_int16 * slope + intercept for all of ``arr``."""
    if arr.size == 0:
        return 1.0, 0.0
    lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN/inf propagate into lo/hi
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise GeometryError("CT volume contains non-finite values")
    if lo >= -32768 and hi <= 32767:
        return 1.0, 0.0
    slope = (hi - lo) / 65535.0
    return slope, lo + 32768.0 * slope


def _stored_slice(sl: np.ndarray, slope: float, intercept: float) -> bytes:
    """One slice as little-endian int16 stored values (rounded)."""
    if slope == 1.0 and intercept == 0.0:
        if np.issubdtype(sl.dtype, np.integer):
            return sl.astype("<i2").tobytes()
        return np.rint(sl).astype("<i2").tobytes()
    v = np.rint((sl.astype(np.float64) - intercept) / slope)
    return np.clip(v, -32768, 32767).astype("<i2").tobytes()


def write_ct_series(volume: Volume, info: SeriesInfo, out_dir: str | Path, *,
                    study: StudyIdentity, provenance: Provenance | None = None,
                    description: str = "", derivation: str = "") -> SeriesInfo:
    """Write ``volume`` (HU) as CT Image Storage, one file ``CT.<SOPInstanceUID>.dcm`` per slice.

    Slice k gets Image Position (Patient) = grid.ijk_to_lps((0, 0, k)), Image Orientation
    (Patient) = direction columns 0 and 1, Pixel Spacing = [spacing_j, spacing_i] (mm).
    Values are rounded to integer HU (int16, slope 1) when they fit, otherwise rescaled.
    Patient and study come from ``study`` (``info`` must not name another patient or study:
    :class:`StudyMismatchError`). Missing series/FoR/SOP UIDs in ``info`` are generated (SOP
    UIDs are reused when ``info.sop_instance_uids`` has one per slice). Files are written
    atomically.
    Returns the completed :class:`SeriesInfo` (a copy; ``info`` is not modified).

    Note: a left-handed grid (direction k = −(row × column)) is written faithfully but is
    read back by :func:`read_ct_series` as the equivalent right-handed grid (slices reversed).
    """
    grid = volume.grid
    nz = grid.shape[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = completed_series_info(info, study, nz, description, out_dir)
    sops = done.sop_instance_uids
    slope, intercept = _rescale(volume.array)
    date, tm = dicom_date_time()
    provenance = provenance if provenance is not None else Provenance()
    text = provenance.to_json()
    for k in range(nz):
        ds = _slice_dataset(done, study, grid, k, (date, tm), derivation, slope, intercept)
        apply_provenance(ds, provenance, text=text)
        ds.PixelData = _stored_slice(volume.array[k], slope, intercept)
        save_atomic(ds, out_dir / f"CT.{sops[k]}.dcm")
    log.debug("ct_series_written", folder=str(out_dir), slices=nz, series_uid=done.series_instance_uid)
    return done
