"""Helpers shared by the DICOM readers/writers (not public API)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from adaptive.atomic import atomic_file
from adaptive.dicom.provenance import new_uid
from adaptive.errors import DicomInputError, MissingTagError, NotDicomError
from adaptive.model.identity import PatientInfo, StudyIdentity

# the SOP classes we write and read (pydicom's constants, under the names our modules use)
CT_IMAGE_STORAGE = uid.CTImageStorage
RT_STRUCT_STORAGE = uid.RTStructureSetStorage
RT_PLAN_STORAGE = uid.RTPlanStorage
RT_DOSE_STORAGE = uid.RTDoseStorage
SPATIAL_REG_STORAGE = uid.SpatialRegistrationStorage
DEFORMABLE_REG_STORAGE = uid.DeformableSpatialRegistrationStorage


def ds_str(x: float) -> str:
    """A DS (decimal string) of at most 16 characters for ``x``."""
    x = float(x)
    if x == 0:
        return "0"
    if x == round(x) and abs(x) < 1e15:
        return str(round(x))
    return format_number_as_ds(x)


def ds_list(values) -> list[str]:
    return [ds_str(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def ds_strings(values) -> list[str]:
    """DS values (PS3.5 6.2: decimal strings of at most 16 bytes) for many finite numbers:
    12 significant digits (1e-9 mm for coordinates below 1 m), :func:`ds_str` for the few
    that do not fit in 16 characters that way. About 5x faster than :func:`ds_list`."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError("DS values must be finite")
    out = list(map("{:.12g}".format, a.tolist()))
    for i, s in enumerate(out):
        if len(s) > 16:
            out[i] = ds_str(a[i])
    return out


def ds_element(keyword: str, values) -> DataElement:
    """A multi-valued DS element of ``values`` (see :func:`ds_strings`), given to pydicom as
    already converted: its value setter would parse and validate every string again (~10-25
    µs each: seconds for the contours of an RT Struct on a 512 x 512 image). The element's
    value is the list of strings, written as they are."""
    return DataElement(tag_for_keyword(keyword), "DS", ds_strings(values),
                       already_converted=True)


def ds_floats(ds: Dataset, keyword: str, path, context: str = "") -> np.ndarray:
    """The numbers of a (multi-valued) DS element as float64, parsed from the encoded bytes
    when the element has not been decoded yet (pydicom's DS conversion costs ~10 µs per
    value); :class:`MissingTagError` if absent or empty."""
    tag = tag_for_keyword(keyword)
    elem = ds.get_item(tag) if tag in ds else None
    if elem is None or elem.value is None or len(elem.value) == 0:
        raise MissingTagError(keyword, path, context)
    v = elem.value
    try:
        if isinstance(v, bytes):
            return np.array([float(s) for s in v.split(b"\\")], dtype=np.float64)
        if isinstance(v, (str, int, float)):
            v = str(v).split("\\")
        return np.array([float(s) for s in v], dtype=np.float64)
    except ValueError as e:
        raise DicomInputError(f"{keyword} {context}: not decimal strings: {e}", path) from e


def new_dataset(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """An empty dataset with a file meta header (Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ADAPTIVE"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def set_patient_study(ds: Dataset, study: StudyIdentity) -> None:
    """Patient and General Study modules from the one study identity of a session (Type 2
    attributes present, possibly empty). Every writer calls this, so objects sharing a Study
    Instance UID cannot disagree on study-level attributes."""
    if not isinstance(study, StudyIdentity):
        raise TypeError(f"study must be a StudyIdentity, got {type(study).__name__}")
    p = study.patient
    ds.PatientName = p.patient_name or ""
    ds.PatientID = p.patient_id or ""
    ds.PatientBirthDate = p.birth_date or ""
    ds.PatientSex = p.sex or ""
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date or ""
    ds.StudyTime = study.study_time or ""
    ds.ReferringPhysicianName = study.referring_physician_name or ""
    ds.StudyID = (study.study_id or "")[:16]
    ds.AccessionNumber = (study.accession_number or "")[:16]


def study_from_ds(ds: Dataset) -> StudyIdentity:
    """The study identity (patient + General Study attributes) an object carries."""
    return StudyIdentity(patient=patient_from_ds(ds),
                         study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
                         study_date=str(ds.get("StudyDate", "") or ""),
                         study_time=str(ds.get("StudyTime", "") or ""),
                         study_id=str(ds.get("StudyID", "") or ""),
                         accession_number=str(ds.get("AccessionNumber", "") or ""),
                         referring_physician_name=str(ds.get("ReferringPhysicianName", "") or ""))


def patient_from_ds(ds: Dataset) -> PatientInfo:
    return PatientInfo(patient_id=str(ds.get("PatientID", "") or ""),
                       patient_name=str(ds.get("PatientName", "") or ""),
                       birth_date=str(ds.get("PatientBirthDate", "") or ""),
                       sex=str(ds.get("PatientSex", "") or ""))


def save_atomic(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file atomically (:mod:`adaptive.atomic`)."""
    with atomic_file(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)
    return Path(path)


def read_dataset(path: str | Path, *, stop_before_pixels: bool = False) -> Dataset:
    """dcmread with :class:`NotDicomError` (naming the file) for anything that is not DICOM."""
    path = Path(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as e:
        raise NotDicomError(f"not a DICOM file: {e}", path) from e
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            NotImplementedError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise NotDicomError(f"cannot read file: {e}", path) from e
        raise NotDicomError(f"unreadable/corrupt DICOM file: {type(e).__name__}: {e}", path) from e


_MISSING = object()


def require(ds: Dataset, keyword: str, path, context: str = ""):
    """Value of ``keyword`` in ``ds``; :class:`MissingTagError` if absent or empty."""
    value = ds.get(keyword, _MISSING)
    if value is _MISSING or value is None or (hasattr(value, "__len__") and len(value) == 0
                                              and not isinstance(value, (int, float))):
        raise MissingTagError(keyword, path, context)
    return value


def new_series(ds: Dataset, modality: str, description: str, date: str, time: str, *,
               series_number: int = 1) -> str:
    """General Series of a new derived object: Modality, a new Series Instance UID,
    number, date/time and description (LO, cut to 64). Returns the series UID."""
    ds.Modality = modality
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = description[:64]
    return ds.SeriesInstanceUID
