"""Study identities: a new study for objects that start one (a planning CT, a simulated CBCT),
and the rule that decides which study a session's outputs belong to.

Which study a session's outputs go into: **the CBCT's** (the imaging study of today's
session). The synthetic CT, the propagated RT Structure Set, the Deformable Spatial
Registration, the adapted RT Plan and its RT Dose are all written with the CBCT's study
identity (Study Instance UID, Study Date/Time, Study ID, Accession Number, Referring
Physician's Name and patient module as the CBCT carries them), so a receiver files
everything of one session under the study in which the daily image arrived and ``dcentvfy``
finds no disagreement between them. The planning CT and the scheduled plan stay in their own
(planning) study; the objects that refer to them name that study explicitly (RT Referenced
Study Sequence, Studies Containing Other Referenced Instances Sequence).
"""

from __future__ import annotations

from adaptive.dicom.provenance import dicom_date_time, new_uid
from adaptive.model.identity import PatientInfo, SeriesInfo, StudyIdentity


def new_study(patient: PatientInfo, *, study_id: str = "", accession_number: str = "",
              referring_physician_name: str = "", when: float | None = None) -> StudyIdentity:
    """A new study (new UID, date/time ``when`` or now) for ``patient``."""
    date, tm = dicom_date_time(when)
    return StudyIdentity(patient=patient, study_instance_uid=new_uid(), study_date=date,
                         study_time=tm, study_id=study_id, accession_number=accession_number,
                         referring_physician_name=referring_physician_name)


def session_study(cbct: SeriesInfo) -> StudyIdentity:
    """The study identity every output of a session is written with: the CBCT's (see the
    module doc). Raises :class:`~adaptive.errors.StudyMismatchError` when the CBCT has no
    Study Instance UID."""
    return StudyIdentity.from_series(cbct)
