"""The orchestrator process: sessions per room, planning-data registry per patient,
dispatch of stage tasks with budgets, fallbacks, console API and hand-off.

Sockets (endpoints in ``config/services.toml`` ``[orchestrator]``):

* ROUTER ``worker_endpoint`` - stage workers (:class:`services.messaging.WorkerBroker`);
* PULL ``gateway_events_endpoint`` - gateway events (``series_complete``, ...);
* ROUTER ``console_endpoint`` - console requests (see ``docs/console-protocol.md``);
* PUB ``console_events_endpoint`` - session events, topic ``session.<room>``.

How the daily image is recognised (per patient with an active session): a completed CT
series that is not the planning CT (the series the planning structure set references)
and whose Series Description or Image Type contains one of ``cbct_markers``, or whose
Frame of Reference differs from the planning CT's. It must have completed after the
session started, or at most ``accept_cbct_before_start_s`` before. Sessions are keyed by
room; a patient has at most one active session.
"""

from __future__ import annotations

import base64
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import zmq

from adaptive.dicom.daily_image import is_daily_image
from adaptive.errors import (
    AdaptiveError,
    ClinicalProtocolError,
    HandOffError,
    IllegalTransitionError,
    ServiceError,
)
from adaptive.log import get_logger
from adaptive.optimization.protocols import ProtocolTable
from adaptive.pipeline.handoff import image_series_files
from services.config import Budgets, ServicesConfig
from services.gateway.scu import send_files
from services.messaging import TaskOutcome, WorkerBroker
from services.orchestrator import state as S
from services.orchestrator.protocol import protocol_at_start, protocol_from_plan
from services.protocol import ProtocolError, decode, encode, split_routed
from services.validators import require, validate_patient_id, validate_room

CONSOLE_PROTOCOL = "adaptive-console/1"


@dataclass
class PatientData:
    """Completed series of one patient as reported by the gateway."""

    patient_id: str
    series: dict[str, dict] = field(default_factory=dict)      # series UID -> event body
    rtstructs: list[dict] = field(default_factory=list)        # {"path","sop","ref_series","for"}
    rtplans: list[dict] = field(default_factory=list)          # {"path","sop","ref_rs","label"}


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
    registration: dict | None = None
    plans: dict | None = None
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
    _decision_started: float | None = None

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
                "plans": self.plans, "end_to_end": e2e}


