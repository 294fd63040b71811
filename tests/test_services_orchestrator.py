"""Session state machine, config loading, and `adaptive serve` start/stop."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptive.errors import ConfigError, IllegalTransitionError
from services import config as C
from services.orchestrator import state as S
from services.ready import pid_alive

REPO = Path(__file__).resolve().parent.parent


def test_allowed_and_illegal_transitions():
    path = [S.WAITING, S.REGISTERING, S.PLANNING, S.AWAITING, S.HANDING_OFF, S.HANDED_OFF]
    for a, b in itertools.pairwise(path):
        S.check_transition(a, b)
    S.check_transition(S.PLANNING, S.FALLBACK)
    S.check_transition(S.FALLBACK, S.HANDING_OFF)
    for a, b in [(S.WAITING, S.PLANNING), (S.REGISTERING, S.AWAITING),
                 (S.HANDING_OFF, S.CANCELLED), (S.HANDED_OFF, S.FAILED),
                 (S.CANCELLED, S.WAITING), (S.AWAITING, S.PLANNING)]:
        with pytest.raises(IllegalTransitionError):
            S.check_transition(a, b)
    for t in S.TERMINAL:
        assert not S.ALLOWED[t]


def test_config_rejects_typos_and_bad_values(tmp_path):
    cfg = C.load_services_config()
    assert cfg.gateway.fsync in C.FSYNC_POLICIES and cfg.tms.retries >= 0
    b = C.load_budgets()
    assert b.end_to_end_s >= b.registration.budget_s
    for over, msg in [({"gateway": {"idle_timout_s": 1}}, "unknown key"),
                      ({"gateway": {"fsync": "sometimes"}}, "fsync"),
                      ({"tms": {"ae_title": "X" * 17}}, "AE title"),
                      ({"workers": {"handlers": {"planning": "nocolon"}}}, "module:function")]:
        p = C.write_config_variant(None, tmp_path / "bad.toml", over)
        with pytest.raises(ConfigError, match=msg):
            C.load_services_config(p)


def test_serve_starts_and_stops_cleanly_on_sigterm(tmp_path, refused_port):
    """`adaptive serve` on a config asking for port 0 everywhere: the services bind their
    own ports, `serve` prints the real endpoints, clients with only the config find the
    orchestrator through its ready record, and SIGTERM stops everything."""
    from services.console import ConsoleClient
    from services.ready import read_ready, ready_path
    from tests.integration.conftest import make_config
    from tests.waiting import wait_until

    cfg, bud = make_config(tmp_path, tms_port=refused_port)
    env = dict(os.environ, PYTHONPATH=str(REPO), ADAPTIVE_LOG_JSON="1")
    p = subprocess.Popen([sys.executable, "-m", "adaptive.cli", "serve", "--config", str(cfg),
                          "--budgets", str(bud)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ""
        end = time.monotonic() + 180
        while "ready" not in line and time.monotonic() < end:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
        assert "services ready" in line
        c = C.load_services_config(cfg)
        orch, gw = read_ready(c.paths.root, "orchestrator"), read_ready(c.paths.root, "gateway")
        console = orch.endpoints["console_endpoint"]
        assert console.startswith("tcp://127.0.0.1:") and not console.endswith(":0")
        assert f"console {console}," in line
        assert f"@127.0.0.1:{gw.endpoints['port']}," in line and gw.endpoints["port"] > 0
        cl = ConsoleClient.from_config(c, timeout_s=10)
        assert cl.endpoint == console
        assert cl.request("ping")["workers"] == {"registration": 1, "planning": 1}
        cl.close()
        r = subprocess.run([sys.executable, "-m", "adaptive.cli", "console", "--config",
                            str(cfg), "--json", "status"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
        pids = [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)],
                                               capture_output=True, text=True,
                                               check=False).stdout.split()]
        assert len(pids) == 4                          # orchestrator, gateway, 2 workers
        assert {orch.pid, gw.pid} <= set(pids)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        # serve waited for its children before exiting: none left, ready records gone
        wait_until(lambda: not [q for q in pids if pid_alive(q)], 10, "children gone")
        assert not ready_path(c.paths.root, "orchestrator").exists()
        assert not ready_path(c.paths.root, "gateway").exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
