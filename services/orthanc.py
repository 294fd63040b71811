"""A local Orthanc as the treatment management system (TMS): the hand-off target of
``adaptive demo``, of the session benchmark and of the integration tests (one launcher for
all three).

Orthanc cannot bind port 0, so its DICOM and HTTP ports are chosen here: random ports
below the kernel's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``), where
our own services' port-0 sockets and outgoing connections never land, each checked free
just before the launch. Another process may still take one in between (e.g. another
Orthanc started at the same moment): Orthanc then exits logging "already in use", and the
launch is retried on new ports, at most ``attempts`` times. An Orthanc is ready when its
REST API answers with the unique ``Name`` this launch gave it, so an Orthanc of someone
else on the same HTTP port is never taken for ours. Everything listens on 127.0.0.1 only
(``RemoteAccessAllowed`` false); TCP_NODELAY=1 (Nagle makes it 15-60x slower).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adaptive.errors import ServiceError

PORT_CONFLICT_MARKERS = ("already in use", "address in use")
LOWEST_PORT = 10000


@dataclass
class OrthancServer:
    """A running Orthanc started by :func:`start_orthanc`."""

    dicom_port: int
    http_port: int
    aet: str
    name: str
    workdir: Path
    proc: subprocess.Popen
    attempts: int = 1             # launches it took (port conflicts retried)

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def get(self, path: str):
        """GET ``path`` of the REST API; the decoded JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                    timeout=5) as r:
            return json.loads(r.read())

    def post(self, path: str, data: bytes):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def instances_tags(self) -> list[dict]:
        """Simplified tags of every stored instance."""
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_now(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(n: int, rng: random.Random | None = None) -> list[int]:
    """``n`` distinct ports below the ephemeral range that are free at this moment (a
    later bind may still lose a race: callers retry)."""
    rng = rng or random.Random()
    hi = max(LOWEST_PORT + 1000, _ephemeral_low())
    out: list[int] = []
    for _ in range(200 * n):
        p = rng.randrange(LOWEST_PORT, hi)
        if p not in out and _free_now(p):
            out.append(p)
            if len(out) == n:
                return out
    raise ServiceError(f"no free TCP port found in {LOWEST_PORT}-{hi - 1}")


def start_orthanc(workdir: str | Path, *, aet: str = "TMS", extra: dict | None = None,
                  attempts: int = 5, timeout_s: float = 60.0, exe: str | None = None,
                  pick: Callable[[int, random.Random], list[int]] = pick_ports
                  ) -> OrthancServer:
    """Start Orthanc with its storage and log in ``workdir`` and return once its REST API
    answers. ``extra`` is merged into its configuration (e.g. ``DicomModalities``).
    A port conflict is retried on new ports from ``pick`` (at most ``attempts``
    launches); any other failure, or no answer within ``timeout_s`` per launch, raises
    :class:`ServiceError` with the end of Orthanc's log."""
    exe = exe or shutil.which("Orthanc")
    if not exe:
        raise ServiceError("Orthanc is not installed (Debian package 'orthanc')")
    workdir = Path(workdir)
    (workdir / "db").mkdir(parents=True, exist_ok=True)
    rng = random.Random()
    last = ""
    for attempt in range(1, attempts + 1):
        dport, hport = pick(2, rng)
        name = f"adaptive-tms-{uuid.uuid4().hex[:12]}"
        conf = {"Name": name, "DicomAet": aet, "DicomPort": dport, "HttpPort": hport,
                "Plugins": [], "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
                **(extra or {})}
        cf = workdir / "orthanc.json"
        cf.write_text(json.dumps(conf, indent=1))
        with open(workdir / "orthanc.log", "wb") as log:
            proc = subprocess.Popen([exe, str(cf)], stdout=log, stderr=log,
                                    env=dict(os.environ, TCP_NODELAY="1"),
                                    start_new_session=True)
        srv = OrthancServer(dport, hport, aet, name, workdir, proc, attempt)
        if _wait_answering(srv, timeout_s):
            return srv
        srv.stop()
        failed_log = srv.log_path.rename(workdir / f"orthanc-attempt{attempt}.log")
        last = failed_log.read_text(errors="replace")[-2000:]
        if not any(m in last.lower() for m in PORT_CONFLICT_MARKERS):
            raise ServiceError(f"Orthanc did not start (log {failed_log}):\n{last}")
    raise ServiceError(f"Orthanc: port conflict on each of {attempts} launches; last log:\n{last}")


def _wait_answering(srv: OrthancServer, timeout_s: float) -> bool:
    """Bounded wait until ``srv`` answers as itself (True) or exits / times out (False)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if srv.get("/system").get("Name") == srv.name:
                return True
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if srv.proc.poll() is not None:
            return False
        time.sleep(0.1)  # bounded poll: Orthanc opens its ports within about a second
    return False
