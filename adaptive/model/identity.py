"""Patient, study and series identity carried through the pipeline (for references/provenance)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PatientInfo:
    patient_id: str
    patient_name: str = ""
    birth_date: str = ""  # DICOM DA, YYYYMMDD or ""
    sex: str = ""  # "M", "F", "O" or ""


@dataclass
class SeriesInfo:
    """Identity of an image series (what an RT object must reference)."""

    patient: PatientInfo
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str = "CT"
    sop_instance_uids: list[str] = field(default_factory=list)  # in slice order (k = 0..nz-1)
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    study_id: str = ""
    study_date: str = ""
    series_description: str = ""
    series_number: int = 1
    accession_number: str = ""
    referring_physician_name: str = ""
