"""Ready records: how a service process tells its supervisor and its clients where it listens.

A service binds what its config says. An endpoint whose port is ``0`` (or ``*`` for ZeroMQ)
asks for an ephemeral port, which the process binds itself, so no port is ever guessed
and handed over later (the race that made ``Address already in use`` failures). Once a
process listens on every socket it owns, it writes its ready record
``<paths.root>/run/<process>.json`` atomically (temporary file, fsync, rename)::

    {"process": "orchestrator", "pid": 4242, "started_at": 1767254400.0,
     "endpoints": {"worker_endpoint": "tcp://127.0.0.1:41873", ...}}

The record holds the endpoints actually bound: for an explicit port, the configured
endpoint itself; for port 0, the one the kernel gave (ZeroMQ ``LAST_ENDPOINT``, the
DICOM server's ``server_address``). The process removes its record when it stops; a
record left by a killed process is recognised because its pid is no longer alive.

Readers: :class:`services.supervisor.ServiceStack` waits for the record of the pid it
spawned; clients with only the config (``adaptive console``, a standalone worker) use
:func:`orchestrator_endpoint`, which returns the configured endpoint, or reads the
record when the config asks for port 0.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from adaptive.atomic import write_text_atomic
from adaptive.errors import ServiceError

EPHEMERAL_PORTS = ("0", "*")


@dataclass(frozen=True)
class ReadyRecord:
    """What a listening service process publishes about itself (unix time in s)."""

    process: str
    pid: int
    endpoints: dict[str, str | int] = field(default_factory=dict)
    started_at: float = 0.0


def ready_path(root: str | Path, process: str) -> Path:
    return Path(root) / "run" / f"{process}.json"


def write_ready(root: str | Path, process: str, endpoints: dict[str, str | int]) -> Path:
    """Atomically write this process's ready record; returns its path."""
    path = ready_path(root, process)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = ReadyRecord(process=process, pid=os.getpid(), endpoints=dict(endpoints),
                      started_at=time.time())
    return write_text_atomic(path, json.dumps(asdict(rec)), fsync=True)


def read_ready(root: str | Path, process: str) -> ReadyRecord | None:
    """The ready record of ``process`` under ``root``, or None when there is none."""
    path = ready_path(root, process)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ServiceError(f"{path}: unreadable ready record: {e}") from e
    try:
        return ReadyRecord(process=str(d["process"]), pid=int(d["pid"]),
                           endpoints=dict(d["endpoints"]), started_at=float(d["started_at"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ServiceError(f"{path}: malformed ready record: {e!r}") from e


def clear_ready(root: str | Path, process: str, pid: int | None = None) -> None:
    """Remove ``process``'s ready record (only if it belongs to ``pid`` when given)."""
    path = ready_path(root, process)
    try:
        if pid is not None:
            rec = read_ready(root, process)
            if rec is None or rec.pid != pid:
                return
        path.unlink()
    except (FileNotFoundError, ServiceError):
        pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_for_ready(root: str | Path, process: str, pid: int, timeout_s: float,
                   alive: Callable[[], bool], poll_s: float = 0.05) -> ReadyRecord:
    """Bounded wait for the ready record written by ``pid``. Raises :class:`ServiceError`
    when the process dies first (``alive()`` false) or after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        rec = read_ready(root, process)
        if rec is not None and rec.pid == pid:
            return rec
        if not alive():
            raise ServiceError(f"{process} (pid {pid}) exited before it was ready")
        if time.monotonic() > end:
            raise ServiceError(f"{process} (pid {pid}) not ready within {timeout_s:g} s "
                               f"(no {ready_path(root, process)})")
        time.sleep(poll_s)  # bounded poll: the record appears once the process listens


def is_ephemeral(endpoint: str) -> bool:
    """Whether a ``tcp://host:port`` endpoint asks for an ephemeral port (0 or ``*``)."""
    return endpoint.startswith("tcp://") and endpoint.rsplit(":", 1)[-1] in EPHEMERAL_PORTS


def bound_endpoint(configured: str, socket) -> str:
    """The endpoint a ZeroMQ ``socket`` bound from ``configured``: the configured string
    when it names a port, the kernel's choice (``LAST_ENDPOINT``) when it asked for 0."""
    return socket.getsockopt_string(zmq.LAST_ENDPOINT) if is_ephemeral(configured) \
        else configured


def orchestrator_endpoint(cfg, key: str) -> str:
    """The orchestrator endpoint ``key`` (e.g. ``console_endpoint``) of a services config:
    as configured, or, when the config asks for port 0, from the running orchestrator's
    ready record under ``cfg.paths.root``."""
    configured = getattr(cfg.orchestrator, key)
    if not is_ephemeral(configured):
        return configured
    rec = read_ready(cfg.paths.root, "orchestrator")
    where = ready_path(cfg.paths.root, "orchestrator")
    if rec is None:
        raise ServiceError(f"[orchestrator].{key} is {configured!r} (an ephemeral port) and "
                           f"no orchestrator is running: no ready record {where}")
    if not pid_alive(rec.pid):
        raise ServiceError(f"[orchestrator].{key} is {configured!r} (an ephemeral port) and "
                           f"the orchestrator of {where} (pid {rec.pid}) is not running")
    try:
        return str(rec.endpoints[key])
    except KeyError:
        raise ServiceError(f"{where}: no endpoint {key!r}") from None


def endpoint_argument(parser, cfg, key: str, given: str | None) -> str:
    """For a service's command line: ``given`` (its endpoint option), else
    :func:`orchestrator_endpoint`; an unresolvable one ends the process through
    ``parser.error`` (exit status 2, the reason on stderr)."""
    try:
        return given or orchestrator_endpoint(cfg, key)
    except ServiceError as e:
        parser.error(str(e))
