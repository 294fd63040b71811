"""Typed, versioned schemas of every message the services exchange over ZeroMQ (pydantic v2).

The wire format (:mod:`services.protocol`) gives a JSON header; these models say what each
message type must hold. Every receiver parses the header with :func:`parse` before acting
on it, so a message with a missing field, a wrong type (a number where a patient ID is
expected, a string where a list is) or an unknown field is refused at the boundary with a
:class:`~services.protocol.ProtocolError` naming the field, instead of reaching the
session logic. Models are strict (no coercion: ``7`` is not a string) and forbid extra
fields, except the gateway's event bodies, which the orchestrator reads by name.

Versions: the header's ``v`` is the wire version (:data:`services.protocol.PROTOCOL_VERSION`);
the console protocol's version is :data:`CONSOLE_PROTOCOL`; stage records carry their own
(:mod:`adaptive.pipeline.records`).

Message families:

* worker <-> broker (:mod:`services.messaging`): ``READY``, ``HEARTBEAT``, ``DISCONNECT``,
  ``TASK``, ``CANCEL``, ``PROGRESS``, ``RESULT``;
* gateway -> orchestrator: ``gateway_event`` (``event`` + ``data``);
* console -> orchestrator: ``request`` (one model per ``cmd``), replies and events.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from services.protocol import ProtocolError, decode

CONSOLE_PROTOCOL = "adaptive-console/1"

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Text = Annotated[str, StringConstraints(max_length=20_000)]
TaskId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class Message(BaseModel):
    """Base of every header: strict types, no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: int = 1
    type: str


# --- worker protocol ----------------------------------------------------------------------


class Ready(Message):
    type: Literal["READY"] = "READY"
    service: Name
    name: Name
    pid: int | None = None
    host: Annotated[str, StringConstraints(max_length=255)] | None = None
    busy: bool = False


class Heartbeat(Message):
    type: Literal["HEARTBEAT"] = "HEARTBEAT"


class Disconnect(Message):
    type: Literal["DISCONNECT"] = "DISCONNECT"


class Task(Message):
    type: Literal["TASK"] = "TASK"
    task_id: TaskId
    service: Name
    payload: dict[str, Any]
    deadline_s: float | None = None
    attempt: int = Field(ge=1)


class Cancel(Message):
    """The broker tells a worker to stop the task it holds (session cancelled, or the
    stage is over its budget and grace): the worker kills the stage and becomes idle."""

    type: Literal["CANCEL"] = "CANCEL"
    task_id: TaskId
    reason: Text = ""


class Progress(Message):
    type: Literal["PROGRESS"] = "PROGRESS"
    task_id: TaskId
    info: dict[str, Any] = Field(default_factory=dict)


class Result(Message):
    type: Literal["RESULT"] = "RESULT"
    task_id: TaskId
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: Text = ""
    error_type: Annotated[str, StringConstraints(max_length=128)] = ""
    traceback: Text = ""
    timings: dict[str, Any] = Field(default_factory=dict)


WORKER_TO_BROKER = {m.model_fields["type"].default: m
                    for m in (Ready, Heartbeat, Disconnect, Progress, Result)}
BROKER_TO_WORKER = {m.model_fields["type"].default: m
                    for m in (Heartbeat, Disconnect, Task, Cancel)}


# --- gateway events ----------------------------------------------------------------------


class GatewayEvent(Message):
    type: Literal["gateway_event"] = "gateway_event"
    event: Name
    data: dict[str, Any]


class SeriesComplete(BaseModel):
    """The body of a ``series_complete`` gateway event, as far as the orchestrator uses it
    (further fields are kept as they are)."""

    model_config = ConfigDict(extra="allow", strict=True)

    patient_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    study_uid: Annotated[str, StringConstraints(max_length=64)] = ""
    series_uid: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    modality: Annotated[str, StringConstraints(max_length=16)] = ""
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    count: int = Field(ge=0)
    series_description: Text = ""
    image_type: list[str] = Field(default_factory=list)
    frame_of_reference_uid: Annotated[str, StringConstraints(max_length=64)] = ""
    t: float | None = None


GATEWAY_TO_ORCHESTRATOR = {"gateway_event": GatewayEvent}


# --- console protocol --------------------------------------------------------------------


