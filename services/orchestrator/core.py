"""The orchestrator process: the loop over its sockets and the session flow (daily image ->
registration -> planning -> decision -> hand-off), with budgets and fallbacks.

Its parts, each a module with one job:

* :mod:`~services.orchestrator.registry` - planning data per patient, which series is the CBCT;
* :mod:`~services.orchestrator.results` - whether a worker's result may be used;
* :mod:`~services.orchestrator.handoff` - checks and sending to the TMS, per-instance state;
* :mod:`~services.orchestrator.console_api` - console requests, roles;
* :mod:`~services.orchestrator.store` - durable state (SQLite), recovered at start-up;
* :mod:`~services.orchestrator.session` and :mod:`~services.orchestrator.state` - the session.

Sockets (endpoints in ``config/services.toml`` ``[orchestrator]``), every one a CURVE server
(:mod:`services.auth`):

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

Nothing a peer sends can end this process: every message is decoded and parsed into its
schema (:mod:`services.schemas`) first, a malformed one is logged (and answered, on the
console), and every handler runs under :meth:`Orchestrator._safe`.

After a restart (``kill -9`` included) the sessions, the planning-data registry and the
hand-off records come back from the store (:meth:`Orchestrator.recover`): a session that was
registering or planning runs its stage again (event ``stage_rerun``), an interrupted
hand-off resumes with the same instances (``handoff_resumed``); the registry is completed
from the gateway's store.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import zmq

from adaptive.errors import (
    AdaptiveError,
    ClinicalProtocolError,
    HandOffError,
    IllegalTransitionError,
    ResultRefusedError,
    ServiceError,
)
from adaptive.log import get_logger
from adaptive.optimization.protocols import ProtocolTable
from adaptive.pipeline.records import sha256_file
from services import schemas as M
from services.auth import Authenticator, KeyStore, secure_server
from services.config import Budgets, ServicesConfig
from services.messaging import TaskOutcome, WorkerBroker
from services.orchestrator import state as S
from services.orchestrator.console_api import ConsoleApi
from services.orchestrator.handoff import HandOff, outcome_of
from services.orchestrator.protocol import protocol_from_plan
from services.orchestrator.registry import PatientData, PlanningRegistry
from services.orchestrator.results import verify_result
from services.orchestrator.session import Session
from services.orchestrator.store import OrchestratorStore
from services.protocol import ProtocolError, encode

CONSOLE_PROTOCOL = M.CONSOLE_PROTOCOL
__all__ = ["CONSOLE_PROTOCOL", "Orchestrator", "PatientData", "Session"]


class Orchestrator:
    def __init__(self, cfg: ServicesConfig, budgets: Budgets, *, context=None, broker=None):
        """``broker``: a stand-in for the :class:`WorkerBroker` (unit tests drive the
        session flow with a fake one); by default the real one on ``worker_endpoint``."""
        self.cfg = cfg
        self.budgets = budgets
        self.log = get_logger("services.orchestrator")
        self.ctx = context or zmq.Context.instance()
        oc = cfg.orchestrator
        self.keys = KeyStore(cfg.paths.root)
        self.keys.ensure_defaults()
        server = self.keys.server_keys()
        self.auth = Authenticator(self.ctx, self.keys)
        self.auth.start()
        self.broker = broker or WorkerBroker(
            oc.worker_endpoint, heartbeat_interval_s=oc.heartbeat_interval_s,
            liveness=oc.heartbeat_liveness, max_attempts=oc.max_task_attempts,
            context=self.ctx, secure=lambda s: secure_server(s, server, "workers"))
        self.gw_sock = self._bind(zmq.PULL, oc.gateway_events_endpoint, server, "gateway", 0)
        self.console = self._bind(zmq.ROUTER, oc.console_endpoint, server, "console", 0)
        self.pub = self._bind(zmq.PUB, oc.console_events_endpoint, server, "console", 500)
        self.store = OrchestratorStore(cfg.paths.root / "state" / "orchestrator.sqlite3")
        self.registry = PlanningRegistry(self.store, oc.cbct_markers)
        self.handoff = HandOff(cfg.tms, cfg.paths.outbox, self.store)
        self.api = ConsoleApi(self)
        self.sessions: dict[str, Session] = {}
        self.used_cbcts: set[str] = set()
        self.bad_gateway_messages = 0
        self.gateway_events = 0
        self._bad_reported: dict[str, tuple[float, int]] = {}   # socket -> (when, count)
        self.protocols = ProtocolTable.load()
        self.recover()

    def _bind(self, kind, endpoint: str, server, domain: str, linger_ms: int):
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, linger_ms)
        secure_server(sock, server, domain)
        sock.bind(endpoint)
        return sock

    @property
    def patients(self) -> dict[str, PatientData]:
        return self.registry.patients

    # -- start-up -------------------------------------------------------------------------
    def recover(self) -> None:
        """Sessions, registry and hand-off records from the store (see the module doc)."""
        n = self.registry.load()
        n += self.registry.rebuild_from(self.cfg.paths.store)
        self.used_cbcts = self.store.used_cbcts()
        for rec in self.store.sessions():
            s = Session.from_record(rec)
            self.sessions[s.session_id] = s
        active = [s for s in self.sessions.values() if not s.terminal]
        self.log.info("orchestrator_recovered", sessions=len(self.sessions), active=len(active),
                      series=n)
        self.publish(None, "orchestrator_started", sessions=len(self.sessions),
                     active=len(active), series=n)
        for s in active:
            self._safe(self._resume, s)

    def _resume(self, s: Session) -> None:
        why = "orchestrator restarted"
        s.task_id = None
        if s.state in (S.REGISTERING, S.PLANNING):
            stage = "registration" if s.state == S.REGISTERING else "planning"
            s.notes.append(f"{stage} interrupted ({why}): run again")
            self.publish(s, "stage_rerun", stage=stage, reason=why)
            if stage == "registration":
                self._dispatch_registration(s, transition=False)
            else:
                self._dispatch_planning(s, transition=False)
        elif s.state == S.HANDING_OFF:
            items = [(i["sop_instance_uid"], i["path"], i["sha256"])
                     for i in self.store.handoff_instances(s.session_id)]
            if not items:
                self._fail(s, "hand-off interrupted by a restart before it was recorded")
                return
            s.notes.append(f"hand-off interrupted ({why}): resumed with the same instances")
            self.publish(s, "handoff_resumed", reason=why, instances=len(items))
            self.handoff.start(s, items, batch=(s.handoff or {}).get("outbox"))
        elif s.state == S.WAITING:
            self._maybe_start(s)

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
            self._report_bad("workers", getattr(self.broker, "bad_messages", 0))
        for o in self.broker.tick():
            self._safe(self._on_task_outcome, o)
        if self.gw_sock in ready:
            for _ in range(1000):
                try:
                    frames = self.gw_sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._safe(self._on_gateway_frames, frames)
            self._report_bad("gateway", self.bad_gateway_messages)
        if self.console in ready:
            for _ in range(100):
                try:
                    frames = self.console.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._safe(self.api.on_frames, frames)
        while True:
            try:
                sid, ok, info = self.handoff.results.get_nowait()
            except queue.Empty:
                break
            self._safe(self._on_handoff_done, sid, ok, info)
        self._safe(self._check_deadlines)

    def _report_bad(self, sock: str, count: int, period_s: float = 10.0) -> None:
        """A ``message_refused`` service event when malformed messages arrived on ``sock``
        (each is logged; the event says how many, at most once per ``period_s``, so a
        stranger looping garbage cannot flood the consoles)."""
        last_t, last_n = self._bad_reported.get(sock, (0.0, 0))
        now = time.monotonic()
        if count > last_n and now - last_t >= period_s:
            self._bad_reported[sock] = (now, count)
            self.publish(None, "message_refused", socket=sock, count=count - last_n,
                         total=count, action="dropped (malformed or not of its schema); "
                                             "see the orchestrator log")

    def close(self):
        self.broker.close()
        for s in (self.gw_sock, self.console, self.pub):
            s.close()
        self.auth.stop()
        self.store.close()

    def _safe(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:
            self.log.exception("handler_error", handler=getattr(fn, "__name__", str(fn)),
                               error=repr(e))

    # -- events to the console --------------------------------------------------------
    def publish(self, s: Session | None, event: str, **details) -> None:
        """Persist ``s`` (so no event ever describes a state the store does not have),
        then publish ``event`` on ``session.<room>`` (or ``service``)."""
        ev = M.ConsoleEvent(event=event, t=time.time(), details=details)
        if s is not None:
            self.store.save_session(s)
            ev = ev.model_copy(update={"session_id": s.session_id, "room": s.room,
                                       "patient_id": s.patient_id, "state": s.state})
        topic = f"session.{s.room}" if s is not None else "service"
        body = ev.model_dump(exclude={"v", "type"}, exclude_none=True)
        self.pub.send_multipart([topic.encode(), *encode("event", body)])
        self.log.info("console_event", console_event=event,
                      session_id=s.session_id if s else None, **{
                          k: v for k, v in details.items() if k not in ("metrics", "plans")})

    def _transition(self, s: Session, new: str, note: str = "") -> None:
        S.check_transition(s.state, new)
        now = time.time()
        if s.decision_started is not None and s.state in (S.AWAITING, S.FALLBACK):
            s.decision_wait_s += now - s.decision_started
            s.decision_started = None
        old, s.state = s.state, new
        s.history.append({"t": now, "from": old, "to": new, "note": note})
        if new in (S.AWAITING, S.FALLBACK):
            s.decision_started = now
        self.publish(s, "state", previous=old, note=note)

    def _fail(self, s: Session, why: str) -> None:
        s.error = why
        self._transition(s, S.FAILED, why)

    def _stage_start(self, s: Session, stage: str) -> None:
        s.stages[stage] = {"start": time.time()}

    def _stage_end(self, s: Session, stage: str, **info) -> None:
        st = s.stages.setdefault(stage, {"start": time.time()})
        st["end"] = time.time()
        st["duration_s"] = round(st["end"] - st["start"], 3)
        st.update(info)

    # -- gateway events -------------------------------------------------------------
    def _on_gateway_frames(self, frames) -> None:
        try:
            m, _ = M.decode_message(frames, M.GATEWAY_TO_ORCHESTRATOR)
        except ProtocolError as e:
            self.bad_gateway_messages += 1
            self.log.warning("bad_gateway_message", error=str(e)[:500])
            return
        self.gateway_events += 1
        self._on_gateway_event(m.event, dict(m.data))

    def _on_gateway_event(self, event: str, d: dict) -> None:
        if event == "series_complete":
            try:
                body = M.parse_body(M.SeriesComplete, d, "series_complete")
            except ProtocolError as e:
                self.bad_gateway_messages += 1
                self.log.warning("bad_gateway_event", error=str(e)[:500])
                return
            d = dict(body.model_dump(), completed_at=body.t or time.time())
            pid = d["patient_id"]
            self.registry.add_series(d)
            for s in self._active_for_patient(pid):
                self.publish(s, "series_received", series_uid=d["series_uid"],
                             modality=d.get("modality"), count=d.get("count"),
                             description=d.get("series_description"),
                             rejected=d.get("rejected", 0), completions=d.get("completions"))
                self._maybe_start(s)
        elif event in ("instance_rejected", "association_aborted", "store_failed",
                       "series_incomplete"):
            pid = d.get("patient_id", "")
            pids = {pid} if isinstance(pid, str) and pid else {
                x.get("patient_id") for x in d.get("series", []) if isinstance(x, dict)} \
                if isinstance(d.get("series"), list) else set()
            targets = [s for p in pids if isinstance(p, str)
                       for s in self._active_for_patient(p)]
            for s in targets:
                self.publish(s, event, **d)
            if not targets:
                self.publish(None, event, **d)

    def _active_for_patient(self, pid: str) -> list[Session]:
        return [s for s in self.sessions.values()
                if s.patient_id == pid and s.state not in S.TERMINAL]

    def resolve_planning(self, pid: str) -> dict:
        return self.registry.resolve_planning(pid)

    def _maybe_start(self, s: Session) -> None:
        if s.state != S.WAITING:
            return
        plan = self.resolve_planning(s.patient_id)
        earliest = s.created - self.cfg.orchestrator.accept_cbct_before_start_s
        cands = self.registry.cbct_candidates(s.patient_id, plan.get("ct"), self.used_cbcts,
                                              earliest)
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
                s.protocol = protocol_from_plan(plan["rtplan"], self.protocols)
            except ClinicalProtocolError as e:  # the CBCT stays free for a session with one
                s.error = str(e)
                self._transition(s, S.FAILED, s.error)
                self.publish(s, "protocol_missing", error=str(e))
                return
            self.publish(s, "protocol", **s.protocol)
        self.used_cbcts.add(cbct["series_uid"])
        self.store.use_cbct(cbct["series_uid"], s.session_id)
        s.cbct = cbct
        s.cbct_complete_at = cbct["completed_at"]
        rp = plan["rtplan"]
        s.planning = {"rtplan": rp["path"], "rtplan_uid": rp["sop"],
                      "rtplan_sha256": sha256_file(rp["path"]), "rtplan_study": rp.get("study"),
                      "rtstruct": plan["rtstruct"]["path"],
                      "rtstruct_uid": plan["rtstruct"]["sop"],
                      "ct_dir": plan["ct"]["path"], "ct_series_uid": plan["ct"]["series_uid"]}
        s.stages["end_to_end"] = {"start": s.cbct_complete_at,
                                  "budget_s": self.budgets.end_to_end_s}
        self._dispatch_registration(s)

    # -- stages -----------------------------------------------------------------------
    def session_dir(self, s: Session, stage: str | None = None) -> Path:
        d = self.cfg.paths.sessions / s.session_id
        return d / stage if stage else d

    def _stage_dir(self, s: Session, stage: str) -> str:
        d = self.session_dir(s, stage)
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
        self.store.save_session(s)
        if not self.broker.services().get(stage):
            self.publish(s, "no_worker", stage=stage,
                         message=f"no {stage} worker connected; task queued")

    def _dispatch_registration(self, s: Session, transition: bool = True) -> None:
        if transition:
            self._transition(s, S.REGISTERING, f"CBCT series {s.cbct['series_uid']}")
        self._dispatch(s, "registration", {
            "session_id": s.session_id, "patient_id": s.patient_id,
            "planning_ct_dir": s.planning["ct_dir"], "rtstruct_path": s.planning["rtstruct"],
            "rtplan_path": s.planning["rtplan"], "cbct_dir": s.cbct["path"],
            "spatial_registration": self._spatial_registration_for(s),
            "out_dir": self._stage_dir(s, "registration")})

    def _dispatch_planning(self, s: Session, transition: bool = True) -> None:
        if transition:
            self._transition(s, S.PLANNING, "registration done")
        self._dispatch(s, "planning", {
            "session_id": s.session_id, "patient_id": s.patient_id,
            "planning_ct_dir": s.planning["ct_dir"], "rtstruct_path": s.planning["rtstruct"],
            "rtplan_path": s.planning["rtplan"], "cbct_dir": s.cbct["path"],
            "registration": s.registration, "protocol": s.protocol,
            "out_dir": self._stage_dir(s, "planning")})

    def _spatial_registration_for(self, s: Session) -> str | None:
        """A rigid Spatial Registration received for this patient that relates the CBCT's
        Frame of Reference to the planning CT's (the imaging system's match), if any."""
        if s.cbct is None:
            return None
        return self.registry.spatial_registration_for(
            s.patient_id, s.cbct.get("frame_of_reference_uid"),
            self.registry.planning_ct_frame(s.patient_id, s.planning.get("ct_series_uid", "")))

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
        if o.kind == "refused":
            s = self._session_of(o)
            self.log.warning("result_refused", **{k: str(v) for k, v in o.info.items()})
            if s is not None:
                item = {"stage": o.task.meta.get("stage"), "reason": o.info.get("why", ""),
                        "worker": o.info.get("worker"), "task_id": o.info.get("task_id")}
                s.refused_results.append(item)
                self.publish(s, "result_refused", **item)
            else:
                self.publish(None, "result_refused", reason=o.info.get("why", ""),
                             worker=o.info.get("worker"))
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
            self._stage_failed(s, stage, o.error_type, o.error, o.timings)
            return
        try:
            rec = verify_result(s, stage, o.result, self.cfg.paths.sessions)
        except ResultRefusedError as e:
            item = {"stage": stage, "reason": str(e), "worker": o.timings.get("worker"),
                    "task_id": o.task.task_id}
            s.refused_results.append(item)
            self.publish(s, "result_refused", **item)
            self._stage_failed(s, stage, "ResultRefusedError", f"result refused: {e}",
                               o.timings)
            return
        result = rec.model_dump(mode="json")
        self._stage_end(s, stage, ok=True, worker_timings=o.timings)
        b = getattr(self.budgets, stage)
        fb = result.get("fallback")
        if fb or s.stages[stage]["duration_s"] > b.budget_s:
            ex = {"stage": stage, "budget_s": b.budget_s,
                  "elapsed_s": s.stages[stage]["duration_s"],
                  "action": fb or "result arrived within the grace period; used"}
            s.budgets_exceeded.append(ex)
            self.publish(s, "budget_exceeded", **ex)
        if stage == "registration":
            s.registration = result
            self._on_registration(s, result)
        else:
            self._on_plans(s, result)

    def _stage_failed(self, s: Session, stage: str, error_type: str, error: str,
                      timings: dict) -> None:
        self._stage_end(s, stage, ok=False, error=error, worker_timings=timings)
        if stage == "registration":
            self._no_valid_registration(s, [{
                "name": "registration_failed", "level": "rigid",
                "message": f"{error_type}: {error}", "values": {}}])
            return
        self._to_fallback(s, f"{stage} failed: {error_type}: {error}")

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
                why = adapted.get("reason") or "the deformable registration failed its checks"
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
                    self.broker.cancel(s.task_id, f"{stage} over its budget + grace")
                s.task_id, s.stage_deadline = None, None
                self._stage_end(s, stage, ok=False, error="budget exceeded, no result")
                ex = {"stage": stage, "budget_s": b.budget_s,
                      "elapsed_s": s.stages[stage]["duration_s"],
                      "action": "no result by budget + grace: stage cancelled, scheduled "
                                "plan only"}
                s.budgets_exceeded.append(ex)
                self.publish(s, "budget_exceeded", **ex)
                self._to_fallback(s, f"{stage} exceeded its {b.budget_s:g} s budget")

    # -- decision and hand-off ---------------------------------------------------------
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
        items = self._prepare_handoff(s, plan)
        s.chosen = plan
        self._transition(s, S.HANDING_OFF, f"{plan} plan chosen")
        self._start_handoff(s, items, None)

    def retry_handoff(self, s: Session) -> None:
        """Send the chosen plan's objects again (the same files and SOP Instance UIDs, from
        the same outbox batch), skipping those the TMS confirmed; checks run again first."""
        if s.state != S.HANDOFF_FAILED:
            raise IllegalTransitionError(f"session {s.session_id} is {s.state}; only a failed "
                                         f"hand-off ({S.HANDOFF_FAILED}) can be retried")
        items = self._prepare_handoff(s, s.chosen)
        self._transition(s, S.HANDING_OFF, f"hand-off retried ({s.chosen} plan)")
        self._start_handoff(s, items, (s.handoff or {}).get("outbox"))

    def _prepare_handoff(self, s: Session, plan: str) -> list[tuple[str, str, str]]:
        try:
            return self.handoff.prepare(s, plan)
        except HandOffError as e:
            self.publish(s, "handoff_refused", plan=plan, error=str(e))
            raise

    def _start_handoff(self, s: Session, items, batch) -> None:
        self._stage_start(s, "handoff")
        try:
            batch = self.handoff.start(s, items, batch=batch)
        except (OSError, AdaptiveError) as e:    # e.g. the outbox cannot be written
            self._on_handoff_done(s.session_id, False, {
                "error": f"hand-off could not start: {e}", "outbox": batch})
            return
        s.handoff = dict(s.handoff or {}, plan=s.chosen, outbox=batch, outcome="sending")
        self.store.save_session(s)

    def _on_handoff_done(self, sid: str, ok: bool, info: dict) -> None:
        s = self.sessions[sid]
        tms = self.cfg.tms
        recorded = self.store.handoff_instances(sid)
        outcome = outcome_of(recorded) if recorded else ("stored" if ok else "not_stored")
        info = dict(info, tms=f"{tms.ae_title}@{tms.host}:{tms.port}", plan=s.chosen,
                    outcome=outcome, recorded=recorded)
        s.handoff = info
        self._stage_end(s, "handoff", ok=ok)
        if not ok:
            s.error = f"hand-off failed ({outcome}): {info.get('error')}"
            self._transition(s, S.HANDOFF_FAILED, s.error)
            self.publish(s, "handoff_failed", **{k: v for k, v in info.items()
                                                 if k != "recorded"})
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
        s.error = ""
        self._transition(s, S.HANDED_OFF, f"{s.chosen} plan stored at {info['tms']}")
        self.publish(s, "handed_off", **{k: v for k, v in info.items() if k != "recorded"})

    def cancel(self, s: Session, reason: str) -> None:
        if s.state in S.TERMINAL:
            raise IllegalTransitionError(f"session {s.session_id} is already {s.state}")
        if s.task_id:
            self.broker.cancel(s.task_id, f"session cancelled: {reason}")
            s.task_id, s.stage_deadline = None, None
        self._transition(s, S.CANCELLED, reason)

    # -- console (docs/console-protocol.md) ------------------------------------------------
    def handle_command(self, h: dict, role: str = "therapist") -> dict:
        """One console request (as a header dict) from a client with ``role``; raises the
        :class:`AdaptiveError` the reply reports (in-process use and tests)."""
        return self.api.handle(h, role)

    def review_images(self, s: Session) -> dict:
        return self.api.review_images(s)
