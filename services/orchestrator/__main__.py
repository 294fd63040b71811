"""``python -m services.orchestrator [--config ...] [--budgets ...]``: the orchestrator.

Binds its four sockets as configured (port 0: an ephemeral port of its own), then writes
its ready record ``<paths.root>/run/orchestrator.json`` with the endpoints actually bound
(:mod:`services.ready`) and serves until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from adaptive.log import bind, configure_logging, get_logger
from services.config import load_budgets, load_services_config
from services.orchestrator.core import Orchestrator
from services.ready import bound_endpoint, clear_ready, write_ready

ENDPOINT_KEYS = ("worker_endpoint", "gateway_events_endpoint", "console_endpoint",
                 "console_events_endpoint")


def bound_endpoints(orch: Orchestrator) -> dict[str, str]:
    """The endpoints ``orch``'s sockets are bound to, by config key."""
    oc = orch.cfg.orchestrator
    return {"worker_endpoint": bound_endpoint(oc.worker_endpoint, orch.broker.sock),
            "gateway_events_endpoint": bound_endpoint(oc.gateway_events_endpoint,
                                                      orch.gw_sock),
            "console_endpoint": bound_endpoint(oc.console_endpoint, orch.console),
            "console_events_endpoint": bound_endpoint(oc.console_events_endpoint, orch.pub)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.orchestrator")
    p.add_argument("--config", default=None)
    p.add_argument("--budgets", default=None)
    p.add_argument("--bind", action="append", default=[], metavar="KEY=ENDPOINT",
                   help="bind this endpoint instead of the configured one (the supervisor "
                        "restarts an orchestrator on the endpoints the first one bound)")
    args = p.parse_args(argv)
    configure_logging()
    bind(process="orchestrator")
    cfg = load_services_config(args.config)
    for b in args.bind:
        key, _, endpoint = b.partition("=")
        if key not in ENDPOINT_KEYS or not endpoint:
            p.error(f"--bind {b!r}: expected one of {', '.join(ENDPOINT_KEYS)}=tcp://...")
        setattr(cfg.orchestrator, key, endpoint)
    budgets = load_budgets(args.budgets)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    orch = Orchestrator(cfg, budgets)
    endpoints = bound_endpoints(orch)
    write_ready(cfg.paths.root, "orchestrator", endpoints)
    get_logger("services.orchestrator").info("orchestrator_listening", **endpoints)
    try:
        orch.run(stop)
    finally:
        clear_ready(cfg.paths.root, "orchestrator", pid=os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
