"""The orchestrator process: the loop over its sockets and the session flow (daily image ->
registration -> planning -> decision -> hand-off), with budgets and fallbacks.

Its parts, each a module with one job:

* :mod:`~services.orchestrator.flow` - the stage flow (image -> registration -> planning);
* :mod:`~services.orchestrator.decision` - choose, hand-off outcome, retry, cancel;
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

import zmq

from adaptive.log import get_logger
from adaptive.optimization.protocols import ProtocolTable
from services import schemas as M
from services.auth import Authenticator, KeyStore, secure_server
from services.config import Budgets, ServicesConfig
from services.messaging import WorkerBroker
from services.orchestrator import state as S
from services.orchestrator.console_api import ConsoleApi
from services.orchestrator.decision import Decision
from services.orchestrator.flow import StageFlow
from services.orchestrator.handoff import HandOff
from services.orchestrator.registry import PatientData, PlanningRegistry
from services.orchestrator.session import Session
from services.orchestrator.store import OrchestratorStore
from services.protocol import ProtocolError, encode

CONSOLE_PROTOCOL = M.CONSOLE_PROTOCOL
__all__ = ["CONSOLE_PROTOCOL", "Orchestrator", "PatientData", "Session"]


class Orchestrator(StageFlow, Decision):
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
        try:
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
        except BaseException:
            # a half-built orchestrator must not keep the context's ZAP endpoint
            # (inproc://zeromq.zap.01) or its ports: the next one could not start
            self.close()
            raise

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
        """Close what exists (also after a start that failed half-way) and stop the
        authenticator; a part that fails to close is logged and the rest still closed."""
        for name in ("broker", "gw_sock", "console", "pub", "store"):
            part = getattr(self, name, None)
            if part is not None:
                try:
                    part.close()
                except Exception as e:  # noqa: BLE001 - close the rest, say which failed
                    self.log.warning("close_failed", part=name, error=repr(e))
        self.auth.stop()

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

    # -- console (docs/console-protocol.md) ------------------------------------------------
    def handle_command(self, h: dict, role: str = "therapist") -> dict:
        """One console request (as a header dict) from a client with ``role``; raises the
        :class:`AdaptiveError` the reply reports (in-process use and tests)."""
        return self.api.handle(h, role)

    def review_images(self, s: Session) -> dict:
        return self.api.review_images(s)
