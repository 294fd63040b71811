"""Start, watch and stop the service processes on one machine (``adaptive serve``).

Processes: the gateway, the orchestrator and ``[workers]`` workers per service, each a
separate Python process whose stderr (structlog JSON) goes to ``<root>/logs/<name>.log``.
A worker that dies is restarted (at most ``max_restarts`` times per slot); the
orchestrator re-issues its task. ``stop()`` sends SIGTERM, waits, then SIGKILLs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from adaptive.errors import ServiceError
from adaptive.log import get_logger
from services.config import load_services_config

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen | None = None
    restarts: int = 0
    restartable: bool = False


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
        self.log_dir = self.cfg.paths.root / "logs"
        self.log = get_logger("services.supervisor")
        cfgargs = ["--config", self.config_path] if self.config_path else []
        self.procs: list[Proc] = [
            Proc("orchestrator", [sys.executable, "-m", "services.orchestrator", *cfgargs,
                                  *(["--budgets", self.budgets_path] if self.budgets_path
                                    else [])]),
            Proc("gateway", [sys.executable, "-m", "services.gateway", *cfgargs])]
        counts = worker_counts or self.cfg.workers.counts
        for service, n in counts.items():
            for i in range(n):
                self.procs.append(Proc(f"worker-{service}-{i}",
                                       [sys.executable, "-m", "services.workers", *cfgargs,
                                        "--service", service, "--name", f"{service}-{i}"],
                                       restartable=True))

    def _spawn(self, p: Proc) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_dir / f"{p.name}.log", "ab")
        p.popen = subprocess.Popen(p.argv, cwd=os.getcwd(), env=self.env, stdout=logf,
                                   stderr=logf, start_new_session=True)
        logf.close()
        self.log.info("process_started", name=p.name, pid=p.popen.pid)

    def start(self) -> None:
        for p in self.procs:
            self._spawn(p)

    def pid(self, name: str) -> int:
        for p in self.procs:
            if p.name == name and p.popen is not None:
                return p.popen.pid
        raise ServiceError(f"no process {name!r}")

    def poll(self) -> None:
        """Restart dead workers; raise if the gateway or the orchestrator died."""
        for p in self.procs:
            rc = p.popen.poll() if p.popen else None
            if rc is None:
                continue
            if not p.restartable:
                raise ServiceError(f"{p.name} exited with code {rc}; see "
                                   f"{self.log_dir / (p.name + '.log')}")
            if p.restarts >= self.cfg.workers.max_restarts:
                continue
            p.restarts += 1
            self.log.warning("worker_restarting", name=p.name, exit_code=rc,
                             restart=p.restarts)
            self._spawn(p)

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """Bounded wait until the orchestrator answers and every configured worker
        service has its workers connected; returns the ping reply."""
        from services.console import ConsoleClient, ConsoleError

        want = {s: n for s, n in self.cfg.workers.counts.items() if n}
        cl = ConsoleClient(self.cfg.orchestrator.console_endpoint, timeout_s=1.0)
        end = time.monotonic() + timeout_s
        try:
            while time.monotonic() < end:
                self.poll()
                try:
                    r = cl.request("ping")
                    if (all(r["workers"].get(s, 0) >= n for s, n in want.items())
                            and self._gateway_listening()):
                        return r
                except ConsoleError:
                    pass
                time.sleep(0.2)
        finally:
            cl.close()
        raise ServiceError(f"services not ready within {timeout_s:g} s (logs: {self.log_dir})")

    def _gateway_listening(self) -> bool:
        """Whether the DICOM gateway answers a C-ECHO yet (it starts in its own process;
        until it listens, an imaging system's association would be refused). A real
        Verification association, so the gateway sees a normal release, not an abort."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        g = self.cfg.gateway
        ae = AE(ae_title="ADAPTIVE_SUPERV")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 2.0
        try:
            assoc = ae.associate(g.host, g.port, ae_title=g.ae_title)
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
        self.log.info("services_stopped")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
