"""Process hygiene (issue 13 item 9 and CANCEL): every compute child dies with its worker, and
a cancelled task stops its compute and leaves the worker idle.

The helper all forks go through (:func:`adaptive.forked.call_in_child`: the services' stage
child and the registration's B-spline grandchild) is checked directly, then through a real
worker process: a task whose stage child forks a grandchild (as the registration does), the
worker killed with SIGKILL mid-stage, and no descendant left (measured before the fix: the
B-spline grandchild survived its killed worker, 660 MB for over 10 minutes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from adaptive.errors import ChildCancelledError, ChildDiedError, ChildTimeoutError
from adaptive.forked import ChildError, call_in_child, start_in_child
from services.auth import Authenticator, KeyStore, secure_server
from services.config import write_config_variant
from services.messaging import WorkerBroker
from services.ready import pid_alive
from tests.integration.doubles import _sleeper
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent


def _square(x, progress=None):
    if progress is not None:
        progress("squaring", 0.5, x=x)
    return x * x


def _raise(msg):
    raise ValueError(msg)


def _die():
    os._exit(3)


def test_call_in_child_result_progress_error_timeout_cancel(tmp_path):
    seen = []
    assert call_in_child(_square, (7,), on_progress=lambda *a, **k: seen.append((a, k))) == 49
    assert seen == [(("squaring", 0.5), {"x": 7})]
    with pytest.raises(ChildError, match="ValueError: bad input") as e:
        call_in_child(_raise, ("bad input",))
    assert e.value.type_name == "ValueError" and "Traceback" in e.value.tb
    with pytest.raises(ChildDiedError, match="exit code 3"):
        call_in_child(_die)
    pids = []
    with pytest.raises(ChildTimeoutError):
        call_in_child(_sleeper, (60.0, str(tmp_path / "t.pid")), timeout_s=1.0,
                      on_start=pids.append)
    assert not pid_alive(pids[0])                 # killed at the deadline, and reaped
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()      # cancelled from another thread
    with pytest.raises(ChildCancelledError):
        call_in_child(_sleeper, (60.0, str(tmp_path / "c.pid")), cancelled=cancel,
                      on_start=pids.append)
    assert not pid_alive(pids[1])


def _wait_for_file_then_square(path, x):
    end = time.monotonic() + 30.0
    while not Path(path).exists() and time.monotonic() < end:
        time.sleep(0.01)
    return x * x if Path(path).exists() else None


def test_start_in_child_runs_beside_the_parent_until_result(tmp_path):
    """start_in_child returns while the child works: here the child can only finish after
    the parent did something (created a file); result() then gives its value. An error comes
    back as ChildError, and result() leaves no child behind."""
    flag = tmp_path / "go"
    run = start_in_child(_wait_for_file_then_square, (str(flag), 9))
    assert pid_alive(run.pid)
    flag.write_text("parent's turn done")
    assert run.result(timeout_s=30.0) == 81
    assert not pid_alive(run.pid)
    bad = start_in_child(_raise, ("no disk",))
    with pytest.raises(ChildError, match="ValueError: no disk"):
        bad.result(timeout_s=30.0)
    assert not pid_alive(bad.pid)


@pytest.fixture
def tree_worker(tmp_path):
    """A broker (CURVE, as in the orchestrator) and one real worker process serving
    'tree' (tests.integration.doubles.forked_tree)."""
    root = tmp_path / "var"
    cfg = write_config_variant(None, tmp_path / "s.toml", {
        "paths": {"root": str(root)},
        "orchestrator": {"heartbeat_interval_s": 0.1, "heartbeat_liveness": 20},
        "workers": {"handlers": {"tree": "tests.integration.doubles:forked_tree"}}})
    keys = KeyStore(root)
    keys.ensure_defaults()
    ctx = zmq.Context()
    auth = Authenticator(ctx, keys)
    auth.start()
    server = keys.server_keys()
    broker = WorkerBroker("tcp://127.0.0.1:0", heartbeat_interval_s=0.1, liveness=20,
                          context=ctx, secure=lambda s: secure_server(s, server, "workers"))
    env = dict(os.environ, PYTHONPATH=str(REPO), ADAPTIVE_LOG_JSON="1")
    proc = subprocess.Popen([sys.executable, "-m", "services.workers", "--config", str(cfg),
                             "--endpoint", broker.endpoint, "--service", "tree",
                             "--name", "tree-0"], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        _pump(broker, lambda o: broker.workers, 120)
        assert broker.workers, "worker did not announce itself"
        yield broker, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        broker.close()
        auth.stop()
        ctx.term()


def _pump(broker, until, timeout_s):
    out = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        broker.sock.poll(20)
        out += broker.handle_incoming()
        out += broker.tick()
        if until(out):
            break
    return out


def _pids(d: Path) -> dict[str, int]:
    got = {n: d / n for n in ("child", "grandchild")}
    if not all(p.is_file() and p.read_text() for p in got.values()):
        return {}
    return {n: int(p.read_text()) for n, p in got.items()}


def test_cancel_kills_the_stage_and_the_worker_takes_the_next_task(tree_worker, tmp_path):
    broker, proc = tree_worker
    d = tmp_path / "pids-cancel"
    d.mkdir()
    t = broker.submit("tree", {"seconds": 120, "pid_dir": str(d)})
    pids = wait_until(lambda: (_pump(broker, lambda o: True, 0.05), _pids(d))[1], 60,
                      "the stage child and its grandchild")
    assert all(pid_alive(p) for p in pids.values())
    broker.cancel(t.task_id, "test: session cancelled")
    wait_until(lambda: (_pump(broker, lambda o: True, 0.05),
                        not any(pid_alive(p) for p in pids.values()))[1], 30,
               "the cancelled stage's processes to end")
    # the worker is idle again: the next task is dispatched to it and completes
    d2 = tmp_path / "pids-next"
    d2.mkdir()
    t2 = broker.submit("tree", {"seconds": 0, "pid_dir": str(d2)})
    out = _pump(broker, lambda o: any(r.kind in ("result", "failed") for r in o), 60)
    res = [r for r in out if r.kind in ("result", "failed")]
    assert res and res[0].task.task_id == t2.task_id and res[0].ok, res
    assert proc.poll() is None and not t.attempts > 1


def test_killed_worker_leaves_no_descendant(tree_worker, tmp_path):
    broker, proc = tree_worker
    d = tmp_path / "pids-kill"
    d.mkdir()
    broker.submit("tree", {"seconds": 120, "pid_dir": str(d)})
    pids = wait_until(lambda: (_pump(broker, lambda o: True, 0.05), _pids(d))[1], 60,
                      "the stage child and its grandchild")
    assert all(pid_alive(p) for p in pids.values())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 10,
               f"no descendant of the killed worker left ({pids})")


def test_a_childs_adaptive_error_comes_back_as_its_own_class():
    from adaptive.errors import RegistrationError

    got = ChildError("RegistrationError", "diverged", "tb").as_adaptive_error("stage: ")
    assert type(got) is RegistrationError and str(got) == "stage: diverged"
    assert ChildError("ValueError", "bad", "tb").as_adaptive_error() is None
    assert ChildError("NoSuchError", "bad", "tb").as_adaptive_error() is None
