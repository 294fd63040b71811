"""Session state machine, config loading, and `adaptive serve` start/stop."""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parent.parent


def test_allowed_and_illegal_transitions():
    path = [S.WAITING, S.REGISTERING, S.PLANNING, S.AWAITING, S.HANDING_OFF, S.HANDED_OFF]
    for a, b in zip(path, path[1:]):
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


def test_serve_starts_and_stops_cleanly_on_sigterm(tmp_path):
    from tests.integration.conftest import make_config

    cfg, bud = make_config(tmp_path, tms_port=C.free_tcp_port())
    env = dict(os.environ, PYTHONPATH=str(REPO), ADAPTIVE_LOG_JSON="1")
    p = subprocess.Popen([sys.executable, "-m", "adaptive.cli", "serve", "--config", str(cfg),
                          "--budgets", str(bud)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ""
        end = time.monotonic() + 90
        while "ready" not in line and time.monotonic() < end:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
        assert "services ready" in line
        from services.console import ConsoleClient

        c = C.load_services_config(cfg)
        cl = ConsoleClient(c.orchestrator.console_endpoint, timeout_s=5)
        assert cl.request("ping")["workers"] == {"registration": 1, "planning": 1}
        cl.close()
        pids = [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)],
                                               capture_output=True, text=True).stdout.split()]
        assert len(pids) == 4                          # orchestrator, gateway, 2 workers
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        time.sleep(0.3)
        alive = [q for q in pids if q != p.pid and os.path.exists(f"/proc/{q}")
                 and "Z" not in open(f"/proc/{q}/stat").read().split()[2]]
        assert alive == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