class ConsoleRequest(Message):
    type: Literal["request"] = "request"
    request_id: int | str | None = None
    cmd: str


class SessionRef(ConsoleRequest):
    """A request about one session: by ``session_id``, or the latest of ``room``."""

    session_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    room: Annotated[str, StringConstraints(max_length=64)] | None = None


class PingRequest(ConsoleRequest):
    cmd: Literal["ping"]


class StartRequest(ConsoleRequest):
    cmd: Literal["start"]
    room: Any = None            # validated by services.validators (named InvalidIdentifierError)
    patient_id: Any = None
    protocol: Annotated[str, StringConstraints(max_length=64)] | None = None


class StatusRequest(SessionRef):
    cmd: Literal["status", "attach"]


class ChooseRequest(SessionRef):
    cmd: Literal["choose"]
    plan: Annotated[str, StringConstraints(max_length=32)] = ""
    acknowledge: list[Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=list, max_length=64)


class ReviewRequest(SessionRef):
    cmd: Literal["review"]


class CancelRequest(SessionRef):
    cmd: Literal["cancel"]
    reason: Text = ""


class RetryHandoffRequest(SessionRef):
    cmd: Literal["retry-handoff"]


class PlanningDataRequest(ConsoleRequest):
    cmd: Literal["planning_data"]
    patient_id: Annotated[str, StringConstraints(max_length=64)]


class ConsoleReply(Message):
    """The orchestrator's answer to every console request; the command's reply fields
    (``session``, ``sessions``, ``images``, ...) follow as further keys."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    type: Literal["reply"] = "reply"
    ok: bool
    protocol: Literal["adaptive-console/1"] = CONSOLE_PROTOCOL
    request_id: int | str | None = None
    error: str = ""
    error_type: str = ""


class ConsoleEvent(Message):
    """A published event (topic ``session.<room>`` or ``service``)."""

    type: Literal["event"] = "event"
    event: Name
    t: float
    details: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = None
    room: str | None = None
    patient_id: str | None = None
    state: str | None = None


CONSOLE_REQUESTS: dict[str, type[ConsoleRequest]] = {
    "ping": PingRequest, "start": StartRequest, "status": StatusRequest,
    "attach": StatusRequest, "choose": ChooseRequest, "review": ReviewRequest,
    "cancel": CancelRequest, "retry-handoff": RetryHandoffRequest,
    "planning_data": PlanningDataRequest}


def _why(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "message"
        parts.append(f"{where}: {err.get('msg', '')}")
    return "; ".join(parts)


def parse(header: dict, models: dict[str, type[Message]]) -> Message:
    """The typed message of a decoded header (``type`` picks the model); any mismatch is a
    :class:`ProtocolError` naming the field and the rule."""
    model = models.get(header.get("type"))
    if model is None:
        raise ProtocolError(f"unexpected message type {str(header.get('type'))[:40]!r}")
    try:
        return model.model_validate(header)
    except ValidationError as e:
        raise ProtocolError(f"{model.__name__}: {_why(e)}") from None


def decode_message(frames, models: dict[str, type[Message]]) -> tuple[Message, dict]:
    """(typed message, arrays) of received frames: :func:`services.protocol.decode` then
    :func:`parse`; any malformed message is a :class:`ProtocolError`."""
    h, arrays = decode(frames)
    return parse(h, models), arrays


def parse_console(header: dict) -> ConsoleRequest:
    """A console request (model by ``cmd``); :class:`ProtocolError` if malformed."""
    if header.get("type") != "request":
        raise ProtocolError(f"console message type {str(header.get('type'))[:40]!r} is "
                            f"not 'request'")
    cmd = header.get("cmd")
    model = CONSOLE_REQUESTS.get(cmd) if isinstance(cmd, str) else None
    if model is None:
        raise ProtocolError(f"unknown console command {str(cmd)[:40]!r} (known: "
                            f"{', '.join(sorted(CONSOLE_REQUESTS))})")
    try:
        return model.model_validate(header)
    except ValidationError as e:
        raise ProtocolError(f"{cmd}: {_why(e)}") from None


def parse_body(model: type[BaseModel], body: dict, what: str) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise ProtocolError(f"{what}: {_why(e)}") from None
