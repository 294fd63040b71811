"""Specific exception classes. Every error names what was wrong and where.

Services catch :class:`AdaptiveError` and turn it into a console event; anything
else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class AdaptiveError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AdaptiveError):
    """A configuration file is missing, malformed, or has an unknown/invalid key."""


class ClinicalProtocolError(ConfigError):
    """A clinical protocol (the goals a patient is planned with) is unknown, invalid, or cannot
    be determined for a session."""


class GeometryError(AdaptiveError):
    """Inconsistent or invalid image geometry (spacing, direction, overlap)."""


# --- DICOM input -----------------------------------------------------------------


class DicomInputError(AdaptiveError):
    """A DICOM input is unusable. ``path`` names the offending file (or folder)."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{message} [{path}]" if path is not None else message)


class NotDicomError(DicomInputError):
    """The file is not a DICOM file (no preamble/meta, unreadable)."""


class MissingTagError(DicomInputError):
    """A required DICOM attribute is absent or empty."""

    def __init__(self, keyword: str, path: str | Path | None = None, context: str = ""):
        self.keyword = keyword
        msg = f"missing required DICOM attribute {keyword}"
        if context:
            msg += f" ({context})"
        super().__init__(msg, path)


class UnsupportedObjectError(DicomInputError):
    """The SOP class / modality is not one this function reads."""


class MissingPixelDataError(DicomInputError):
    """An image instance has no (or truncated) Pixel Data."""


class SeriesGapError(DicomInputError):
    """Slices of a series are not uniformly spaced (a slice is missing or duplicated)."""


class MixedSeriesError(DicomInputError):
    """A folder/list holds instances of more than one series where one was expected."""


class MixedFrameOfReferenceError(DicomInputError):
    """Instances that must share a Frame of Reference do not."""


class EmptySeriesError(DicomInputError):
    """No image instances were found."""


class UnknownReferencedSeriesError(DicomInputError):
    """An RT object references an image series that is not the one supplied."""


class ContourOutsideImageError(DicomInputError):
    """A contour lies (partly) outside the image grid it is rasterised on."""


class PatientMismatchError(DicomInputError):
    """Two inputs that must belong to the same patient do not."""


# --- compute stages -------------------------------------------------------------


class RegistrationError(AdaptiveError):
    """Registration failed or produced an unusable result (diverged, folded, no overlap)."""


class DoseError(AdaptiveError):
    """Dose calculation could not be done (geometry, beam model, plan content)."""


class OptimizationError(AdaptiveError):
    """Plan optimisation or sequencing failed."""


class PlanCheckError(AdaptiveError):
    """A plan failed a safety check; it must not be handed off."""


class DicomWriteError(AdaptiveError):
    """An object cannot be written as valid DICOM (inconsistent or missing content/references)."""


class StudyMismatchError(DicomWriteError):
    """Objects of one study (or one session) disagree on the patient or on study-level
    attributes (Study Date/Time/ID, Accession Number, Referring Physician, patient module)."""


class GridOutsideImageError(DicomWriteError):
    """A grid (e.g. an RT Dose grid) is not inside the image it was computed on."""


# --- child processes (adaptive.forked) -------------------------------------------


class ChildTimeoutError(AdaptiveError):
    """A function run in a forked child gave no result by its deadline; the child was killed."""


class ChildCancelledError(AdaptiveError):
    """A function run in a forked child was cancelled; the child was killed."""


class ChildDiedError(AdaptiveError):
    """A forked child ended (killed, crashed) without sending a result."""


# --- real-time services ---------------------------------------------------------


class ServiceError(AdaptiveError):
    """A real-time service could not do its job (messaging, worker, state machine)."""


class InvalidIdentifierError(ServiceError):
    """An identifier from outside (UID, AE title, patient ID, room, session id) breaks its
    syntax rule; it is refused before any path or key is built from it."""

    def __init__(self, field: str, value, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid {field} {shown}: {reason}")


class IllegalTransitionError(ServiceError):
    """A session state machine was asked for a transition its state does not allow."""


class HandOffError(ServiceError):
    """Objects could not be stored at the TMS. ``report`` holds the per-instance
    outcome; the objects stay in ``outbox`` (nothing is lost)."""

    def __init__(self, message: str, report: list | None = None, outbox: str | Path | None = None):
        self.report = report or []
        self.outbox = Path(outbox) if outbox is not None else None
        super().__init__(message + (f" (objects kept in {outbox})" if outbox else ""))


class ResultRefusedError(ServiceError):
    """A worker's result does not belong to the task it answers (another patient, session or
    series, files outside the session folder, content hashes that do not match) or does not
    follow its record schema: refused, never used."""


class AuthenticationError(ServiceError):
    """Keys for the services' CURVE authentication are missing, unreadable or unsafe."""


class NotAuthorizedError(ServiceError):
    """A console client's role does not allow the command it sent."""


class StageUnavailableError(ServiceError):
    """A worker's compute stage (adaptive.pipeline) is not available in this installation."""


# --- replay data --------------------------------------------------------------------


class ReplayDataError(AdaptiveError):
    """A replay case, its manifest or its ground truth is missing, malformed or inconsistent.
    The message names the file (and key) concerned."""
