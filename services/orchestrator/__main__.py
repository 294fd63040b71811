"""``python -m services.orchestrator [--config ...] [--budgets ...]``: the orchestrator."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from adaptive.log import bind, configure_logging
from services.config import load_budgets, load_services_config
from services.orchestrator.core import Orchestrator


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.orchestrator")
    p.add_argument("--config", default=None)
    p.add_argument("--budgets", default=None)
    args = p.parse_args(argv)
    configure_logging()
    bind(process="orchestrator")
    cfg = load_services_config(args.config)
    budgets = load_budgets(args.budgets)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    Orchestrator(cfg, budgets).run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
