"""Console client (the therapist's side of ``docs/console-protocol.md``)."""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Iterator

import zmq

from adaptive.errors import ServiceError
from services.auth import KeyStore, apply_client_keys
from services.protocol import ProtocolError, decode, encode
from services.ready import orchestrator_endpoint
from services.schemas import ConsoleEvent, ConsoleReply, parse


class ConsoleError(ServiceError):
    """The orchestrator refused a console request or did not answer in time."""


class ConsoleClient:
    """Requests over a DEALER socket (one outstanding request; a timed-out socket is
    replaced so a late reply cannot be mistaken for the next one)."""

    def __init__(self, endpoint: str, events_endpoint: str | None = None, *,
                 timeout_s: float = 5.0, context: zmq.Context | None = None,
                 keys: dict | None = None):
        """``keys``: this client's CURVE keys (:meth:`services.auth.KeyStore.client_keys`);
        the orchestrator answers (and publishes to) authenticated clients only."""
        self.endpoint = endpoint
        self.keys = keys
        self.events_endpoint = events_endpoint
        self.timeout_s = timeout_s
        self.ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._sock = None
        self._sub = None

    @classmethod
    def from_config(cls, cfg, *, timeout_s: float = 5.0, key: str = "console") -> ConsoleClient:
        """A client for the orchestrator of services config ``cfg``: its configured console
        endpoints, or, when they say port 0, the ones in the running orchestrator's ready
        record (``<paths.root>/run/orchestrator.json``, see :mod:`services.ready`); ``key``:
        the name of this client's key under ``<paths.root>/keys`` (default ``console``, a
        therapist; ``viewer`` may only look)."""
        return cls(orchestrator_endpoint(cfg, "console_endpoint"),
                   orchestrator_endpoint(cfg, "console_events_endpoint"), timeout_s=timeout_s,
                   keys=KeyStore(cfg.paths.root).client_keys(key))

    def _new(self, kind):
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            apply_client_keys(sock, self.keys)
        return sock

    def _socket(self):
        if self._sock is None:
            self._sock = self._new(zmq.DEALER)
            self._sock.connect(self.endpoint)
        return self._sock

    def request(self, cmd: str, *, check: bool = True, **args) -> dict:
        rid = next(self._ids)
        sock = self._socket()
        sock.send_multipart([b"", *encode("request", {"cmd": cmd, "request_id": rid, **args})])
        end = time.monotonic() + self.timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                sock.close(0)
                self._sock = None
                raise ConsoleError(f"no reply from orchestrator at {self.endpoint} within "
                                   f"{self.timeout_s:g} s ({cmd})")
            frames = sock.recv_multipart()
            try:
                h, _ = decode(frames[1:] if frames and frames[0] == b"" else frames)
                parse(h, {"reply": ConsoleReply})
            except ProtocolError as e:
                raise ConsoleError(f"malformed reply from {self.endpoint}: {e}") from None
            if h.get("request_id") != rid:
                continue
            if check and not h.get("ok"):
                raise ConsoleError(f"{cmd} refused: {h.get('error_type')}: {h.get('error')}")
            return h

    # convenience
    def start(self, room: str, patient_id: str, protocol: str | None = None) -> dict:
        """Start (or attach to) a session; ``protocol``: the clinical protocol (goals file
        stem under config/goals) or None to map it from the scheduled plan."""
        args = {"protocol": protocol} if protocol else {}
        return self.request("start", room=room, patient_id=patient_id, **args)["session"]

    def status(self, session_id: str | None = None, room: str | None = None) -> dict:
        return self.request("status", session_id=session_id, room=room)

    def session(self, session_id: str) -> dict:
        return self.request("status", session_id=session_id)["session"]

    def choose(self, session_id: str, plan: str, acknowledge=None) -> dict:
        """Choose the plan to hand off; ``acknowledge``: names of the review checks the
        clinician has looked at (needed for the adapted plan when the session has any)."""
        return self.request("choose", session_id=session_id, plan=plan,
                            acknowledge=list(acknowledge or []))["session"]

    def review(self, session_id: str) -> dict:
        """The session's review images: ``{"images": [{"name", "png"}], "validity",
        "summary"}`` with the PNG bytes decoded."""
        r = self.request("review", session_id=session_id)
        return {"images": [{"name": i["name"], "png": base64.b64decode(i["png_base64"])}
                           for i in r["images"]],
                "validity": r.get("validity"), "summary": r.get("summary", "")}

    def cancel(self, session_id: str, reason: str = "") -> dict:
        return self.request("cancel", session_id=session_id, reason=reason)["session"]

    def retry_handoff(self, session_id: str) -> dict:
        """Send the chosen plan to the TMS again after a failed hand-off (same objects, same
        SOP Instance UIDs; those the TMS confirmed are not sent again)."""
        return self.request("retry-handoff", session_id=session_id)["session"]

    def subscribe(self, room: str | None = None):
        if self.events_endpoint is None:
            raise ConsoleError("no events endpoint configured")
        if self._sub is None:
            self._sub = self._new(zmq.SUB)
            self._sub.connect(self.events_endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, (f"session.{room}" if room else "").encode())
        return self._sub

    def events(self, room: str | None = None, timeout_s: float = 60.0,
               idle_s: float | None = None) -> Iterator[dict]:
        """Yield published events (bounded by ``timeout_s`` overall)."""
        sub = self.subscribe(room)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            wait = min(end - time.monotonic(), idle_s or 1e9)
            if not sub.poll(int(max(wait, 0) * 1000)):
                if idle_s is not None:
                    return
                continue
            frames = sub.recv_multipart()
            try:
                h, _ = decode(frames[1:])
                parse(h, {"event": ConsoleEvent})
            except ProtocolError:
                continue            # not an event of ours: skipped, the stream goes on
            yield h

    def wait_for_state(self, session_id: str, states, timeout_s: float = 60.0,
                       poll_s: float = 0.1) -> dict:
        """Poll status until the session reaches one of ``states`` (bounded)."""
        states = {states} if isinstance(states, str) else set(states)
        end = time.monotonic() + timeout_s
        s = self.session(session_id)
        while s["state"] not in states:
            if time.monotonic() > end:
                raise ConsoleError(f"session {session_id} is {s['state']} after "
                                   f"{timeout_s:g} s (waiting for {sorted(states)})")
            time.sleep(poll_s)
            s = self.session(session_id)
        return s

    def close(self):
        for s in (self._sock, self._sub):
            if s is not None:
                s.close(0)
        self._sock = self._sub = None
