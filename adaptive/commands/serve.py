"""``adaptive serve``: run the gateway, orchestrator and workers until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the real-time services (gateway, "
                              "orchestrator, workers) on this machine")
    p.add_argument("--config", default=None, help="services TOML (default config/services.toml)")
    p.add_argument("--budgets", default=None, help="budgets TOML (default config/budgets.toml)")
    p.add_argument("--ready-timeout", type=float, default=180.0,
                   help="seconds to wait for every worker to connect (default 180)")
    p.set_defaults(func=run)


def run(args) -> int:
    from adaptive.log import get_logger
    from services.supervisor import ServiceStack

    log = get_logger("adaptive.serve")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    stack = ServiceStack(args.config, args.budgets)
    stack.start()
    try:
        info = stack.wait_ready(args.ready_timeout)
        g, o = stack.cfg.gateway, stack.cfg.orchestrator
        log.info("services_ready", gateway=f"{g.ae_title}@{g.host}:{g.port}",
                 console=o.console_endpoint, events=o.console_events_endpoint,
                 workers=info["workers"], logs=str(stack.log_dir))
        print(f"adaptive services ready: DICOM {g.ae_title}@{g.host}:{g.port}, console "
              f"{o.console_endpoint}, events {o.console_events_endpoint} (Ctrl-C stops)",
              flush=True)
        while not stop.wait(0.5):
            stack.poll()
    finally:
        stack.stop()
    return 0
