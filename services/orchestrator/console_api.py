"""The console API (``docs/console-protocol.md``): typed requests, per-request roles, replies.

Every request gets a reply - a malformed one included (``ok: false``, ``error_type``
``ProtocolError``), so a REQ client never hangs. The sender's role comes from the ZAP
User-Id of its connection (:mod:`services.auth`: ``<role>:<name>``); a command the role may
not send is refused (``NotAuthorizedError``) before anything else is looked at. Identifiers
that become paths or topics (room, patient ID) are validated (:mod:`services.validators`)
before a session exists.
"""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path

from adaptive.errors import AdaptiveError, NotAuthorizedError, ServiceError
from adaptive.log import get_logger
from services import schemas as M
from services.auth import CONSOLE_PERMISSIONS, role_of
from services.messaging import frame_user_id
from services.orchestrator import state as S
from services.orchestrator.protocol import protocol_at_start, protocol_from_plan
from services.orchestrator.session import Session
from services.protocol import ProtocolError, decode, encode, split_routed
from services.validators import require, validate_patient_id, validate_room


class ConsoleApi:
    def __init__(self, orch):
        self.o = orch
        self.log = get_logger("services.console_api")
        self.requests = 0               # console messages answered
        self.unroutable = 0             # console messages without an identity (dropped)

    # -- the socket ---------------------------------------------------------------------
    def on_frames(self, frames) -> None:
        """One message from the console ROUTER (zmq.Frame list): always answered when it
        carries a routable identity."""
        try:
            ident, rest = split_routed(frames)
        except ProtocolError as e:
            self.unroutable += 1
            self.log.warning("bad_console_message", error=str(e))
            return
        req_delim = len(frames) > 2 and frames[1].bytes == b""
        role = role_of(frame_user_id(frames[-1]))
        request_id = None
        try:
            h, _ = decode(rest)
            rid = h.get("request_id")
            request_id = rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) \
                else None
            result = self.handle(h, role)
            reply = {"ok": True, "protocol": M.CONSOLE_PROTOCOL, **result}
        except AdaptiveError as e:
            reply = {"ok": False, "protocol": M.CONSOLE_PROTOCOL, "error": str(e)[:2000],
                     "error_type": type(e).__name__}
        except Exception as e:
            self.log.exception("console_command_error", error=repr(e))
            reply = {"ok": False, "protocol": M.CONSOLE_PROTOCOL, "error": repr(e)[:2000],
                     "error_type": "InternalError"}
        reply["request_id"] = request_id
        try:
            body = encode("reply", reply)
        except (TypeError, ValueError) as e:   # a reply we cannot encode is a bug: say so
            self.log.error("console_reply_unencodable", error=repr(e))
            body = encode("reply", {"ok": False, "protocol": M.CONSOLE_PROTOCOL,
                                    "error": f"reply not encodable: {e!r}"[:2000],
                                    "error_type": "InternalError", "request_id": None})
        out = [ident] + ([b""] if req_delim else []) + body
        self.requests += 1
        self.o.console.send_multipart(out)

    # -- requests -------------------------------------------------------------------------
    def handle(self, h: dict, role: str | None) -> dict:
        """The reply body of request ``h`` from a client with ``role``."""
        if not isinstance(h, dict):
            raise ProtocolError("request is not an object")
        req = M.parse_console({"type": "request", "v": 1, **h})
        allowed = CONSOLE_PERMISSIONS.get(role or "", frozenset())
        if req.cmd not in allowed:
            raise NotAuthorizedError(f"role {role or 'none'!r} may not {req.cmd!r} (allowed: "
                                     f"{', '.join(sorted(allowed)) or 'nothing'})")
        return getattr(self, "cmd_" + req.cmd.replace("-", "_"))(req)

    def cmd_ping(self, req) -> dict:
        return {"workers": self.o.broker.services(), "sessions": len(self.o.sessions)}

    def cmd_start(self, req: M.StartRequest) -> dict:
        o = self.o
        # both become parts of paths and topics (session_id): validated first
        room = require(validate_room, req.room, "room")
        pid = require(validate_patient_id, req.patient_id, "patient_id").strip(" ")
        proto = protocol_at_start(req.protocol)
        for s in o.sessions.values():
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
        planning = o.resolve_planning(pid)
        if proto is None and "rtplan" in planning:  # known now: refuse at once if unmapped
            proto = protocol_from_plan(planning["rtplan"], o.protocols)
        s = Session(session_id=f"{room}-{time.strftime('%Y%m%dT%H%M%S')}-"
                               f"{uuid.uuid4().hex[:6]}", room=room, patient_id=pid,
                    protocol=proto)
        s.history.append({"t": s.created, "from": None, "to": S.WAITING,
                          "note": "session started"})
        o.sessions[s.session_id] = s
        o.publish(s, "session_started", protocol=s.protocol)
        o._maybe_start(s)
        return {"session": s.public(), "attached": False}

    def cmd_status(self, req: M.StatusRequest) -> dict:
        if not req.session_id and not req.room:
            return {"sessions": [s.public() for s in self.o.sessions.values()]}
        return {"session": self.find(req).public()}

    cmd_attach = cmd_status

    def cmd_choose(self, req: M.ChooseRequest) -> dict:
        s = self.find(req)
        self.o.choose(s, req.plan, list(req.acknowledge))
        return {"session": s.public()}

    def cmd_review(self, req: M.ReviewRequest) -> dict:
        return self.review_images(self.find(req))

    def cmd_cancel(self, req: M.CancelRequest) -> dict:
        s = self.find(req)
        self.o.cancel(s, req.reason or "cancelled at the console")
        return {"session": s.public()}

    def cmd_retry_handoff(self, req: M.RetryHandoffRequest) -> dict:
        s = self.find(req)
        self.o.retry_handoff(s)
        return {"session": s.public()}

    def cmd_planning_data(self, req: M.PlanningDataRequest) -> dict:
        return {"planning": self.o.resolve_planning(req.patient_id)}

    # -- helpers -------------------------------------------------------------------------
    def find(self, req: M.SessionRef) -> Session:
        if req.session_id:
            s = self.o.sessions.get(req.session_id)
            if s is None:
                raise ServiceError(f"no session {req.session_id!r}")
            return s
        if req.room:
            cands = [s for s in self.o.sessions.values() if s.room == req.room]
            if not cands:
                raise ServiceError(f"no session in room {req.room!r}")
            return max(cands, key=lambda s: s.created)
        raise ServiceError("request needs session_id or room")

    def review_images(self, s: Session) -> dict:
        """The session's review PNGs (base64) from its registration stage."""
        reg = s.registration or {}
        root = self.o.session_dir(s).resolve()
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
