"""``adaptive serve``: run the gateway, orchestrator and workers until SIGINT/SIGTERM.

Endpoints are those of the config; where it says port 0 each service binds an ephemeral
port and the real endpoints are printed once ready (and kept in
``<paths.root>/run/<process>.json`` for ``adaptive console``)."""

from __future__ import annotations

import signal
import threading

from adaptive.log import get_logger


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the real-time services (gateway, "
                              "orchestrator, workers) on this machine")
    p.add_argument("--config", default=None, help="services TOML (default config/services.toml)")
    p.add_argument("--budgets", default=None, help="budgets TOML (default config/budgets.toml)")
    p.add_argument("--ready-timeout", type=float, default=180.0,
                   help="seconds to wait for each service to listen and for every worker "
                        "to connect (default 180)")
    p.set_defaults(func=run)


def run(args) -> int:
    from services.supervisor import ServiceStack  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    log = get_logger("adaptive.serve")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    stack = ServiceStack(args.config, args.budgets)
    try:
        e = stack.start(args.ready_timeout)
        info = stack.wait_ready(args.ready_timeout)
        gw = f"{e.gateway_ae_title}@{e.gateway_host}:{e.gateway_port}"
        log.info("services_ready", gateway=gw, console=e.console, events=e.console_events,
                 workers=info["workers"], logs=str(stack.log_dir))
        print(f"adaptive services ready: DICOM {gw}, console {e.console}, events "
              f"{e.console_events} (Ctrl-C stops)", flush=True)
        while not stop.wait(0.5):
            stack.poll()
    finally:
        stack.stop()
    return 0
