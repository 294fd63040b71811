"""ZeroMQ protocol and the worker broker: zero-copy arrays, heartbeats, re-issue on death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from services.auth import Authenticator, KeyStore, secure_server
from services.config import write_config_variant
from services.messaging import Worker, WorkerBroker
from services.protocol import ProtocolError, decode, encode
from tests.integration.doubles import array_sum, failing
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent


def test_protocol_roundtrip_zero_copy_and_version():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.ones((2, 2, 2), dtype=">i2")
    frames = encode("X", {"k": 1}, {"a": a, "b": b})
    assert isinstance(frames[1], memoryview)           # the array buffer itself, no copy
    h, arrs = decode([bytes(f) for f in frames])
    assert h["type"] == "X" and h["k"] == 1
    np.testing.assert_array_equal(arrs["a"], a)
    np.testing.assert_array_equal(arrs["b"], b)
    assert arrs["b"].dtype == b.dtype
    bad = frames[0].replace(b'"v":1', b'"v":99')
    with pytest.raises(ProtocolError):
        decode([bad, *frames[1:]])
    with pytest.raises(ProtocolError):
        decode(frames[:2])                              # a frame missing


def _pump(broker, until, timeout=15.0):
    out = []
    end = time.monotonic() + timeout
    poller = zmq.Poller()
    poller.register(broker.sock, zmq.POLLIN)
    while time.monotonic() < end:
        poller.poll(20)
        out += broker.handle_incoming()
        out += broker.tick()
        if until(out):
            break
    return out


def test_tasks_results_progress_and_errors_in_threads():
    # liveness 20 x 0.1 s: no worker is declared dead because a loaded machine was slow
    broker = WorkerBroker("tcp://127.0.0.1:0", heartbeat_interval_s=0.1, liveness=20)
    stop = threading.Event()
    ts = [threading.Thread(target=Worker(broker.endpoint, s, h, heartbeat_interval_s=0.1,
                                         liveness=20, name=f"w{i}").run, args=(stop, 120),
                           daemon=True)
          for i, (s, h) in enumerate([("sum", array_sum), ("sum", array_sum),
                                      ("fail", failing)])]
    for t in ts:
        t.start()
    try:
        # all three announced before any task is submitted, so both sum workers are idle
        # when the two sum tasks arrive (however slowly the threads start)
        _pump(broker, lambda o: len(broker.workers) == 3, timeout=60)
        assert len(broker.workers) == 3
        x = np.random.default_rng(0).normal(size=(64, 64, 8))
        t1 = broker.submit("sum", {"sleep_s": 0.2}, arrays={"x": x})
        t2 = broker.submit("sum", {}, arrays={"y": np.arange(10, dtype=np.int32)})
        t3 = broker.submit("fail", {"why": "no overlap"})
        out = _pump(broker, lambda o: len([r for r in o if r.kind in ("result", "failed")]) == 3,
                    timeout=60)
        res = {r.task.task_id: r for r in out if r.kind in ("result", "failed")}
        assert res[t1.task_id].ok and res[t1.task_id].result["sums"]["x"] == pytest.approx(x.sum())
        np.testing.assert_allclose(res[t1.task_id].arrays["x"], 2 * x)
        assert res[t2.task_id].result["sums"]["y"] == 45.0
        assert res[t1.task_id].timings["run_s"] >= 0.2
        assert {res[t1.task_id].timings["worker"], res[t2.task_id].timings["worker"]} == \
            {"w0", "w1"}                                # both sum workers used
        assert not res[t3.task_id].ok and res[t3.task_id].error_type == "RegistrationError"
        assert "no overlap" in res[t3.task_id].error
        assert any(r.kind == "progress" and r.task.task_id == t1.task_id for r in out)
    finally:
        stop.set()
        for t in ts:
            t.join(5)
        broker.close()


def test_killed_worker_task_is_reissued_to_another(tmp_path):
    cfg = write_config_variant(None, tmp_path / "s.toml", {
        "paths": {"root": str(tmp_path / "var")},
        "orchestrator": {"heartbeat_interval_s": 0.1, "heartbeat_liveness": 10},
        "workers": {"handlers": {"sum": "tests.integration.doubles:array_sum"}}})
    keys = KeyStore(tmp_path / "var")
    keys.ensure_defaults()                 # the workers authenticate with the worker key
    auth = Authenticator(zmq.Context.instance(), keys)
    auth.start()
    server = keys.server_keys()
    broker = WorkerBroker("tcp://127.0.0.1:0", heartbeat_interval_s=0.1, liveness=10,
                          max_attempts=3, secure=lambda s: secure_server(s, server, "workers"))
    env = dict(os.environ, PYTHONPATH=str(REPO), ADAPTIVE_LOG_JSON="1")
    procs = [subprocess.Popen([sys.executable, "-m", "services.workers", "--config", str(cfg),
                               "--endpoint", broker.endpoint, "--service", "sum",
                               "--name", f"p{i}"], cwd=REPO, env=env,
                              stderr=subprocess.DEVNULL)
             for i in range(2)]
    try:
        _pump(broker, lambda o: len(broker.workers) == 2, timeout=120)
        assert len(broker.workers) == 2
        t = broker.submit("sum", {"sleep_s": 1.5}, arrays={"x": np.ones(5)})
        _pump(broker, lambda o: t.worker is not None, timeout=5)
        victim = broker.workers[t.worker].name
        pid = procs[int(victim[1:])].pid
        os.kill(pid, signal.SIGKILL)
        out = _pump(broker, lambda o: any(r.kind in ("result", "failed") for r in o), timeout=60)
        kinds = [r.kind for r in out]
        assert "worker_lost" in kinds and "reissued" in kinds
        res = [r for r in out if r.kind == "result"][0]
        assert res.ok and res.result["sums"]["x"] == 5.0 and res.result["attempt"] == 2
        assert res.result["pid"] != pid and t.attempts == 2
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        broker.close()
        auth.stop()


def test_worker_reconnects_after_broker_restart(tmp_path):
    # The restarted broker must bind the same endpoint: an ipc path of this test's own
    # (a TCP port released and bound again could be taken by another process meanwhile).
    endpoint = f"ipc://{tmp_path / 'broker.sock'}"
    broker = WorkerBroker(endpoint, heartbeat_interval_s=0.1, liveness=10)
    stop = threading.Event()
    w = Worker(endpoint, "sum", array_sum, heartbeat_interval_s=0.1, liveness=10,
               reconnect_max_s=0.4)
    th = threading.Thread(target=w.run, args=(stop, 120), daemon=True)
    th.start()
    try:
        _pump(broker, lambda o: len(broker.workers) == 1, timeout=30)
        broker.close()
        wait_until(lambda: w.reconnects >= 1, 10, "the worker to notice the broker is gone")
        broker = WorkerBroker(endpoint, heartbeat_interval_s=0.1, liveness=10)
        t = broker.submit("sum", {}, arrays={"x": np.arange(4.0)})
        out = _pump(broker, lambda o: any(r.kind == "result" for r in o), timeout=60)
        assert [r for r in out if r.kind == "result"][0].result["sums"]["x"] == 6.0
        assert t.attempts == 1
    finally:
        stop.set()
        th.join(5)
        broker.close()
