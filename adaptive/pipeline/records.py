"""Typed, versioned records of the two online stages (pydantic v2): what the registration
stage and the planning stage hand over (to each other, to the services' orchestrator and to
the console). :mod:`adaptive.pipeline.service_stages` returns them validated; the services
validate every result again at their boundary (:mod:`services.orchestrator.results`), and
the test doubles of the stages build the same models, so a double that drifts from the real
record fails its tests instead of passing on a format the real stage never produces.

Paths are absolute file names on the shared store; ``files`` (filled by the worker that ran
the stage, :func:`services.workers.stages.seal`) maps every file the record names to the
SHA-256 of its content, re-checked before anything is handed off. Units: mm (LPS), s, cc;
doses in the metrics are total-course Gy (see :mod:`adaptive.pipeline.fraction`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REGISTRATION_RECORD = "registration/1"
PLANNING_RECORD = "planning/1"

Validity = Literal["deformable", "rigid", "none"]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content (the hashes in a record's ``files``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Record(BaseModel):
    # drift is an error: a field the model does not know is refused
    model_config = ConfigDict(extra="forbid")


class GateCheck(_Record):
    """One check of the registration safety gate (adaptive.pipeline.safety)."""

    name: str
    passed: bool
    message: str
    level: str
    values: dict[str, Any] = Field(default_factory=dict)
    blocking: bool = True
    review: bool = False


class StudyRecord(_Record):
    """The study of the session's objects (the CBCT's): adaptive.dicom.study."""

    model_config = ConfigDict(extra="allow")
    patient: dict[str, Any]
    study_instance_uid: str


class SealedRecord(_Record):
    """Fields the worker adds at its boundary: whose task it was, and the content hash of
    every file the record names."""

    session_id: str = ""
    patient_id: str = ""
    files: dict[str, str] = Field(default_factory=dict)    # path -> SHA-256 (hex)

    def named_files(self) -> list[str]:
        raise NotImplementedError


def _series_files(folder: str | None) -> list[str]:
    if not folder:
        return []
    return [str(p) for p in sorted(Path(folder).glob("*.dcm"))]


class RegistrationRecord(SealedRecord):
    """What :func:`adaptive.pipeline.fraction.registration_stage` returns."""

    record: Literal["registration/1"] = REGISTRATION_RECORD
    synthetic_ct_dir: str
    rtstruct: str
    rtstruct_uid: str
    reg: str | None = None
    dvf: str | None = None
    registration_json: str | None = None
    rigid_matrix: list[list[float]] = Field(min_length=4, max_length=4)
    frame_of_reference_uid: str
    cbct_grid: dict[str, Any] | None = None
    study: StudyRecord
    cbct_series_uid: str
    synthetic_ct_series_uid: str
    planning_ct_series_uid: str
    scheduled_plan_uid: str
    quality: dict[str, Any] = Field(default_factory=dict)
    planning_roi_volumes_cc: dict[str, float] = Field(default_factory=dict)
    roi_interpreted_types: dict[str, str | None] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    registration_timings_s: dict[str, Any] = Field(default_factory=dict)
    budget_s: float | None = None
    deformable_budget_s: float | None = None
    fallback: str | None = None
    target_roi: str | None = None
    validity: Validity = "deformable"
    registration_checks: list[GateCheck] = Field(default_factory=list)
    registration_failed: list[str] = Field(default_factory=list)
    registration_reviews: list[Any] = Field(default_factory=list)
    registration_summary: str = ""
    initial_alignment: dict[str, Any] | None = None
    setup_correction: dict[str, Any] | None = None
    roi_fov: dict[str, Any] | None = None
    review_images: list[str] = Field(default_factory=list)
    gate_time_s: float | None = None

    def named_files(self) -> list[str]:
        """Every file this record names (the synthetic CT's instances included)."""
        out = _series_files(self.synthetic_ct_dir) + [self.rtstruct]
        out += [p for p in (self.reg, self.dvf, self.registration_json) if p]
        return out + list(self.review_images)


class PlanCheck(_Record):
    name: str
    passed: bool
    message: str = ""
    blocking: bool = True


class AdaptedPlan(_Record):
    """The adapted plan's objects (``rtplan`` None: no adapted plan passed its checks)."""

    rtplan: str | None = None
    rtdose: str | None = None
    rtstruct: str | None = None
    registration: str | None = None
    checks_passed: bool
    checks: list[PlanCheck] = Field(default_factory=list)
    rtstruct_uid: str | None = None
    rtplan_uid: str | None = None
    synthetic_ct_dir: str | None = None
    blocked_by: str | None = None
    reason: str | None = None


class ScheduledPlan(_Record):
    rtplan: str
    rtplan_uid: str | None = None
    rtdose: str | None = None
    rtdose_today: str | None = None


class OptimizerRecord(_Record):
    deadline_s: float | None = None
    iterations: int | None = None
    reason: str | None = None


class PlanningRecord(SealedRecord):
    """What :func:`adaptive.pipeline.fraction.planning_stage` returns (``result``)."""

    record: Literal["planning/1"] = PLANNING_RECORD
    adapted: AdaptedPlan
    scheduled: ScheduledPlan
    metrics: dict[str, Any] = Field(default_factory=dict)
    protocol: dict[str, Any] | None = None
    fallback: str | None = None
    optimizer: OptimizerRecord | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)
    budget_s: float | None = None

    def named_files(self) -> list[str]:
        """Every file this record names (the synthetic CT's instances included)."""
        a, s = self.adapted, self.scheduled
        out = _series_files(a.synthetic_ct_dir)
        out += [p for p in (a.rtstruct, a.registration, a.rtplan, a.rtdose) if p]
        return out + [p for p in (s.rtplan, s.rtdose, s.rtdose_today) if p]

    def handoff_files(self, plan: str) -> list[str]:
        """The objects handed off for ``plan`` ("adapted" | "scheduled"), in order: for the
        adapted plan the image the dose was computed on first, then what references it
        (adaptive.pipeline.handoff); for the scheduled plan its RT Plan (and RT Dose)."""
        if plan == "adapted":
            a = self.adapted
            return _series_files(a.synthetic_ct_dir) + [
                p for p in (a.rtstruct, a.registration, a.rtplan, a.rtdose) if p]
        return [p for p in (self.scheduled.rtplan, self.scheduled.rtdose) if p]


RECORDS: dict[str, type[SealedRecord]] = {"registration": RegistrationRecord,
                                          "planning": PlanningRecord}
