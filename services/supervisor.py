"""Start, watch and stop the service processes on one machine (``adaptive serve``).

Processes: the orchestrator, the gateway and ``[workers]`` workers per service, each a
separate Python process whose stderr (structlog JSON) goes to ``<root>/logs/<name>.log``.
Start order: the orchestrator first; once its ready record (:mod:`services.ready`) says
where it listens, the gateway and the workers, given the orchestrator's real endpoints on
their command lines; then the gateway's ready record gives its DICOM port. So a config
may ask for port 0 everywhere (tests, ``adaptive demo``, benchmarks): every process binds
an ephemeral port itself and :attr:`ServiceStack.endpoints` reports the real ones (once
started, :attr:`ServiceStack.cfg` holds them too).
Any process that dies is restarted by :meth:`ServiceStack.poll` (``adaptive serve`` calls it
twice a second), at most ``[workers].max_restarts`` times per process, after a backoff that
doubles from :data:`RESTART_BACKOFF_S` (logged ``process_restarting``): a worker (the
orchestrator re-issues its task), the gateway (on the same DICOM port; every acknowledged
instance is on disk), the orchestrator (on the same endpoints, so the gateway, the workers
and the consoles reconnect by themselves; it recovers its sessions from its store). Only
when a process has used up its restarts does ``poll`` raise and ``serve`` stop.
``stop()`` sends SIGTERM, waits, then SIGKILLs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from adaptive.errors import ServiceError
from adaptive.log import get_logger
from services.auth import KeyStore
from services.config import load_services_config
from services.console import ConsoleClient, ConsoleError
from services.ready import (
    ReadyRecord,
    clear_ready,
    pid_alive,
    read_ready,
    ready_path,
    wait_for_ready,
)

REPO = Path(__file__).resolve().parent.parent


RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 8.0


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float | None = None      # monotonic time of the pending restart
    extra: list[str] = field(default_factory=list)   # arguments added for restarts


@dataclass(frozen=True)
class ServiceEndpoints:
    """Where the running services listen (as bound, from their ready records)."""

    gateway_ae_title: str
    gateway_host: str
    gateway_port: int
    worker: str                # orchestrator ROUTER for workers
    gateway_events: str        # orchestrator PULL for gateway events
    console: str               # orchestrator ROUTER for console requests
    console_events: str        # orchestrator PUB of console events

    @classmethod
    def from_records(cls, orch: ReadyRecord, gw: ReadyRecord) -> ServiceEndpoints:
        o, g = orch.endpoints, gw.endpoints
        return cls(gateway_ae_title=str(g["ae_title"]), gateway_host=str(g["host"]),
                   gateway_port=int(g["port"]), worker=str(o["worker_endpoint"]),
                   gateway_events=str(o["gateway_events_endpoint"]),
                   console=str(o["console_endpoint"]),
                   console_events=str(o["console_events_endpoint"]))


class ServiceStack:
    def __init__(self, config: str | Path | None = None, budgets: str | Path | None = None, *,
                 env: dict | None = None, worker_counts: dict | None = None):
        self.config_path = str(config) if config else None
        self.cfg = load_services_config(config)
        self.budgets_path = str(budgets) if budgets else None
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("TCP_NODELAY", "1")
        self.env["ADAPTIVE_LOG_JSON"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.root = self.cfg.paths.root
        self.keys = KeyStore(self.root)
        self.log_dir = self.root / "logs"
        self.log = get_logger("services.supervisor")
        self._endpoints: ServiceEndpoints | None = None
        cfgargs = ["--config", self.config_path] if self.config_path else []
        self.orchestrator = Proc("orchestrator", [
            sys.executable, "-m", "services.orchestrator", *cfgargs,
            *(["--budgets", self.budgets_path] if self.budgets_path else [])])
        self.gateway = Proc("gateway", [sys.executable, "-m", "services.gateway", *cfgargs])
        self.workers: list[Proc] = []
        self.worker_counts = dict(worker_counts or self.cfg.workers.counts)
        for service, n in self.worker_counts.items():
            for i in range(n):
                self.workers.append(Proc(f"worker-{service}-{i}",
                                         [sys.executable, "-m", "services.workers", *cfgargs,
                                          "--service", service, "--name", f"{service}-{i}"]))
        self.procs: list[Proc] = [self.orchestrator, self.gateway, *self.workers]

    @property
    def endpoints(self) -> ServiceEndpoints:
        """The endpoints the running services bound (after :meth:`start`)."""
        if self._endpoints is None:
            raise ServiceError("services not started: no endpoints yet")
        return self._endpoints

    def console_client(self, timeout_s: float = 5.0, key: str = "console") -> ConsoleClient:
        """A console client connected to the running orchestrator's real endpoints, with
        the key named ``key`` (default ``console``: a therapist)."""
        e = self.endpoints
        return ConsoleClient(e.console, e.console_events, timeout_s=timeout_s,
                             keys=self.keys.client_keys(key))

    def _spawn(self, p: Proc) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_dir / f"{p.name}.log", "ab")
        p.popen = subprocess.Popen(p.argv + p.extra, cwd=os.getcwd(), env=self.env,
                                   stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        self.log.info("process_started", name=p.name, pid=p.popen.pid)

    def _await_record(self, p: Proc, timeout_s: float) -> ReadyRecord:
        try:
            return wait_for_ready(self.root, p.name, p.popen.pid, timeout_s,
                                  alive=lambda: p.popen.poll() is None)
        except ServiceError as e:
            raise ServiceError(f"{e}; see {self.log_dir / (p.name + '.log')}: "
                               f"{self._log_tail(p)}") from None

    def _log_tail(self, p: Proc, n: int = 1500) -> str:
        try:
            return (self.log_dir / f"{p.name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self, timeout_s: float = 60.0) -> ServiceEndpoints:
        """Start the orchestrator, wait for its ready record, start the gateway and the
        workers with its real endpoints, wait for the gateway's ready record. Returns the
        endpoints (also :attr:`endpoints`). Bounded by ``timeout_s`` per ready record."""
        if self.orchestrator.popen is not None:
            raise ServiceError("services already started")
        for name in ("orchestrator", "gateway"):
            rec = read_ready(self.root, name)
            if rec is not None and pid_alive(rec.pid):
                raise ServiceError(f"a {name} (pid {rec.pid}) is already running with "
                                   f"{ready_path(self.root, name)}; stop it first")
            clear_ready(self.root, name)        # a record left by a killed earlier run
        self.keys.ensure_defaults()             # CURVE keys of every process (services.auth)
        try:
            self._spawn(self.orchestrator)
            orch = self._await_record(self.orchestrator, timeout_s)
            self.gateway.argv += ["--events-endpoint",
                                  str(orch.endpoints["gateway_events_endpoint"])]
            for w in self.workers:
                w.argv += ["--endpoint", str(orch.endpoints["worker_endpoint"])]
            for p in (self.gateway, *self.workers):
                self._spawn(p)
            gw = self._await_record(self.gateway, timeout_s)
        except BaseException:
            self.stop()                          # nothing started here outlives a failed start
            raise
        self._endpoints = e = ServiceEndpoints.from_records(orch, gw)
        # a restarted orchestrator binds the same endpoints, a restarted gateway the same port
        self.orchestrator.extra = [a for k, v in orch.endpoints.items()
                                   for a in ("--bind", f"{k}={v}")]
        self.gateway.extra = ["--port", str(e.gateway_port)]
        # from now on cfg describes the running services: the endpoints as bound
        self.cfg = replace(self.cfg, gateway=replace(self.cfg.gateway, port=e.gateway_port),
                           orchestrator=replace(
                               self.cfg.orchestrator, worker_endpoint=e.worker,
                               gateway_events_endpoint=e.gateway_events,
                               console_endpoint=e.console,
                               console_events_endpoint=e.console_events))
        self.log.info("services_listening", **{k: str(v) for k, v in
                                                vars(self._endpoints).items()})
        return self._endpoints

    def pid(self, name: str) -> int:
        for p in self.procs:
            if p.name == name and p.popen is not None:
                return p.popen.pid
        raise ServiceError(f"no process {name!r}")

    def poll(self) -> None:
        """Restart dead processes (bounded, with backoff); raise :class:`ServiceError` when
        one has used up its ``max_restarts``."""
        now = time.monotonic()
        for p in self.procs:
            rc = p.popen.poll() if p.popen else None
            if rc is None:
                continue
            if p.restarts >= self.cfg.workers.max_restarts:
                raise ServiceError(f"{p.name} exited with code {rc} after {p.restarts} "
                                   f"restart(s); see {self.log_dir / (p.name + '.log')}")
            if p.restart_at is None:
                delay = min(RESTART_BACKOFF_S * 2 ** p.restarts, RESTART_BACKOFF_MAX_S)
                p.restart_at = now + delay
                self.log.warning("process_restarting", name=p.name, exit_code=rc,
                                 restart=p.restarts + 1, in_s=delay)
                continue
            if now < p.restart_at:
                continue
            p.restarts += 1
            p.restart_at = None
            if p in (self.orchestrator, self.gateway):
                clear_ready(self.root, p.name, pid=p.popen.pid)
            self._spawn(p)

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """Bounded wait until the orchestrator answers, every configured worker service
        has its workers connected and the gateway answers a C-ECHO at its real port;
        returns the ping reply."""
        want = {s: n for s, n in self.worker_counts.items() if n}
        cl = ConsoleClient(self.endpoints.console, timeout_s=1.0,
                           keys=self.keys.client_keys("viewer"))
        end = time.monotonic() + timeout_s
        try:
            while time.monotonic() < end:
                self.poll()
                try:
                    r = cl.request("ping")
                    if (all(r["workers"].get(s, 0) >= n for s, n in want.items())
                            and self._gateway_answers()):
                        return r
                except ConsoleError:
                    pass
                time.sleep(0.2)  # bounded poll: workers warm up, then announce READY
        finally:
            cl.close()
        raise ServiceError(f"services not ready within {timeout_s:g} s (logs: {self.log_dir})")

    def _gateway_answers(self) -> bool:
        """Whether the DICOM gateway answers a C-ECHO from ``ADAPTIVE_SUPERV`` (its ready
        record says it listens; this checks the whole DICOM stack end to end). A real
        Verification association, so the gateway sees a normal release, not an abort."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        e = self.endpoints
        ae = AE(ae_title="ADAPTIVE_SUPERV")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5.0
        try:
            assoc = ae.associate(e.gateway_host, e.gateway_port, ae_title=e.gateway_ae_title)
        except OSError:
            return False
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and status.Status == 0x0000
        finally:
            assoc.release()

    def stop(self, timeout_s: float = 10.0) -> None:
        for p in reversed(self.procs):
            if p.popen and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout_s
        for p in self.procs:
            if p.popen is None:
                continue
            try:
                p.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("process_killed", name=p.name, pid=p.popen.pid)
                p.popen.kill()
                p.popen.wait(5)
        for p in (self.orchestrator, self.gateway):
            if p.popen is not None:
                clear_ready(self.root, p.name, pid=p.popen.pid)
        self.log.info("services_stopped")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
