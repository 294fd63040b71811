"""Ready records (services/ready.py) and processes that bind port 0 and report the port
they got: the orchestrator's four ZeroMQ sockets and the gateway's DICOM server, checked
by connecting to what they report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from adaptive.errors import AuthenticationError, ServiceError
from services import config as C
from services.auth import KeyStore
from services.console import ConsoleClient
from services.orthanc import pick_ports
from services.ready import (
    bound_endpoint,
    clear_ready,
    is_ephemeral,
    orchestrator_endpoint,
    read_ready,
    ready_path,
    wait_for_ready,
    write_ready,
)

REPO = Path(__file__).resolve().parent.parent


def test_record_written_atomically_read_and_cleared_by_owner(tmp_path):
    p = write_ready(tmp_path, "orchestrator", {"console_endpoint": "tcp://127.0.0.1:5"})
    assert p == tmp_path / "run" / "orchestrator.json"
    assert [q.name for q in p.parent.iterdir()] == ["orchestrator.json"]   # no temp left
    d = json.loads(p.read_text())
    assert d["pid"] == os.getpid() and d["endpoints"] == {"console_endpoint": "tcp://127.0.0.1:5"}
    rec = read_ready(tmp_path, "orchestrator")
    assert rec.pid == os.getpid() and rec.endpoints["console_endpoint"] == "tcp://127.0.0.1:5"
    clear_ready(tmp_path, "orchestrator", pid=os.getpid() + 1)         # not its owner
    assert p.exists()
    clear_ready(tmp_path, "orchestrator", pid=os.getpid())
    assert not p.exists() and read_ready(tmp_path, "orchestrator") is None
    p.write_text("{not json")
    with pytest.raises(ServiceError, match="unreadable"):
        read_ready(tmp_path, "orchestrator")


def test_wait_for_ready_needs_the_spawned_pid_and_stops_when_it_dies(tmp_path):
    write_ready(tmp_path, "gateway", {"port": 1})            # a record of another pid
    with pytest.raises(ServiceError, match="exited before it was ready"):
        wait_for_ready(tmp_path, "gateway", os.getpid() + 1, 30, alive=lambda: False)
    with pytest.raises(ServiceError, match="not ready within"):
        wait_for_ready(tmp_path, "gateway", os.getpid() + 1, 0.2, alive=lambda: True)
    assert wait_for_ready(tmp_path, "gateway", os.getpid(), 1, alive=lambda: True).pid == \
        os.getpid()


def test_ephemeral_endpoints_and_what_a_socket_reports():
    assert is_ephemeral("tcp://127.0.0.1:0") and is_ephemeral("tcp://127.0.0.1:*")
    assert not is_ephemeral("tcp://127.0.0.1:5757") and not is_ephemeral("ipc:///tmp/x:0")
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        a.bind("tcp://127.0.0.1:0")
        got = bound_endpoint("tcp://127.0.0.1:0", a)
        port = int(got.rsplit(":", 1)[1])
        assert got.startswith("tcp://127.0.0.1:") and port > 0
        b.connect(got)                                        # the reported one works
        b.send(b"x")
        assert a.poll(10_000) and a.recv() == b"x"
        assert bound_endpoint("tcp://127.0.0.1:5757", a) == "tcp://127.0.0.1:5757"
    finally:
        a.close(0)
        b.close(0)


def test_client_endpoint_from_config_or_running_orchestrators_record(tmp_path):
    explicit = C.write_config_variant(None, tmp_path / "a.toml", {
        "paths": {"root": str(tmp_path / "a")}})
    cfg = C.load_services_config(explicit)
    assert orchestrator_endpoint(cfg, "console_endpoint") == cfg.orchestrator.console_endpoint
    cfg = C.load_services_config(C.write_local_config(tmp_path / "b", tms_port=4242))
    assert is_ephemeral(cfg.orchestrator.console_endpoint) and cfg.gateway.port == 0
    with pytest.raises(ServiceError, match="no orchestrator is running"):
        orchestrator_endpoint(cfg, "console_endpoint")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = write_ready(cfg.paths.root, "orchestrator",
                       {"console_endpoint": "tcp://127.0.0.1:41000"})
    d = json.loads(path.read_text())
    path.write_text(json.dumps(dict(d, pid=dead.pid)))         # left by a killed process
    with pytest.raises(ServiceError, match="is not running"):
        ConsoleClient.from_config(cfg)
    write_ready(cfg.paths.root, "orchestrator", {"console_endpoint": "tcp://127.0.0.1:41000",
                                                 "console_events_endpoint": "tcp://127.0.0.1:41001"})
    with pytest.raises(AuthenticationError, match="console.key_secret"):
        ConsoleClient.from_config(cfg)              # no key: no client (services.auth)
    KeyStore(cfg.paths.root).ensure_defaults()
    cl = ConsoleClient.from_config(cfg)
    assert (cl.endpoint, cl.events_endpoint) == ("tcp://127.0.0.1:41000",
                                                 "tcp://127.0.0.1:41001")


def _spawn(args, tmp_path, name):
    env = dict(os.environ, PYTHONPATH=str(REPO), ADAPTIVE_LOG_JSON="1")
    with open(tmp_path / f"{name}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                                stdout=log, stderr=log, start_new_session=True)


def _stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_orchestrator_and_gateway_bind_port_zero_and_report_real_endpoints(tmp_path):
    """Both processes told port 0: each reports real ports in its ready record; a console
    request, a gateway event and a DICOM C-ECHO reach them there; both remove their
    records on SIGTERM."""
    cfg_path = C.write_local_config(tmp_path, tms_port=4242)
    cfg = C.load_services_config(cfg_path)
    # a gateway started first cannot know where to send its events: a clear refusal
    early = _spawn(["services.gateway", "--config", str(cfg_path)], tmp_path, "early")
    assert early.wait(120) == 2
    assert "no orchestrator is running" in (tmp_path / "early.log").read_text()
    orch = _spawn(["services.orchestrator", "--config", str(cfg_path)], tmp_path, "orch")
    gw = None
    try:
        o = wait_for_ready(cfg.paths.root, "orchestrator", orch.pid, 120,
                           alive=lambda: orch.poll() is None)
        eps = o.endpoints
        assert set(eps) == {"worker_endpoint", "gateway_events_endpoint", "console_endpoint",
                            "console_events_endpoint"}
        ports = {int(str(v).rsplit(":", 1)[1]) for v in eps.values()}
        assert len(ports) == 4 and 0 not in ports
        # the gateway finds the orchestrator through the record (config says port 0)
        gw = _spawn(["services.gateway", "--config", str(cfg_path)], tmp_path, "gw")
        g = wait_for_ready(cfg.paths.root, "gateway", gw.pid, 120,
                           alive=lambda: gw.poll() is None)
        assert g.endpoints["host"] == "127.0.0.1" and g.endpoints["port"] > 0
        ae = AE(ae_title="ADAPTIVE_SUPERV")          # a verification peer of the config
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", g.endpoints["port"], ae_title="ADAPTIVE_GW")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        cl = ConsoleClient.from_config(cfg, timeout_s=30)
        assert cl.request("ping")["workers"] == {}
        cl.close()
    finally:
        for p in (gw, orch):
            if p is not None:
                _stop(p)
    assert orch.returncode == 0 and gw.returncode == 0
    assert not ready_path(cfg.paths.root, "orchestrator").exists()
    assert not ready_path(cfg.paths.root, "gateway").exists()


def _explicit_config(tmp_path, name, port):
    return C.write_config_variant(None, tmp_path / f"{name}.toml", {
        "paths": {"root": str(tmp_path / name)},
        "orchestrator": {"worker_endpoint": f"tcp://127.0.0.1:{port}",
                         "gateway_events_endpoint": "tcp://127.0.0.1:0",
                         "console_endpoint": "tcp://127.0.0.1:0",
                         "console_events_endpoint": "tcp://127.0.0.1:0"}})


def test_explicit_port_taken_is_a_clear_start_up_failure(tmp_path):
    """A production-style explicit port already in use: the orchestrator exits naming
    it (no silent move to another port) and writes no ready record."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg_path = _explicit_config(tmp_path, "taken", s.getsockname()[1])
        orch = _spawn(["services.orchestrator", "--config", str(cfg_path)], tmp_path, "o1")
        with pytest.raises(ServiceError, match="exited before it was ready"):
            wait_for_ready(tmp_path / "taken", "orchestrator", orch.pid, 120,
                           alive=lambda: orch.poll() is None)
    assert "Address already in use" in (tmp_path / "o1.log").read_text()
    assert read_ready(tmp_path / "taken", "orchestrator") is None


