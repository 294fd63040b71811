"""Hand-off of a session's chosen plan to the TMS: which objects, checked again just before
they leave, sent on a thread, with every instance's state recorded durably.

Before sending (:meth:`HandOff.prepare`), every object is checked again:

* its content is what the worker recorded (SHA-256 in the stage record; for the scheduled
  plan taken from the store, the hash taken when the session started) - nothing was
  swapped on disk since;
* its header says it belongs to the session's patient (Patient ID) and study (the CBCT's
  study for the adapted plan's objects, adaptive.pipeline.handoff; the scheduled plan's own
  study for the scheduled plan).

A failed check refuses the hand-off (:class:`~adaptive.errors.HandOffError`), naming the
file and what was wrong; nothing is sent.

Sending is idempotent: the instances (SOP Instance UID, path, hash) are recorded in the
store before the first C-STORE, each with its state (``pending`` -> ``sending`` ->
``stored`` | ``not_stored`` | ``unknown``); a retry (``retry-handoff``, or the automatic
resumption after an orchestrator restart) sends the same files from the same outbox batch,
skipping those already ``stored``. Nothing is ever re-generated with new UIDs.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from pydantic import ValidationError

from adaptive.dicom._common import read_dataset
from adaptive.errors import DicomInputError, HandOffError
from adaptive.pipeline.records import PlanningRecord, sha256_file
from services.gateway.scu import send_files, stage_outbox

STORED, NOT_STORED, UNKNOWN = "stored", "not_stored", "unknown"


def handoff_files(s, plan: str) -> list[tuple[str, str | None]]:
    """(path, recorded SHA-256) of the objects that ``plan`` hands off for session ``s``."""
    if s.plans or plan == "adapted":
        try:
            rec = PlanningRecord.model_validate(s.plans)
        except ValidationError as e:
            raise HandOffError(f"session {s.session_id} has no valid planning record: "
                               f"{str(e)[:500]}") from None
        return [(f, rec.files.get(f)) for f in rec.handoff_files(plan)]
    return [(s.planning["rtplan"], s.planning.get("rtplan_sha256"))]


def expected_study(s, plan: str) -> str | None:
    if plan == "adapted":
        return ((s.registration or {}).get("study") or {}).get("study_instance_uid")
    return s.planning.get("rtplan_study")


def outcome_of(instances: list[dict]) -> str:
    """``stored`` when every instance is; else ``unknown`` if any may have reached the TMS,
    else ``not_stored``."""
    states = {i["status"] for i in instances}
    if states <= {STORED}:
        return STORED
    return UNKNOWN if UNKNOWN in states or "sending" in states else NOT_STORED


class HandOff:
    """Hand-offs of one orchestrator; results come back on ``results`` as
    ``(session_id, ok, info)`` for the orchestrator's loop."""

    def __init__(self, tms_cfg, outbox: Path, store):
        self.tms = tms_cfg
        self.outbox = Path(outbox)
        self.store = store
        self.results: queue.Queue = queue.Queue()

    def prepare(self, s, plan: str) -> list[tuple[str, str, str]]:
        """Check every object of ``plan`` (see the module doc); returns (SOP Instance UID,
        path, SHA-256) in hand-off order. :class:`HandOffError` when any check fails."""
        files = handoff_files(s, plan)
        missing = [f for f, _ in files if not Path(f).is_file()]
        if missing:
            raise HandOffError(f"plan objects missing on disk: {missing}")
        study = expected_study(s, plan)
        items = []
        for f, want in files:
            got = sha256_file(f)
            if want is None or got != want:
                raise HandOffError(f"{f}: content is not what the stage recorded (SHA-256 "
                                   f"{got[:16]}..., recorded {str(want)[:16]}...); not sent")
            try:
                ds = read_dataset(f, stop_before_pixels=True)
            except DicomInputError as e:
                raise HandOffError(f"{f}: unreadable: {e}") from None
            pid = str(ds.get("PatientID", "")).strip(" ")
            if pid != s.patient_id.strip(" "):
                raise HandOffError(f"{f} belongs to patient {pid!r}, not the session's "
                                   f"{s.patient_id!r}; nothing sent")
            st = str(ds.get("StudyInstanceUID", ""))
            if study and st != study:
                raise HandOffError(f"{f} is in study {st}, not the session's {study}; "
                                   f"nothing sent")
            items.append((str(ds.get("SOPInstanceUID", "")), f, got))
        return items

    def start(self, s, items: list[tuple[str, str, str]], *, batch: str | None = None) -> str:
        """Record ``items`` (kept with their states on a retry) and send them on a thread;
        ``batch``: the outbox batch of an earlier attempt (a retry sends it again). Returns
        the outbox batch folder (copies of the objects, kept whatever happens)."""
        sid = s.session_id
        self.store.handoff_plan(sid, items)
        if batch is None or not Path(batch).is_dir():
            batch = stage_outbox([f for _, f, _ in items], self.outbox, sid)
        stored = frozenset(i["sop_instance_uid"] for i in self.store.handoff_instances(sid)
                           if i["status"] == STORED)

        def on_state(r):
            self.store.handoff_status(sid, r.sop_instance_uid, r.state,
                                      dimse_status=r.status, error=r.error,
                                      attempt=r.state == "sending")

        def work():
            try:
                reports, b = send_files([f for _, f, _ in items], self.tms, outbox=self.outbox,
                                        session_id=sid, batch=batch, skip=stored,
                                        on_state=on_state)
                self.results.put((sid, True, {"outbox": str(b),
                                              "instances": [r.__dict__ for r in reports]}))
            except HandOffError as e:
                self.results.put((sid, False, {"error": str(e), "outbox": str(e.outbox),
                                               "instances": e.report}))
            except Exception as e:  # noqa: BLE001 - any failure is the hand-off's outcome
                self.results.put((sid, False, {"error": repr(e), "outbox": str(batch)}))

        threading.Thread(target=work, name=f"handoff-{sid}", daemon=True).start()
        return str(batch)