class Orchestrator:
    def __init__(self, cfg: ServicesConfig, budgets: Budgets, *, context=None):
        self.cfg = cfg
        self.budgets = budgets
        self.ctx = context or zmq.Context.instance()
        oc = cfg.orchestrator
        self.broker = WorkerBroker(oc.worker_endpoint, heartbeat_interval_s=oc.heartbeat_interval_s,
                                   liveness=oc.heartbeat_liveness,
                                   max_attempts=oc.max_task_attempts, context=self.ctx)
        self.gw_sock = self.ctx.socket(zmq.PULL)
        self.gw_sock.setsockopt(zmq.LINGER, 0)
        self.gw_sock.bind(oc.gateway_events_endpoint)
        self.console = self.ctx.socket(zmq.ROUTER)
        self.console.setsockopt(zmq.LINGER, 0)
        self.console.bind(oc.console_endpoint)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 500)
        self.pub.bind(oc.console_events_endpoint)
        self.sessions: dict[str, Session] = {}
        self.patients: dict[str, PatientData] = {}
        self.used_cbcts: set[str] = set()
        self._handoff_results: queue.Queue = queue.Queue()
        self.protocols = ProtocolTable.load()
        self.log = get_logger("services.orchestrator")

    # -- loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event, max_runtime_s: float | None = None) -> None:
        poller = zmq.Poller()
        for s in (self.broker.sock, self.gw_sock, self.console):
            poller.register(s, zmq.POLLIN)
        end = time.monotonic() + max_runtime_s if max_runtime_s else None
        self.log.info("orchestrator_started", workers=self.cfg.orchestrator.worker_endpoint,
                      console=self.cfg.orchestrator.console_endpoint)
        try:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                ready = dict(poller.poll(20))
                self.step(ready)
        finally:
            self.close()

    def step(self, ready: dict | None = None) -> None:
        ready = ready or {}
        if self.broker.sock in ready:
            for o in self.broker.handle_incoming():
                self._safe(self._on_task_outcome, o)
        for o in self.broker.tick():
            self._safe(self._on_task_outcome, o)
        if self.gw_sock in ready:
            for _ in range(1000):
                try:
                    frames = self.gw_sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    h, _ = decode(frames)
                except ProtocolError as e:
                    self.log.warning("bad_gateway_message", error=str(e))
                    continue
                self._safe(self._on_gateway_event, h.get("event", ""), h.get("data", {}))
        if self.console in ready:
            for _ in range(100):
                try:
                    frames = self.console.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_console(frames)
        while True:
            try:
                sid, ok, info = self._handoff_results.get_nowait()
            except queue.Empty:
                break
            self._safe(self._on_handoff_done, sid, ok, info)
        self._check_deadlines()

    def close(self):
        self.broker.close()
        for s in (self.gw_sock, self.console, self.pub):
            s.close()

    def _safe(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # never crash the service; make it visible
            self.log.error("handler_error", handler=fn.__name__, error=repr(e), exc_info=True)

    # -- events to the console --------------------------------------------------------
    def publish(self, s: Session | None, event: str, **details) -> None:
        body = {"event": event, "t": time.time(), "details": details}
        if s is not None:
            body.update(session_id=s.session_id, room=s.room, patient_id=s.patient_id,
                        state=s.state)
        topic = f"session.{s.room}" if s is not None else "service"
        self.pub.send_multipart([topic.encode(), *encode("event", body)])
        self.log.info("console_event", console_event=event,
                      session_id=s.session_id if s else None, **{
                          k: v for k, v in details.items() if k not in ("metrics", "plans")})

    def _transition(self, s: Session, new: str, note: str = "") -> None:
        S.check_transition(s.state, new)
        now = time.time()
        if s._decision_started is not None and s.state in (S.AWAITING, S.FALLBACK):
            s.decision_wait_s += now - s._decision_started
            s._decision_started = None
        old, s.state = s.state, new
        s.history.append({"t": now, "from": old, "to": new, "note": note})
        if new in (S.AWAITING, S.FALLBACK):
            s._decision_started = now
        self.publish(s, "state", previous=old, note=note)

    def _stage_start(self, s: Session, stage: str) -> None:
        s.stages[stage] = {"start": time.time()}

    def _stage_end(self, s: Session, stage: str, **info) -> None:
        st = s.stages.setdefault(stage, {"start": time.time()})
        st["end"] = time.time()
        st["duration_s"] = round(st["end"] - st["start"], 3)
        st.update(info)

    # -- gateway events -------------------------------------------------------------
    def _on_gateway_event(self, event: str, d: dict) -> None:
        pid = d.get("patient_id", "")
        if event == "series_complete":
            pd = self.patients.setdefault(pid, PatientData(pid))
            d = dict(d, completed_at=d.get("t", time.time()))
            pd.series[d["series_uid"]] = d
            if d.get("modality") == "RTSTRUCT":
                self._index_rt(pd, d, "RTSTRUCT")
            elif d.get("modality") == "RTPLAN":
                self._index_rt(pd, d, "RTPLAN")
            for s in self._active_for_patient(pid):
                self.publish(s, "series_received", series_uid=d["series_uid"],
                             modality=d.get("modality"), count=d.get("count"),
                             description=d.get("series_description"),
                             rejected=d.get("rejected", 0), completions=d.get("completions"))
                self._maybe_start(s)
        elif event in ("instance_rejected", "association_aborted", "store_failed",
                       "series_incomplete"):
            pids = {pid} if pid else {x.get("patient_id") for x in d.get("series", [])}
            targets = [s for p in pids for s in self._active_for_patient(p)]
            for s in targets:
                self.publish(s, event, **d)
            if not targets:
                self.publish(None, event, **d)

    def _index_rt(self, pd: PatientData, d: dict, kind: str) -> None:
        folder = Path(d["path"])
        for p in sorted(folder.glob("*.dcm")):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            if kind == "RTSTRUCT":
                ref_series, for_uid = "", ""
                for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
                    for_uid = for_uid or str(fr.get("FrameOfReferenceUID", ""))
                    for st in fr.get("RTReferencedStudySequence", []):
                        for se in st.get("RTReferencedSeriesSequence", []):
                            ref_series = ref_series or str(se.SeriesInstanceUID)
                pd.rtstructs = [r for r in pd.rtstructs if r["sop"] != ds.SOPInstanceUID]
                pd.rtstructs.append({"path": str(p), "sop": str(ds.SOPInstanceUID),
                                     "ref_series": ref_series, "for": for_uid,
                                     "t": d["completed_at"]})
            else:
                ref_rs = ""
                for r in ds.get("ReferencedStructureSetSequence", []):
                    ref_rs = str(r.ReferencedSOPInstanceUID)
                pd.rtplans = [r for r in pd.rtplans if r["sop"] != ds.SOPInstanceUID]
                pd.rtplans.append({"path": str(p), "sop": str(ds.SOPInstanceUID),
                                   "ref_rs": ref_rs, "label": str(ds.get("RTPlanLabel", "")),
                                   "for": str(ds.get("FrameOfReferenceUID", "")),
                                   "t": d["completed_at"]})

    def _active_for_patient(self, pid: str) -> list[Session]:
        return [s for s in self.sessions.values()
                if s.patient_id == pid and s.state not in S.TERMINAL]

    def resolve_planning(self, pid: str) -> dict:
        """The patient's planning data: latest RT Plan, the structure set it references
        and the CT series that structure set references. Missing pieces listed."""
        pd = self.patients.get(pid)
        out = {"missing": []}
        if pd is None:
            out["missing"] = ["RTPLAN", "RTSTRUCT", "planning CT"]
            return out
        plan = max(pd.rtplans, key=lambda r: r["t"]) if pd.rtplans else None
        rs = None
        if plan is not None and plan["ref_rs"]:
            rs = next((r for r in pd.rtstructs if r["sop"] == plan["ref_rs"]), None)
            if rs is None:
                out["missing"].append(f"RTSTRUCT {plan['ref_rs']} (referenced by the plan)")
        elif pd.rtstructs:
            rs = max(pd.rtstructs, key=lambda r: r["t"])
        if plan is None:
            out["missing"].append("RTPLAN")
        if rs is None and not any(m.startswith("RTSTRUCT") for m in out["missing"]):
            out["missing"].append("RTSTRUCT")
        ct = None
        if rs is not None:
            ct = pd.series.get(rs["ref_series"])
            if ct is None:
                out["missing"].append(f"planning CT series {rs['ref_series']}")
        if plan:
            out["rtplan"] = plan
        if rs:
            out["rtstruct"] = rs
        if ct:
            out["ct"] = ct
        return out

    def _is_cbct(self, series: dict, planning_ct: dict | None) -> bool:
        # the rule the archive replay uses too (adaptive.dicom.daily_image)
        return is_daily_image(series.get("modality", ""), series["series_uid"],
                              series.get("series_description", ""),
                              series.get("image_type", []),
                              series.get("frame_of_reference_uid", ""),
                              planning_ct["series_uid"] if planning_ct else None,
                              planning_ct.get("frame_of_reference_uid") if planning_ct else None,
                              self.cfg.orchestrator.cbct_markers)

    def _maybe_start(self, s: Session) -> None:
        if s.state != S.WAITING:
            return
        pd = self.patients.get(s.patient_id)
        if pd is None:
            return
        plan = self.resolve_planning(s.patient_id)
        ct = plan.get("ct")
        earliest = s.created - self.cfg.orchestrator.accept_cbct_before_start_s
        cands = [x for x in pd.series.values()
                 if x["series_uid"] not in self.used_cbcts and self._is_cbct(x, ct)
                 and x["completed_at"] >= earliest]
        if not cands:
            return
        cbct = max(cands, key=lambda x: x["completed_at"])
        if plan["missing"]:
            note = f"CBCT received but planning data missing: {', '.join(plan['missing'])}"
            if note not in s.notes:
                s.notes.append(note)
                self.publish(s, "waiting_for_planning_data", missing=plan["missing"])
            return
        if s.protocol is None:
            try:
                s.protocol = protocol_from_plan(plan["rtplan"]["path"], self.protocols)
            except ClinicalProtocolError as e:  # the CBCT stays free for a session with one
                s.error = str(e)
                self._transition(s, S.FAILED, s.error)
                self.publish(s, "protocol_missing", error=str(e))
                return
            self.publish(s, "protocol", **s.protocol)
        self.used_cbcts.add(cbct["series_uid"])
        s.cbct = cbct
        s.cbct_complete_at = cbct["completed_at"]
        s.planning = {"rtplan": plan["rtplan"]["path"], "rtplan_uid": plan["rtplan"]["sop"],
                      "rtstruct": plan["rtstruct"]["path"],
                      "rtstruct_uid": plan["rtstruct"]["sop"],
                      "ct_dir": plan["ct"]["path"], "ct_series_uid": plan["ct"]["series_uid"]}
        s.stages["end_to_end"] = {"start": s.cbct_complete_at,
                                  "budget_s": self.budgets.end_to_end_s}
        self._dispatch_registration(s)

    # -- stages -----------------------------------------------------------------------
    def _session_dir(self, s: Session, stage: str) -> str:
        d = self.cfg.paths.sessions / s.session_id / stage
        d.mkdir(parents=True, exist_ok=True)
        return str(d.resolve())

    def _dispatch(self, s: Session, stage: str, payload: dict) -> None:
        b = getattr(self.budgets, stage)
        t = self.broker.submit(stage, payload, deadline_s=b.budget_s,
                               meta={"session_id": s.session_id, "stage": stage})
        s.task_id = t.task_id
        s.stage_deadline = time.monotonic() + b.budget_s + b.grace_s
        self._stage_start(s, stage)
        s.stages[stage].update(budget_s=b.budget_s, task_id=t.task_id)
        if not self.broker.services().get(stage):
            self.publish(s, "no_worker", stage=stage,
                         message=f"no {stage} worker connected; task queued")

    def _dispatch_registration(self, s: Session) -> None:
        self._transition(s, S.REGISTERING, f"CBCT series {s.cbct['series_uid']}")
        self._dispatch(s, "registration", {
            "session_id": s.session_id, "patient_id": s.patient_id,
            "planning_ct_dir": s.planning["ct_dir"], "rtstruct_path": s.planning["rtstruct"],
            "rtplan_path": s.planning["rtplan"], "cbct_dir": s.cbct["path"],
            "spatial_registration": self._spatial_registration_for(s),
            "out_dir": self._session_dir(s, "registration")})

    def _dispatch_planning(self, s: Session) -> None:
        self._transition(s, S.PLANNING, "registration done")
        self._dispatch(s, "planning", {
            "session_id": s.session_id, "patient_id": s.patient_id,
            "planning_ct_dir": s.planning["ct_dir"], "rtstruct_path": s.planning["rtstruct"],
            "rtplan_path": s.planning["rtplan"], "cbct_dir": s.cbct["path"],
            "registration": s.registration, "protocol": s.protocol,
            "out_dir": self._session_dir(s, "planning")})

    def _session_of(self, o: TaskOutcome) -> Session | None:
        if o.task is None:
            return None
        s = self.sessions.get(o.task.meta.get("session_id", ""))
        if s is None or s.task_id != o.task.task_id:
            return None
        return s

    def _on_task_outcome(self, o: TaskOutcome) -> None:
        if o.kind == "worker_lost":
            for s in self.sessions.values():
                if s.task_id and s.task_id == o.info.get("task_id"):
                    self.publish(s, "worker_lost", **o.info)
            return
        s = self._session_of(o)
        if s is None:
            return
        stage = o.task.meta["stage"]
        if o.kind == "progress":
            self.publish(s, "progress", stage=stage, **o.info)
            return
        if o.kind == "reissued":
            self.publish(s, "task_reissued", stage=stage, **o.info)
            return
        s.task_id = None
        s.stage_deadline = None
        if o.kind == "failed":
            self._stage_end(s, stage, ok=False, error=o.error, worker_timings=o.timings)
            if stage == "registration":
                self._no_valid_registration(s, [{
                    "name": "registration_failed", "level": "rigid",
                    "message": f"{o.error_type}: {o.error}", "values": {}}])
                return
            self._to_fallback(s, f"{stage} failed: {o.error_type}: {o.error}")
            return
        self._stage_end(s, stage, ok=True, worker_timings=o.timings)
        b = getattr(self.budgets, stage)
        fb = o.result.get("fallback")
        if fb or s.stages[stage]["duration_s"] > b.budget_s:
            ex = {"stage": stage, "budget_s": b.budget_s,
                  "elapsed_s": s.stages[stage]["duration_s"],
                  "action": fb or "result arrived within the grace period; used"}
            s.budgets_exceeded.append(ex)
            self.publish(s, "budget_exceeded", **ex)
        if stage == "registration":
            s.registration = o.result
            self._on_registration(s, o.result)
        else:
            self._on_plans(s, o.result)

    def _on_plans(self, s: Session, r: dict) -> None:
        s.plans = r
        s.metrics = r.get("metrics", {})
        adapted = r.get("adapted") or {}
        if adapted.get("checks_passed") and adapted.get("rtplan"):
            s.offered = ["scheduled", "adapted"]
            self._transition(s, S.AWAITING, "adapted plan passed its checks")
        else:
            failed = [c for c in adapted.get("checks", []) if not c.get("passed", False)
                      and c.get("blocking", True)]
            self._publish_failed_checks(s, "planning", failed)
            if adapted.get("blocked_by") == "registration":
                why = adapted.get("reason", "the deformable registration failed its checks")
            else:
                why = ("adapted plan failed its checks: " + "; ".join(
                    c.get("name", "?") + ": " + c.get("message", "") for c in failed)
                    if adapted else "no adapted plan")
            self._to_fallback(s, why)
            return
        self.publish(s, "plans_ready", offered=s.offered, metrics=s.metrics,
                     reviews=[c["name"] for c in s.reviews])

    # -- the registration safety gate (adaptive.pipeline.safety) ------------------------
    def _on_registration(self, s: Session, r: dict) -> None:
        """Act on the registration's verdict: failed checks and reviews are console events;
        no valid registration ends in the scheduled plan without metrics; otherwise the
        planning stage runs (an adapted plan only when the deformable result passed)."""
        checks = r.get("registration_checks") or []
        self._publish_failed_checks(s, "registration", [
            c for c in checks if c.get("blocking", True) and not c.get("passed", False)])
        for c in checks:
            if c.get("review"):
                s.reviews.append({"name": c["name"], "message": c["message"],
                                  "values": c.get("values", {})})
                self.publish(s, "review_required", check=c["name"], message=c["message"],
                             values=c.get("values", {}))
        validity = r.get("validity", "deformable")
        if validity == "none":
            self._no_valid_registration(s, [])
            return
        if validity == "rigid":
            s.notes.append("deformable registration failed its checks; the scheduled plan's "
                           "metrics rest on the rigid match: " + r.get("registration_summary", ""))
        self._dispatch_planning(s)

    def _publish_failed_checks(self, s: Session, stage: str, failed: list[dict]) -> None:
        for c in failed:
            item = {"check": c.get("name", "?"), "stage": stage, "level": c.get("level"),
                    "message": c.get("message", ""), "values": c.get("values", {})}
            s.checks_failed.append(item)
            self.publish(s, "check_failed", **item)

    def _no_valid_registration(self, s: Session, failed: list[dict]) -> None:
        """The scheduled plan as delivered with the linac's own image guidance; no metrics
        (none may be computed on an invalid registration)."""
        self._publish_failed_checks(s, "registration", failed)
        names = [c["check"] for c in s.checks_failed if c["stage"] == "registration"]
        s.metrics = {}
        s.reviews = []
        self._to_fallback(s, "no valid registration (" + ", ".join(names) + "): the scheduled "
                          "plan is offered as delivered with the linac's own image guidance; "
                          "no metrics are shown")

    def _spatial_registration_for(self, s: Session) -> str | None:
        """A rigid Spatial Registration received for this patient that relates the CBCT's
        Frame of Reference to the planning CT's (the imaging system's match), if any."""
        pd = self.patients.get(s.patient_id)
        if pd is None or s.cbct is None:
            return None
        frames = {s.cbct.get("frame_of_reference_uid"),
                  (pd.series.get(s.planning.get("ct_series_uid", "")) or {}).get(
                      "frame_of_reference_uid")}
        for x in sorted(pd.series.values(), key=lambda x: -x.get("completed_at", 0)):
            if x.get("modality") != "REG":
                continue
            for f in sorted(Path(x["path"]).glob("*.dcm")):
                try:
                    ds = pydicom.dcmread(f, stop_before_pixels=True)
                except Exception as e:  # noqa: BLE001 - a bad file is skipped, and logged
                    self.log.warning("spatial_registration_unreadable", path=str(f),
                                     error=repr(e))
                    continue
                if str(ds.get("SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.66.1":
                    continue
                related = {str(ds.get("FrameOfReferenceUID", ""))} | {
                    str(it.get("FrameOfReferenceUID", "")) for it in
                    ds.get("RegistrationSequence", [])}
                if None not in frames and frames <= related:
                    return str(f)
        return None

    def review_images(self, s: Session) -> dict:
        """The session's review PNGs (base64) from its registration stage."""
        reg = s.registration or {}
        root = (self.cfg.paths.sessions / s.session_id).resolve()
        images = []
        for p in reg.get("review_images") or []:
            path = Path(p).resolve()
            if root not in path.parents or not path.is_file():
                raise ServiceError(f"review image {p} is not in session {s.session_id}")
            images.append({"name": path.name,
                           "png_base64": base64.b64encode(path.read_bytes()).decode()})
        if not images:
            raise ServiceError(f"session {s.session_id} has no review images yet "
                               f"(state {s.state})")
        return {"images": images, "validity": reg.get("validity"),
                "summary": reg.get("registration_summary", "")}

    def _to_fallback(self, s: Session, why: str) -> None:
        s.offered = ["scheduled"]
        s.notes.append(why)
        self._transition(s, S.FALLBACK, why)
        self.publish(s, "fallback", reason=why, offered=s.offered)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for s in self.sessions.values():
            if s.stage_deadline is not None and now > s.stage_deadline and \
                    s.state in (S.REGISTERING, S.PLANNING):
                stage = "registration" if s.state == S.REGISTERING else "planning"
                b = getattr(self.budgets, stage)
                if s.task_id:
                    self.broker.cancel(s.task_id)
                s.task_id, s.stage_deadline = None, None
                self._stage_end(s, stage, ok=False, error="budget exceeded, no result")
                ex = {"stage": stage, "budget_s": b.budget_s,
                      "elapsed_s": s.stages[stage]["duration_s"],
                      "action": "no result by budget + grace: scheduled plan only"}
                s.budgets_exceeded.append(ex)
                self.publish(s, "budget_exceeded", **ex)
                self._to_fallback(s, f"{stage} exceeded its {b.budget_s:g} s budget")

    # -- decision and hand-off ---------------------------------------------------------
    def _handoff_files(self, s: Session, plan: str) -> list[str]:
        if plan == "adapted":
            # the image the dose was computed on first, then what references it
            a = s.plans["adapted"]
            keys = ("rtstruct", "registration", "rtplan", "rtdose")
            image = image_series_files(a["synthetic_ct_dir"]) if a.get("synthetic_ct_dir") else []
            return image + [a[k] for k in keys if a.get(k)]
        sched = (s.plans or {}).get("scheduled") or {}
        files = [sched.get("rtplan") or s.planning["rtplan"]]
        files += [sched[k] for k in ("rtdose",) if sched.get(k)]
        return files

    def choose(self, s: Session, plan: str, acknowledge=None) -> None:
        if plan not in ("scheduled", "adapted"):
            raise ServiceError(f"unknown plan choice {plan!r} (scheduled | adapted)")
        if s.state not in (S.AWAITING, S.FALLBACK):
            raise IllegalTransitionError(f"session {s.session_id} is {s.state}; a plan can be "
                                         f"chosen only when awaiting a decision")
        if plan not in s.offered:
            raise ServiceError(f"plan {plan!r} is not offered (offered: {s.offered}); a plan "
                               f"that failed its checks is never handed off")
        pending = sorted({r["name"] for r in s.reviews} - set(acknowledge or ()))
        if plan == "adapted" and pending:
            raise ServiceError(f"the adapted plan needs the review of {', '.join(pending)} "
                               f"first: " + "; ".join(r["message"] for r in s.reviews
                                                     if r["name"] in pending)
                               + " (choose again with acknowledge=[...])")
        files = self._handoff_files(s, plan)
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ServiceError(f"plan objects missing on disk: {missing}")
        s.chosen = plan
        self._transition(s, S.HANDING_OFF, f"{plan} plan chosen")
        self._stage_start(s, "handoff")

        def work():
            try:
                reports, batch = send_files(files, self.cfg.tms, outbox=self.cfg.paths.outbox,
                                            session_id=s.session_id)
                self._handoff_results.put((s.session_id, True, {
                    "outbox": str(batch), "instances": [r.__dict__ for r in reports]}))
            except HandOffError as e:
                self._handoff_results.put((s.session_id, False, {
                    "error": str(e), "outbox": str(e.outbox), "instances": e.report}))
            except Exception as e:
                self._handoff_results.put((s.session_id, False, {"error": repr(e)}))

        threading.Thread(target=work, name=f"handoff-{s.session_id}", daemon=True).start()

    def _on_handoff_done(self, sid: str, ok: bool, info: dict) -> None:
        s = self.sessions[sid]
        tms = self.cfg.tms
        info = dict(info, tms=f"{tms.ae_title}@{tms.host}:{tms.port}", plan=s.chosen)
        s.handoff = info
        self._stage_end(s, "handoff", ok=ok)
        if not ok:
            s.error = f"hand-off failed: {info.get('error')}"
            self._transition(s, S.FAILED, s.error)
            self.publish(s, "handoff_failed", **info)
            return
        e2e = s.stages.get("end_to_end", {})
        if e2e:
            e2e["end"] = time.time()
            total = e2e["end"] - e2e["start"]
            e2e["decision_wait_s"] = round(s.decision_wait_s, 3)
            e2e["duration_s"] = round(total - (s.decision_wait_s if
                                                self.budgets.exclude_decision_time else 0), 3)
            e2e["within_budget"] = e2e["duration_s"] <= self.budgets.end_to_end_s
            if not e2e["within_budget"]:
                ex = {"stage": "end_to_end", "budget_s": self.budgets.end_to_end_s,
                      "elapsed_s": e2e["duration_s"], "action": "reported"}
                s.budgets_exceeded.append(ex)
                self.publish(s, "budget_exceeded", **ex)
        self._transition(s, S.HANDED_OFF, f"{s.chosen} plan stored at {info['tms']}")
        self.publish(s, "handed_off", **info)

    # -- console API ---------------------------------------------------------------------
    def _on_console(self, frames) -> None:
        try:
            ident, rest = split_routed(frames)
            req_delim = len(frames) > 2 and frames[1] == b""
            h, _ = decode(rest)
        except ProtocolError as e:
            self.log.warning("bad_console_message", error=str(e))
            return
        try:
            result = self.handle_command(h)
            reply = {"ok": True, "protocol": CONSOLE_PROTOCOL, **result}
        except AdaptiveError as e:
            reply = {"ok": False, "protocol": CONSOLE_PROTOCOL, "error": str(e),
                     "error_type": type(e).__name__}
        except Exception as e:
            self.log.error("console_command_error", error=repr(e), exc_info=True)
            reply = {"ok": False, "protocol": CONSOLE_PROTOCOL, "error": repr(e),
                     "error_type": "InternalError"}
        reply["request_id"] = h.get("request_id")
        out = [ident] + ([b""] if req_delim else []) + encode("reply", reply)
        self.console.send_multipart(out)

    def _find(self, h: dict) -> Session:
        if h.get("session_id"):
            s = self.sessions.get(h["session_id"])
            if s is None:
                raise ServiceError(f"no session {h['session_id']!r}")
            return s
        if h.get("room"):
            cands = [s for s in self.sessions.values() if s.room == h["room"]]
            if not cands:
                raise ServiceError(f"no session in room {h['room']!r}")
            return max(cands, key=lambda s: s.created)
        raise ServiceError("request needs session_id or room")

    def handle_command(self, h: dict) -> dict:
        cmd = h.get("cmd")
        if cmd == "ping":
            return {"workers": self.broker.services(), "sessions": len(self.sessions)}
        if cmd == "start":
            # both become parts of paths and topics (session_id): validated first
            room = require(validate_room, h.get("room"), "room")
            pid = require(validate_patient_id, h.get("patient_id"), "patient_id").strip(" ")
            proto = protocol_at_start(h.get("protocol"))
            for s in self.sessions.values():
                if s.state in S.TERMINAL:
                    continue
                if s.room == room and s.patient_id == pid:
                    if proto and s.protocol and proto["name"] != s.protocol["name"]:
                        raise ServiceError(f"session {s.session_id} is planned with protocol "
                                           f"{s.protocol['name']!r}, not {proto['name']!r}")
                    return {"session": s.public(), "attached": True}
                if s.room == room:
                    raise ServiceError(f"room {room!r} has an active session {s.session_id} "
                                       f"for another patient; cancel it first")
                if s.patient_id == pid:
                    raise ServiceError(f"patient {pid!r} has an active session in room "
                                       f"{s.room!r}")
            planning = self.resolve_planning(pid)
            if proto is None and "rtplan" in planning:  # known now: refuse at once if unmapped
                proto = protocol_from_plan(planning["rtplan"]["path"], self.protocols)
            s = Session(session_id=f"{room}-{time.strftime('%Y%m%dT%H%M%S')}-"
                                   f"{uuid.uuid4().hex[:6]}", room=room, patient_id=pid,
                        protocol=proto)
            s.history.append({"t": s.created, "from": None, "to": S.WAITING,
                              "note": "session started"})
            self.sessions[s.session_id] = s
            self.publish(s, "session_started", protocol=s.protocol)
            self._maybe_start(s)
            return {"session": s.public(), "attached": False}
        if cmd in ("status", "attach"):
            if not h.get("session_id") and not h.get("room"):
                return {"sessions": [s.public() for s in self.sessions.values()]}
            return {"session": self._find(h).public()}
        if cmd == "choose":
            s = self._find(h)
            ack = h.get("acknowledge") or []
            if not isinstance(ack, list) or not all(isinstance(a, str) for a in ack):
                raise ServiceError("acknowledge must be a list of check names")
            self.choose(s, str(h.get("plan", "")), ack)
            return {"session": s.public()}
        if cmd == "review":
            return self.review_images(self._find(h))
        if cmd == "cancel":
            s = self._find(h)
            if s.state in S.TERMINAL:
                raise IllegalTransitionError(f"session {s.session_id} is already {s.state}")
            if s.task_id:
                self.broker.cancel(s.task_id)
                s.task_id, s.stage_deadline = None, None
            self._transition(s, S.CANCELLED, str(h.get("reason", "cancelled at the console")))
            return {"session": s.public()}
        if cmd == "planning_data":
            return {"planning": self.resolve_planning(str(h.get("patient_id", "")))}
        raise ServiceError(f"unknown console command {cmd!r}")
