"""A session: one patient on the couch in one room, from "waiting for the daily image" to the
plan stored at the TMS (states: :mod:`services.orchestrator.state`).

Everything a session knows is plain data, so it is persisted as it changes
(:mod:`services.orchestrator.store`) and recovered after a restart; the stage records it
holds are the typed records of :mod:`adaptive.pipeline.records`, kept as validated dicts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

from services.orchestrator import state as S


@dataclass
class Session:
    session_id: str
    room: str
    patient_id: str
    protocol: dict | None = None             # {"name", "source"}: the goals it is planned with
    state: str = S.WAITING
    created: float = field(default_factory=time.time)
    history: list[dict] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)
    planning: dict = field(default_factory=dict)
    cbct: dict | None = None
    registration: dict | None = None          # RegistrationRecord (validated)
    plans: dict | None = None                 # PlanningRecord (validated)
    offered: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    budgets_exceeded: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks_failed: list[dict] = field(default_factory=list)  # named failed checks + numbers
    reviews: list[dict] = field(default_factory=list)  # checks the clinician must confirm
    chosen: str | None = None
    handoff: dict | None = None
    error: str = ""
    task_id: str | None = None
    stage_deadline: float | None = None      # monotonic hard stop of the running stage
    cbct_complete_at: float | None = None    # unix time of the CBCT series_complete
    decision_wait_s: float = 0.0
    decision_started: float | None = None    # unix time the current decision wait began
    refused_results: list[dict] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in S.TERMINAL

    def to_record(self) -> dict:
        """Everything, JSON-able (the monotonic ``stage_deadline`` is not kept: it means
        nothing in another process)."""
        d = asdict(self)
        d["stage_deadline"] = None
        return d

    @classmethod
    def from_record(cls, d: dict) -> Session:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def public(self) -> dict:
        e2e = self.stages.get("end_to_end", {})
        return {"session_id": self.session_id, "room": self.room,
                "patient_id": self.patient_id, "state": self.state, "created": self.created,
                "protocol": self.protocol,
                "history": self.history, "stages": self.stages, "planning": self.planning,
                "cbct": self.cbct and {k: self.cbct.get(k) for k in (
                    "series_uid", "count", "path", "series_description",
                    "frame_of_reference_uid")},
                "offered": self.offered, "metrics": self.metrics,
                "budgets_exceeded": self.budgets_exceeded, "notes": self.notes,
                "checks_failed": self.checks_failed, "reviews": self.reviews,
                "registration": self.registration and {k: self.registration.get(k) for k in (
                    "validity", "registration_summary", "initial_alignment",
                    "setup_correction", "review_images")},
                "chosen": self.chosen, "handoff": self.handoff, "error": self.error,
                "plans": self.plans, "end_to_end": e2e,
                "refused_results": self.refused_results}
