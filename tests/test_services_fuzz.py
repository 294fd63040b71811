"""Fuzzing every ZeroMQ socket of the services with malformed frames (issue 13 item 2), and
strangers without keys (item 4).

One orchestrator runs in a thread for the whole module (shared between the cases, so the
hundreds of examples cost seconds, not process start-ups); each socket is fed frames that
hypothesis builds (bounded: ``max_examples``), plus the exact messages that killed the
orchestrator before (``"arrays": 5``, a bad dtype, a 200 000-deep JSON header). After each
case there is a positive signal that the input was processed (a counter of dropped
messages moved, or a reply came), then the checks: the orchestrator's loop is alive and
answers, no session exists whose identifiers would break their rules, every console
message got a reply. A worker is fuzzed the same way from a fake broker. Strangers (no
key, or a key of the wrong role) get nothing at all: no reply, no event, no effect.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services import config as C
from services.auth import apply_client_keys
from services.messaging import Worker
from services.orchestrator.__main__ import bound_endpoints
from services.orchestrator.core import Orchestrator
from services.protocol import ProtocolError, decode, encode
from services.validators import validate_patient_id, validate_room
from tests.integration.conftest import make_config
from tests.integration.doubles import array_sum
from tests.waiting import wait_until

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

KNOWN_TYPES = ["READY", "HEARTBEAT", "DISCONNECT", "PROGRESS", "RESULT", "TASK", "CANCEL",
               "request", "gateway_event", "reply", "event"]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
    max_leaves=12)
array_spec = st.one_of(json_value, st.fixed_dictionaries({
    "name": st.one_of(st.text(max_size=8), json_value),
    "dtype": st.one_of(st.sampled_from(["<f8", "O", "V8", "U4", "M8", "zz", "<i4", ">u2",
                                        "(2,)f4", "[('a','<i4')]"]), json_value),
    "shape": st.one_of(st.lists(st.integers(-5, 2**40), max_size=10), json_value)}))
header = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), json_value),
     "type": st.one_of(st.sampled_from(KNOWN_TYPES), json_value)},
    optional={"arrays": st.one_of(st.lists(array_spec, max_size=3), json_value),
              "cmd": st.one_of(st.sampled_from(["start", "status", "choose", "cancel",
                                                "retry-handoff", "review", "ping",
                                                "planning_data", "nope"]), json_value),
              "room": json_value, "patient_id": json_value, "session_id": json_value,
              "task_id": json_value, "service": json_value, "name": json_value,
              "event": st.one_of(st.just("series_complete"), json_value),
              "data": json_value, "result": json_value, "ok": json_value,
              "acknowledge": json_value, "request_id": json_value})
frames = st.one_of(
    st.lists(st.binary(max_size=48), min_size=1, max_size=4),
    st.tuples(header.map(lambda h: json.dumps(h).encode()),
              st.lists(st.binary(max_size=32), max_size=3)).map(lambda t: [t[0], *t[1]]))

DEEP = b'{"v":1,"type":"request","cmd":"status","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
ISSUE_MESSAGES = [  # what ended the orchestrator before (issue 13 item 2)
    [b'{"v":1,"type":"request","cmd":"status","arrays":5}'],
    [(b'{"v":1,"type":"RESULT","task_id":"t1","ok":true,"arrays":[{"name":"a","dtype":"O",'
      b'"shape":[1]}]}'), b"\x00" * 8],
    [(b'{"v":1,"type":"gateway_event","event":"series_complete","data":{"patient_id":null,'
      b'"series_uid":7},"arrays":[{"name":"a","dtype":"not-a-dtype","shape":[2]}]}'), b"12"],
    [DEEP],
    [b'{"v":1,"type":"request","cmd":"start","room":{"a":1},"patient_id":null}'],
    [b'["not", "an", "object"]'],
    [b'{"v":1,"type":"READY","service":5,"name":null}'],
]


@given(frames)
@settings(max_examples=400, deadline=None, derandomize=True)
def test_decode_raises_only_protocol_errors(fr):
    try:
        h, arrays = decode(fr)
    except ProtocolError:
        return
    assert isinstance(h, dict) and isinstance(h["type"], str)
    assert all(isinstance(a, np.ndarray) and a.dtype.kind in "biufc" for a in arrays.values())


class Running:
    """The orchestrator in a thread, and keyed client sockets of each role."""

    def __init__(self, tmp):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))          # a TMS port nothing answers on (never used here)
        self._tms = srv
        cfg, bud = make_config(tmp, tms_port=srv.getsockname()[1])
        self.ctx = zmq.Context()
        self.o = Orchestrator(C.load_services_config(cfg), C.load_budgets(bud), context=self.ctx)
        self.ep = bound_endpoints(self.o)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.o.run, args=(self.stop,), daemon=True)
        self.thread.start()
        self.cctx = zmq.Context()           # the clients' own context
        self.console = self.client(zmq.DEALER, "console", "console_endpoint")
        self.worker = self.client(zmq.DEALER, "worker", "worker_endpoint")
        self.gateway = self.client(zmq.PUSH, "gateway", "gateway_events_endpoint")
        self.rid = 0

    def client(self, kind, key, endpoint_key, *, keys=True):
        s = self.cctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if keys:
            apply_client_keys(s, self.o.keys.client_keys(key))
        s.connect(self.ep[endpoint_key])
        return s

    def request(self, sock, body: dict, timeout_s=10.0) -> dict | None:
        self.rid += 1
        sock.send_multipart([b"", *encode("request", {**body, "request_id": self.rid})])
        end = time.monotonic() + timeout_s
        while sock.poll(max(1, int((end - time.monotonic()) * 1000))):
            h, _ = decode(sock.recv_multipart()[1:])
            if h.get("request_id") == self.rid:
                return h
            if time.monotonic() > end:
                break
        return None

    def alive(self) -> None:
        assert self.thread.is_alive(), "the orchestrator's loop ended"
        r = self.request(self.console, {"cmd": "ping"})
        assert r is not None and r["ok"], r
        for s in list(self.o.sessions.values()):
            assert validate_room(s.room)[0] and validate_patient_id(s.patient_id)[0], s

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.cctx.destroy(0)
        self.ctx.term()
        self._tms.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    r = Running(tmp_path_factory.mktemp("fuzz"))
    wait_until(lambda: r.request(r.console, {"cmd": "ping"}, 1.0), 30, "orchestrator answers")
    yield r
    r.close()


def _console_reply(r: Running, fr: list[bytes], timeout_s: float = 10.0) -> dict:
    before = r.o.api.requests
    r.console.send_multipart([b"", *fr])
    assert r.console.poll(int(timeout_s * 1000)), "a console message got no reply"
    h, _ = decode(r.console.recv_multipart()[1:])
    assert r.o.api.requests > before
    return h


@FUZZ
@given(frames)
def test_console_socket_answers_every_malformed_message(running, fr):
    h = _console_reply(running, fr)
    assert h["type"] == "reply" and isinstance(h["ok"], bool)
    if not h["ok"]:
        assert h["error_type"] != "InternalError", h    # refused by name, not by a bug
    running.alive()


@pytest.mark.parametrize("msg", ISSUE_MESSAGES, ids=range(len(ISSUE_MESSAGES)))
def test_issue_messages_on_every_socket(running, msg):
    r = running
    h = _console_reply(r, msg)
    assert h["ok"] is False and h["error_type"] in ("ProtocolError", "InvalidIdentifierError")
    before = r.o.broker.bad_messages
    r.worker.send_multipart(msg)
    wait_until(lambda: r.o.broker.bad_messages > before, 10, "the worker message processed")
    before = r.o.bad_gateway_messages
    r.gateway.send_multipart(msg)
    wait_until(lambda: r.o.bad_gateway_messages > before, 10, "the gateway message processed")
    r.alive()


@FUZZ
@given(frames)
def test_worker_socket_survives_malformed_messages(running, fr):
    r = running
    before = (r.o.broker.bad_messages, len(r.o.broker.workers))
    r.worker.send_multipart(fr)
    # processed: either dropped as malformed, or a well-formed READY registered a worker,
    # or (any other well-formed message from an unknown peer) answered with DISCONNECT
    def processed():
        if (r.o.broker.bad_messages, len(r.o.broker.workers)) != before:
            return True
        return r.worker.poll(0) and r.worker.recv_multipart()
    wait_until(processed, 10, "the worker message processed")
    r.alive()


@FUZZ
@given(frames)
def test_gateway_socket_survives_malformed_messages(running, fr):
    r = running
    before = r.o.bad_gateway_messages + r.o.gateway_events
    r.gateway.send_multipart(fr)
    wait_until(lambda: r.o.bad_gateway_messages + r.o.gateway_events > before, 10,
               "the gateway message processed")
    r.alive()


def test_events_socket_survives_garbage_from_subscribers(running):
    r = running
    xsub = r.client(zmq.XSUB, "viewer", "console_events_endpoint")
    sub = r.client(zmq.SUB, "viewer", "console_events_endpoint")
    sub.setsockopt(zmq.SUBSCRIBE, b"service")
    for payload in (b"", b"\x01", b"\x00" * 1000, b"\x02garbage", DEEP[:5000], b"\x01" + b"x" * 5000):
        xsub.send(payload)
    # positive signal: the keyed subscriber receives events; the loop lives on
    end = time.monotonic() + 30
    while not sub.poll(50):
        assert time.monotonic() < end, "no event reached an authenticated subscriber"
        r.o.publish(None, "probe")
    r.alive()
    xsub.close(0)
    sub.close(0)


def test_strangers_without_a_key_get_nothing(running):
    r = running
    keyed_sub = r.client(zmq.SUB, "viewer", "console_events_endpoint")
    stranger_sub = r.client(zmq.SUB, None, "console_events_endpoint", keys=False)
    wrong_role_sub = r.client(zmq.SUB, "worker", "console_events_endpoint")
    for s in (keyed_sub, stranger_sub, wrong_role_sub):
        s.setsockopt(zmq.SUBSCRIBE, b"")
    stranger = r.client(zmq.DEALER, None, "console_endpoint", keys=False)
    worker_key_on_console = r.client(zmq.DEALER, "worker", "console_endpoint")
    fake_worker = r.client(zmq.DEALER, None, "worker_endpoint", keys=False)
    console_key_as_worker = r.client(zmq.DEALER, "console", "worker_endpoint")
    fake_gateway = r.client(zmq.PUSH, None, "gateway_events_endpoint", keys=False)
    viewer_as_gateway = r.client(zmq.PUSH, "viewer", "gateway_events_endpoint")
    sessions, workers = len(r.o.sessions), len(r.o.broker.workers)
    series = {p: dict(d.series) for p, d in r.o.patients.items()}
    for s in (stranger, worker_key_on_console):
        s.send_multipart([b"", *encode("request", {"cmd": "start", "room": "X1",
                                                   "patient_id": "P-STRANGER"})])
    for s in (fake_worker, console_key_as_worker):
        s.send_multipart(encode("READY", {"service": "planning", "name": "intruder"}))
    for s in (fake_gateway, viewer_as_gateway):
        s.send_multipart(encode("gateway_event", {"event": "series_complete", "data": {
            "patient_id": "P-STRANGER", "series_uid": "1.2.3", "path": "/etc",
            "count": 1, "modality": "CT"}}))
    # positive signal: a keyed client's request is answered and its events arrive
    h = r.request(r.console, {"cmd": "start", "room": "KEYED", "patient_id": "P-KEYED"})
    assert h["ok"], h
    end = time.monotonic() + 30
    while not keyed_sub.poll(50):
        assert time.monotonic() < end
        r.o.publish(None, "probe")
    r.request(r.console, {"cmd": "cancel", "room": "KEYED"})
    # ... and the strangers got nothing, changed nothing
    for s in (stranger, worker_key_on_console, stranger_sub, wrong_role_sub, fake_worker,
              console_key_as_worker):
        assert not s.poll(300), "a client without an admitted key received something"
    assert len(r.o.sessions) == sessions + 1
    assert not [s for s in r.o.sessions.values() if s.patient_id == "P-STRANGER"]
    assert len(r.o.broker.workers) == workers
    assert "P-STRANGER" not in r.o.patients
    assert {p: dict(d.series) for p, d in r.o.patients.items() if p in series} == series


def test_viewer_may_look_but_not_act(running):
    r = running
    viewer = r.client(zmq.DEALER, "viewer", "console_endpoint")
    h = r.request(viewer, {"cmd": "status"})
    assert h["ok"] and isinstance(h["sessions"], list)
    for cmd in ({"cmd": "start", "room": "V1", "patient_id": "P-V"},
                {"cmd": "choose", "room": "V1", "plan": "adapted"},
                {"cmd": "cancel", "room": "KEYED"}, {"cmd": "retry-handoff", "room": "V1"}):
        h = r.request(viewer, cmd)
        assert not h["ok"] and h["error_type"] == "NotAuthorizedError", h
        assert "role 'viewer' may not" in h["error"]
    assert not [s for s in r.o.sessions.values() if s.room == "V1"]
    viewer.close(0)


def test_wrong_types_never_create_sessions(running):
    r = running
    n = len(r.o.sessions)
    for body in ({"cmd": "start", "room": 7, "patient_id": "P1"},
                 {"cmd": "start", "room": "R9", "patient_id": None},
                 {"cmd": "start", "room": "R9", "patient_id": ["P1"]},
                 {"cmd": "start", "room": "R9", "patient_id": "P1", "protocol": 3},
                 {"cmd": "start", "room": "/tmp/x", "patient_id": "P1"}):
        h = r.request(r.console, body)
        assert h["ok"] is False and h["error_type"] in ("InvalidIdentifierError",
                                                        "ProtocolError"), h
    assert len(r.o.sessions) == n


def test_worker_survives_malformed_messages_from_its_broker(tmp_path):
    """The other direction: a fake broker sends a worker garbage, then a real task."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    w = Worker(f"tcp://127.0.0.1:{port}", "sum", array_sum, heartbeat_interval_s=0.2,
               liveness=50, context=ctx)
    th = threading.Thread(target=w.run, args=(stop, 120), daemon=True)
    th.start()
    try:
        assert router.poll(30_000)
        ident = router.recv_multipart()[0]                   # its READY
        for msg in ISSUE_MESSAGES + [[b'{"v":1,"type":"TASK","task_id":5}'],
                                     [b'{"v":1,"type":"CANCEL"}'], [b"\xff\xfe"]]:
            router.send_multipart([ident, *msg])
        wait_until(lambda: w.bad_messages >= len(ISSUE_MESSAGES) + 3, 10,
                   "the worker to drop every malformed message")
        x = np.arange(6.0)
        router.send_multipart([ident, *encode("TASK", {"task_id": "t1", "service": "sum",
                                                       "payload": {}, "deadline_s": None,
                                                       "attempt": 1}, {"x": x})])
        end = time.monotonic() + 30
        while True:
            assert router.poll(max(1, int((end - time.monotonic()) * 1000)))
            h, _ = decode(router.recv_multipart()[1:])
            if h["type"] == "RESULT":
                break
        assert h["ok"] and h["result"]["sums"]["x"] == 15.0
        assert th.is_alive()
    finally:
        stop.set()
        th.join(10)
        router.close(0)
        ctx.term()


def test_malformed_messages_are_reported_as_an_event(running):
    r = running
    sub = r.client(zmq.SUB, "viewer", "console_events_endpoint")
    sub.setsockopt(zmq.SUBSCRIBE, b"service")
    end = time.monotonic() + 30
    while not sub.poll(50):                          # subscription live (slow joiner)
        assert time.monotonic() < end
        r.o.publish(None, "probe")
    while sub.poll(200):
        sub.recv_multipart()
    r.o._bad_reported.clear()                        # a fresh reporting period
    for name in ("worker", "gateway"):
        getattr(r, name).send_multipart(ISSUE_MESSAGES[0])
    seen = {}
    end = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < end:
        if sub.poll(100):
            h, _ = decode(sub.recv_multipart()[1:])
            if h["event"] == "message_refused":
                seen[h["details"]["socket"]] = h["details"]
    assert set(seen) == {"workers", "gateway"} and all(d["count"] >= 1 for d in seen.values())
    sub.close(0)
