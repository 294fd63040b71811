"""Patient, study and series identity carried through the pipeline (for references/provenance).

:class:`StudyIdentity` is the one study-level identity every object of a session is written
with (General Study and Patient modules): everything sharing a Study Instance UID must agree
on Study Date/Time, Study ID, Accession Number, Referring Physician's Name and the patient
module (checked by dicom3tools' ``dcentvfy``; archives such as Orthanc index a study with
whichever values arrive first).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pydicom.uid import CTImageStorage

from adaptive.errors import StudyMismatchError


@dataclass
class PatientInfo:
    patient_id: str
    patient_name: str = ""
    birth_date: str = ""  # DICOM DA, YYYYMMDD or ""
    sex: str = ""  # "M", "F", "O" or ""

    def mismatches(self, other: PatientInfo) -> list[str]:
        """Attributes (``name 'ours' != 'theirs'``) by which ``other`` is not this patient:
        ID and name must be equal; birth date and sex only when both are known. The one rule
        every identity check uses (a CBCT against the planning CT before registration, an
        object against the session's study before it is written)."""
        return [f"{f.name} {getattr(other, f.name)!r} != {getattr(self, f.name)!r}"
                for f in fields(PatientInfo)
                if getattr(other, f.name) != getattr(self, f.name)
                and (f.name in ("patient_id", "patient_name")
                     or (getattr(other, f.name) and getattr(self, f.name)))]


@dataclass(frozen=True)
class StudyIdentity:
    """Study-level attributes (General Study module) and the patient (Patient module) of a
    study. Writers take one and refuse inputs that contradict it (:meth:`check_series`)."""

    patient: PatientInfo
    study_instance_uid: str
    study_date: str = ""  # DA
    study_time: str = ""  # TM
    study_id: str = ""  # SH (16)
    accession_number: str = ""  # SH (16)
    referring_physician_name: str = ""  # PN

    def __post_init__(self):
        if not self.study_instance_uid:
            raise StudyMismatchError("a study identity needs a Study Instance UID")

    @classmethod
    def from_series(cls, info: SeriesInfo) -> StudyIdentity:
        """The study identity an image series was received (or written) with."""
        return cls(patient=PatientInfo(**{f.name: getattr(info.patient, f.name)
                                          for f in fields(PatientInfo)}),
                   study_instance_uid=info.study_instance_uid, study_date=info.study_date,
                   study_time=info.study_time, study_id=info.study_id,
                   accession_number=info.accession_number,
                   referring_physician_name=info.referring_physician_name)

    def differences(self, other: StudyIdentity) -> list[str]:
        """Attributes (``name: ours != theirs``) in which ``other`` disagrees with this one."""
        out = [f"Patient {f.name}: {getattr(self.patient, f.name)!r} != "
               f"{getattr(other.patient, f.name)!r}" for f in fields(PatientInfo)
               if getattr(self.patient, f.name) != getattr(other.patient, f.name)]
        out += [f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
                for f in fields(self) if f.name != "patient"
                and getattr(self, f.name) != getattr(other, f.name)]
        return out

    def check_patient(self, patient: PatientInfo, what: str) -> None:
        """Raise :class:`StudyMismatchError` when ``patient`` (of ``what``) is not this
        study's patient (ID and name must match; birth date and sex when both are known)."""
        bad = self.patient.mismatches(patient)
        if bad:
            raise StudyMismatchError(f"{what} belongs to another patient than study "
                                     f"{self.study_instance_uid}: {'; '.join(bad)}")

    def check_series(self, info: SeriesInfo, what: str) -> None:
        """Refuse a series of another patient, or one that claims this Study Instance UID
        with other study-level attributes (what ``dcentvfy`` reports as an error)."""
        self.check_patient(info.patient, what)
        if info.study_instance_uid == self.study_instance_uid:
            diff = self.differences(StudyIdentity.from_series(info))
            if diff:
                raise StudyMismatchError(f"{what} is in study {self.study_instance_uid} but "
                                         f"disagrees on {'; '.join(diff)}")

    def to_dict(self) -> dict:
        return {"patient": {f.name: getattr(self.patient, f.name) for f in fields(PatientInfo)},
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "patient"}}

    @classmethod
    def from_dict(cls, d: dict) -> StudyIdentity:
        return cls(patient=PatientInfo(**d["patient"]),
                   **{k: v for k, v in d.items() if k != "patient"})


@dataclass
class SeriesInfo:
    """Identity of an image series (what an RT object must reference)."""

    patient: PatientInfo
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str = "CT"
    sop_instance_uids: list[str] = field(default_factory=list)  # in slice order (k = 0..nz-1)
    sop_class_uid: str = CTImageStorage
    study_id: str = ""
    study_date: str = ""
    series_description: str = ""
    series_number: int = 1
    accession_number: str = ""
    referring_physician_name: str = ""
    study_time: str = ""

    @property
    def study(self) -> StudyIdentity:
        """This series' study identity (:meth:`StudyIdentity.from_series`)."""
        return StudyIdentity.from_series(self)