def test_explicit_port_is_bound_and_reported_as_configured(tmp_path):
    # A free explicit port (below the ephemeral range, services/orthanc.pick_ports); were
    # it taken between the check and the bind, the start-up fails (previous test) and a
    # new port is tried: at most 3 attempts.
    for attempt in range(3):
        port = pick_ports(1)[0]
        cfg_path = _explicit_config(tmp_path, f"free{attempt}", port)
        orch = _spawn(["services.orchestrator", "--config", str(cfg_path)], tmp_path,
                      f"o{attempt}")
        try:
            o = wait_for_ready(tmp_path / f"free{attempt}", "orchestrator", orch.pid, 120,
                               alive=lambda p=orch: p.poll() is None)
        except ServiceError:
            assert "Address already in use" in (tmp_path / f"o{attempt}.log").read_text()
            continue
        finally:
            _stop(orch)
        assert o.endpoints["worker_endpoint"] == f"tcp://127.0.0.1:{port}"
        assert is_ephemeral(C.load_services_config(cfg_path).orchestrator.console_endpoint)
        assert not o.endpoints["console_endpoint"].endswith(":0")
        return
    pytest.fail("three explicit ports in a row were taken")


def test_stack_refuses_a_root_whose_orchestrator_is_running(tmp_path):
    """Two stacks on one var root would overwrite each other's ready records: the second
    start is refused while the first's process lives; a dead one's record is replaced."""
    from services.supervisor import ServiceStack

    cfg_path = C.write_local_config(tmp_path, tms_port=4242)
    root = C.load_services_config(cfg_path).paths.root
    write_ready(root, "orchestrator", {"console_endpoint": "tcp://127.0.0.1:41000"})  # alive
    st = ServiceStack(cfg_path)
    with pytest.raises(ServiceError, match="already running"):
        st.start(timeout_s=60)
    assert st.orchestrator.popen is None                        # nothing was started
    assert read_ready(root, "orchestrator").pid == os.getpid()   # and nothing removed
