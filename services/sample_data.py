"""Synthetic DICOM series for gateway tests and the receive benchmark (not patient data).

Slices are written with pydicom as Explicit VR Little Endian CT Image Storage files with
complete geometry; pixel values are a deterministic pattern (not anatomy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct_slice(*, patient_id: str, study_uid: str, series_uid: str, for_uid: str, index: int,
             rows: int, cols: int, spacing_mm=(1.0, 1.0, 2.0), description: str = "CT",
             sop_uid: str | None = None, pixels: np.ndarray | None = None) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = "CT"
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1
    ds.SeriesNumber = 1
    ds.ImagePositionPatient = [-(cols - 1) * spacing_mm[0] / 2, -(rows - 1) * spacing_mm[1] / 2,
                               index * spacing_mm[2]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing_mm[1], spacing_mm[0]]
    ds.SliceThickness = spacing_mm[2]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if pixels is None:
        y, x = np.mgrid[0:rows, 0:cols]
        pixels = ((x + y + 7 * index) % 2048).astype(np.int16)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    return ds


def write_ct_series(folder: str | Path, n_slices: int, rows: int = 512, cols: int = 512, *,
                    patient_id: str = "PAT001", description: str = "CT",
                    study_uid: str | None = None, series_uid: str | None = None,
                    for_uid: str | None = None) -> list[Path]:
    """Write ``n_slices`` CT slices into ``folder``; returns their paths (slice order)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = for_uid or generate_uid()
    paths = []
    for k in range(n_slices):
        ds = ct_slice(patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
                      for_uid=for_uid, index=k, rows=rows, cols=cols, description=description)
        p = folder / f"CT_{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
