"""Reliable request/reply between the orchestrator and stage workers over ZeroMQ, in the
style of the ZeroMQ guide's Paranoid Pirate / Majordomo patterns.

* The orchestrator owns a :class:`WorkerBroker`: a ROUTER socket (bind). Workers
  (:class:`Worker`, separate processes, possibly other hosts) connect with a DEALER and
  announce ``READY`` with their service name (``registration``, ``planning``, ...).
* Both sides send ``HEARTBEAT`` every ``interval`` seconds when otherwise silent; any
  message counts as a sign of life. A peer silent for ``interval x liveness`` is dead.
* A dead worker's task is re-issued (attempt + 1) to another worker of the same
  service, or to the restarted one when it announces READY, at most ``max_attempts``
  times in all; then the task fails. A late result from a worker declared dead is
  ignored (first result wins, by task id).
* The broker owns task assignment (Majordomo): a ``RESULT`` or ``PROGRESS`` is accepted
  only from the worker the task was given to (its ZeroMQ identity and, with CURVE, the
  authenticated key of its connection); anything else is refused and reported
  (``refused`` outcome), never used.
* ``CANCEL`` tells the worker holding a task to stop it (session cancelled, stage over its
  budget and grace): the worker kills its stage and becomes idle.
* Every message is parsed into its typed schema (:mod:`services.schemas`) first; a malformed
  one is logged and dropped, the sender's state untouched.
* A worker runs its task in a thread, so it keeps heartbeating while computing, and
  sends ``PROGRESS`` messages the handler reports; ``RESULT`` carries the worker's
  timings. A worker that loses the broker reconnects with exponential backoff.

Messages are :mod:`services.protocol` frames (JSON header + zero-copy numpy frames).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

import numpy as np
import zmq

from adaptive.errors import AdaptiveError
from adaptive.log import get_logger
from services import schemas as M
from services.auth import apply_client_keys
from services.protocol import ProtocolError, encode, split_routed


def frame_user_id(frame) -> str | None:
    """The ZAP User-Id of the connection a received frame came over (with CURVE: the
    authenticated client, see :mod:`services.auth`); None without authentication."""
    try:
        uid = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return uid or None

READY, HEARTBEAT, TASK, RESULT, PROGRESS, DISCONNECT, CANCEL = (
    "READY", "HEARTBEAT", "TASK", "RESULT", "PROGRESS", "DISCONNECT", "CANCEL")
BUSY = "__busy__"  # a reconnecting worker still finishing a task from before


@dataclass
class Task:
    task_id: str
    service: str
    payload: dict
    arrays: dict = field(default_factory=dict)
    deadline_s: float | None = None
    attempts: int = 0
    worker: bytes | None = None
    submitted_at: float = field(default_factory=time.time)
    dispatched_at: float | None = None
    done: bool = False
    meta: dict = field(default_factory=dict)   # orchestrator bookkeeping (session, stage)


@dataclass
class TaskOutcome:
    """What the broker reports to its owner (one per finished/failed task or event)."""

    kind: str                 # "result" | "failed" | "progress" | "reissued" | "worker_lost"
    #                           | "refused" (a result/progress not from the task's worker)
    task: Task | None
    ok: bool = False
    result: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    error: str = ""
    error_type: str = ""
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class WorkerInfo:
    ident: bytes
    service: str
    name: str
    expiry: float
    task_id: str | None = None
    last_sent: float = 0.0
    user_id: str | None = None      # authenticated key (CURVE User-Id) of its connection


class WorkerBroker:
    """The orchestrator side. Not thread-safe: call from the owner's poll loop."""

    def __init__(self, endpoint: str, *, heartbeat_interval_s: float = 0.5, liveness: int = 6,
                 max_attempts: int = 3, context: zmq.Context | None = None, secure=None):
        """``secure(sock)``: applied to the ROUTER socket before it binds (CURVE server
        settings, :func:`services.auth.secure_server`)."""
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if secure is not None:
            secure(self.sock)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.interval = heartbeat_interval_s
        self.liveness = liveness
        self.max_attempts = max_attempts
        self.workers: dict[bytes, WorkerInfo] = {}
        self.tasks: dict[str, Task] = {}
        self.queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.log = get_logger("services.broker")
        self._ids = itertools.count(1)
        self.bad_messages = 0           # malformed messages received (and dropped)

    def close(self):
        for w in list(self.workers.values()):
            self._send(w, DISCONNECT, {})
        self.sock.close(0)

    # -- API ------------------------------------------------------------------------
    def submit(self, service: str, payload: dict, *, arrays: dict | None = None,
               deadline_s: float | None = None, meta: dict | None = None) -> Task:
        t = Task(task_id=f"t{next(self._ids)}-{uuid.uuid4().hex[:8]}", service=service,
                 payload=payload, arrays=arrays or {}, deadline_s=deadline_s,
                 meta=meta or {})
        self.tasks[t.task_id] = t
        self.queues[service].append(t.task_id)
        self._dispatch()
        return t

    def cancel(self, task_id: str, reason: str = "cancelled") -> None:
        """Forget a task (its result, if it ever comes, is ignored) and send ``CANCEL`` to
        the worker holding it, which stops its stage and becomes idle."""
        t = self.tasks.get(task_id)
        if t is None:
            return
        t.done = True
        with contextlib.suppress(ValueError):
            self.queues[t.service].remove(task_id)
        w = self.workers.get(t.worker) if t.worker is not None else None
        if w is not None and w.task_id == task_id:
            self._send(w, CANCEL, {"task_id": task_id, "reason": reason[:2000]})
            self.log.info("task_cancel_sent", task_id=task_id, worker=w.name, reason=reason)

    def services(self) -> dict[str, int]:
        c = collections.Counter(w.service for w in self.workers.values())
        return dict(c)

    def handle_incoming(self) -> list[TaskOutcome]:
        """Drain readable messages; returns outcomes to act on."""
        out: list[TaskOutcome] = []
        for _ in range(1000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                ident, rest = split_routed(frames)
                msg, arrays = M.decode_message(rest, M.WORKER_TO_BROKER)
            except ProtocolError as e:
                self.bad_messages += 1
                self.log.warning("bad_worker_message", error=str(e)[:500])
                continue
            out.extend(self._on_message(ident, msg, arrays, frame_user_id(frames[-1])))
        self._dispatch()
        return out

    def tick(self) -> list[TaskOutcome]:
        """Heartbeats, dead-worker detection and dispatch; call at least every interval/2."""
        now = time.monotonic()
        out: list[TaskOutcome] = []
        for w in list(self.workers.values()):
            if now > w.expiry:
                out.extend(self._worker_lost(w, "heartbeat expired"))
            elif now - w.last_sent >= self.interval:
                self._send(w, HEARTBEAT, {})
        self._dispatch()
        return out

    # -- internals --------------------------------------------------------------------
    def _send(self, w: WorkerInfo, kind: str, body: dict, arrays=None) -> bool:
        try:
            self.sock.send_multipart([w.ident, *encode(kind, body, arrays)], copy=False)
            w.last_sent = time.monotonic()
            return True
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or would block
            self.log.warning("send_to_worker_failed", worker=w.name, error=str(e))
            return False

    def _on_message(self, ident: bytes, m: M.Message, arrays,
                    user_id: str | None = None) -> list[TaskOutcome]:
        kind = m.type
        now = time.monotonic()
        w = self.workers.get(ident)
        if w is not None and w.user_id != user_id:
            # an identity is bound to the key that announced it: another key cannot speak
            # for it (ZeroMQ identities are chosen by the peer)
            self.log.warning("worker_identity_key_mismatch", worker=w.name, type=kind)
            return [TaskOutcome("refused", self.tasks.get(getattr(m, "task_id", "") or ""),
                                info={"worker": w.name, "why": "message from another key "
                                      "under this worker's identity", "type": kind})]
        if isinstance(m, M.Ready):
            if w is not None and w.task_id:     # re-registration: its task is lost
                out = self._worker_lost(w, "worker re-announced")
            else:
                out = []
            self.workers[ident] = WorkerInfo(ident=ident, service=m.service, name=m.name,
                                             expiry=now + self.interval * self.liveness,
                                             task_id=BUSY if m.busy else None,
                                             user_id=user_id)
            self.log.info("worker_ready", worker=m.name, service=m.service, pid=m.pid,
                          host=m.host, user_id=user_id)
            return out
        if w is None:
            # Unknown peer (e.g. we restarted): ask it to re-register.
            self.sock.send_multipart([ident, *encode(DISCONNECT, {})])
            return []
        w.expiry = now + self.interval * self.liveness
        if isinstance(m, M.Heartbeat):
            return []
        if isinstance(m, M.Disconnect):
            return self._worker_lost(w, "worker disconnected")
        t = self.tasks.get(m.task_id)
        if t is not None and not t.done and t.worker != ident:
            # Majordomo: only the worker holding a task may report on it
            self.log.warning("result_from_wrong_worker", task_id=m.task_id, worker=w.name,
                             type=kind)
            return [TaskOutcome("refused", t, info={
                "worker": w.name, "task_id": m.task_id, "type": kind,
                "why": "the task was not given to this worker"})]
        if isinstance(m, M.Progress):
            if t is None or t.done:
                return []
            return [TaskOutcome("progress", t, info=m.info)]
        # RESULT
        if w.task_id in (m.task_id, BUSY):
            w.task_id = None
        if t is None or t.done:
            self.log.info("late_result_ignored", task_id=m.task_id, worker=w.name)
            return []
        if m.error_type == "WorkerBusy":
            t.worker = None
            t.attempts -= 1
            self.queues[t.service].append(t.task_id)
            return []
        t.done = True
        timings = dict(m.timings)
        timings["round_trip_s"] = round(time.time() - (t.dispatched_at or t.submitted_at), 4)
        timings["worker"] = w.name
        timings["attempt"] = t.attempts
        return [TaskOutcome("result" if m.ok else "failed", t, ok=m.ok, result=m.result,
                            arrays=arrays, error=m.error, error_type=m.error_type,
                            timings=timings)]

    def _worker_lost(self, w: WorkerInfo, why: str) -> list[TaskOutcome]:
        self.workers.pop(w.ident, None)
        self.log.warning("worker_lost", worker=w.name, service=w.service, why=why,
                         task_id=w.task_id)
        out = [TaskOutcome("worker_lost", None, info={"worker": w.name, "service": w.service,
                                                       "why": why, "task_id": w.task_id})]
        t = self.tasks.get(w.task_id or "")
        if t is not None and not t.done:
            t.worker = None
            if t.attempts >= self.max_attempts:
                t.done = True
                out.append(TaskOutcome("failed", t, error=f"task lost {t.attempts} time(s); "
                                       f"last worker {w.name}: {why}",
                                       error_type="WorkerLost"))
            else:
                self.queues[t.service].appendleft(t.task_id)
                out.append(TaskOutcome("reissued", t, info={"worker": w.name, "why": why,
                                                            "attempt": t.attempts + 1}))
        return out

    def _dispatch(self) -> None:
        for service, q in self.queues.items():
            while q:
                idle = [w for w in self.workers.values()
                        if w.service == service and w.task_id is None]
                if not idle:
                    break
                t = self.tasks[q.popleft()]
                if t.done:
                    continue
                w = idle[0]
                t.attempts += 1
                t.worker = w.ident
                t.dispatched_at = time.time()
                w.task_id = t.task_id
                body = {"task_id": t.task_id, "service": service, "payload": t.payload,
                        "deadline_s": t.deadline_s, "attempt": t.attempts}
                if not self._send(w, TASK, body, t.arrays):
                    w.task_id = None
                    t.attempts -= 1
                    t.worker = None
                    q.appendleft(t.task_id)
                    self.workers.pop(w.ident, None)
                    continue
                self.log.info("task_dispatched", task_id=t.task_id, service=service,
                              worker=w.name, attempt=t.attempts)


# --- worker side ------------------------------------------------------------------------


class TaskContext:
    """Given to a handler: deadline, progress reporting, identity, cancellation
    (``cancelled`` is set when the broker sends ``CANCEL``: a handler stops as soon as it
    can; :mod:`services.workers.stages` kills its stage child at once)."""

    def __init__(self, task_id: str, attempt: int, deadline_s: float | None, out_q):
        self.task_id = task_id
        self.attempt = attempt
        self.started = time.monotonic()
        self.deadline = (self.started + deadline_s) if deadline_s else None
        self.cancelled = threading.Event()
        self._q = out_q

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def progress(self, step: str, fraction: float | None = None, **info) -> None:
        self._q.put(("progress", self.task_id, {"step": step, "fraction": fraction,
                                                "elapsed_s": round(time.monotonic() -
                                                                   self.started, 3), **info}))


class Worker:
    """One worker (run it in its own process): connects, announces, serves tasks."""

    def __init__(self, endpoint: str, service: str, handler, *, heartbeat_interval_s=0.5,
                 liveness: int = 6, name: str | None = None, context=None,
                 reconnect_max_s: float = 8.0):
        self.endpoint = endpoint
        self.service = service
        self.handler = handler
        self.interval = heartbeat_interval_s
        self.liveness = liveness
        self.name = name or f"{service}@{socket.gethostname()}:{os.getpid()}"
        self.ctx = context or zmq.Context.instance()
        self.reconnect_max_s = reconnect_max_s
        self.log = get_logger("services.worker")
        self._out: queue.Queue = queue.Queue()
        self._busy: threading.Thread | None = None
        self._ctx: TaskContext | None = None   # the task being run
        self.reconnects = 0          # times the broker was declared lost and reconnected
        self.cancelled: list[str] = []          # task ids cancelled by the broker
        self.bad_messages = 0                   # malformed messages received (and dropped)
        self.curve: dict | None = None          # CURVE client keys (services.auth)

    def _connect(self):
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            apply_client_keys(s, self.curve)
        s.setsockopt_string(zmq.IDENTITY, f"{self.name}-{uuid.uuid4().hex[:6]}")
        s.connect(self.endpoint)
        busy = self._busy is not None and self._busy.is_alive()
        s.send_multipart(encode(READY, {"service": self.service, "name": self.name,
                                        "pid": os.getpid(), "host": socket.gethostname(),
                                        "busy": busy}))
        return s

    def _run_task(self, task: M.Task, arrays: dict, ctx: TaskContext):
        tid = task.task_id
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            res = self.handler(dict(task.payload), arrays, ctx)
            res_arrays = {}
            if isinstance(res, tuple):
                res, res_arrays = res
            msg = {"task_id": tid, "ok": True, "result": res or {}}
        except AdaptiveError as e:
            res_arrays = {}
            msg = {"task_id": tid, "ok": False, "error": str(e), "error_type": type(e).__name__}
        except Exception as e:  # noqa: BLE001 - a bug in a stage: report it, keep the worker alive
            res_arrays = {}
            msg = {"task_id": tid, "ok": False, "error": f"{type(e).__name__}: {e}",
                   "error_type": type(e).__name__, "traceback": traceback.format_exc()[-4000:]}
        msg["timings"] = {"run_s": round(time.perf_counter() - t0, 4),
                          "cpu_s": round(time.process_time() - c0, 4),
                          "finished_at": time.time()}
        self._out.put(("result", tid, (msg, res_arrays)))

    def run(self, stop: threading.Event | None = None, max_runtime_s: float | None = None):
        """Serve until ``stop`` is set (or ``max_runtime_s`` passes)."""
        stop = stop or threading.Event()
        end = time.monotonic() + max_runtime_s if max_runtime_s else None
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        broker_expiry = time.monotonic() + self.interval * self.liveness
        last_sent = time.monotonic()
        backoff = self.interval
        self.log.info("worker_started", service=self.service, worker=self.name,
                      endpoint=self.endpoint)
        try:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                events = dict(poller.poll(int(min(self.interval, 0.05) * 1000)))
                now = time.monotonic()
                if sock in events:
                    for _ in range(100):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            m, arrays = M.decode_message(frames, M.BROKER_TO_WORKER)
                        except ProtocolError as e:
                            self.bad_messages += 1
                            self.log.warning("bad_broker_message", error=str(e)[:500])
                            continue
                        broker_expiry = now + self.interval * self.liveness
                        backoff = self.interval
                        if isinstance(m, M.Task):
                            self._start_task(sock, m, arrays)
                        elif isinstance(m, M.Cancel):
                            self._cancel_task(m)
                        elif isinstance(m, M.Disconnect):
                            broker_expiry = 0  # re-register now
                if self._send_outbox(sock):
                    last_sent = now
                if now > broker_expiry:
                    self.log.warning("broker_lost_reconnecting", backoff_s=backoff)
                    poller.unregister(sock)
                    sock.close(0)
                    if stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, self.reconnect_max_s)
                    sock = self._connect()
                    self.reconnects += 1
                    poller.register(sock, zmq.POLLIN)
                    broker_expiry = time.monotonic() + self.interval * self.liveness
                    last_sent = time.monotonic()
                elif now - last_sent >= self.interval:
                    sock.send_multipart(encode(HEARTBEAT, {}))
                    last_sent = now
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(encode(DISCONNECT, {}), zmq.NOBLOCK)
            sock.close(0)

    def _start_task(self, sock, m: M.Task, arrays: dict) -> None:
        """Run task ``m`` in a thread, or answer "worker busy" when one is running."""
        if self._busy is not None and self._busy.is_alive():
            self.log.error("task_while_busy", task_id=m.task_id)
            sock.send_multipart(encode(RESULT, {
                "task_id": m.task_id, "ok": False,
                "error": "worker busy", "error_type": "WorkerBusy"}))
            return
        self.log.info("task_received", task_id=m.task_id, attempt=m.attempt)
        # own the buffers: the frames die with the receiving loop's iteration
        arrays = {k: np.array(v) for k, v in arrays.items()}
        self._ctx = TaskContext(m.task_id, m.attempt, m.deadline_s, self._out)
        self._busy = threading.Thread(target=self._run_task, args=(m, arrays, self._ctx),
                                      daemon=True)
        self._busy.start()

    def _cancel_task(self, m: M.Cancel) -> None:
        """Flag the running task cancelled when ``m`` names it."""
        c = self._ctx
        if c is not None and c.task_id == m.task_id and \
                self._busy is not None and self._busy.is_alive():
            c.cancelled.set()
            self.cancelled.append(m.task_id)
            self.log.warning("task_cancelled", task_id=m.task_id, reason=m.reason)

    def _send_outbox(self, sock) -> bool:
        """Send the queued progress reports and results; True when anything was sent."""
        sent = False
        while True:
            try:
                kind, tid, data = self._out.get_nowait()
            except queue.Empty:
                break
            if kind == "progress":
                sock.send_multipart(encode(PROGRESS, {"task_id": tid, "info": data}))
            else:
                msg, res_arrays = data
                sock.send_multipart(encode(RESULT, msg, res_arrays), copy=False)
                self.log.info("task_done", task_id=tid, ok=msg["ok"],
                              run_s=msg["timings"]["run_s"])
            sent = True
        return sent
