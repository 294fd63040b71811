"""``python -m services.workers --service NAME [--config services.toml] [--endpoint URL]``:
one worker. It connects to ``--endpoint`` (the supervisor passes the orchestrator's real
broker endpoint), else to ``[orchestrator].worker_endpoint`` (read from the orchestrator's
ready record when the config says port 0, see :mod:`services.ready`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from adaptive.errors import AuthenticationError
from adaptive.log import bind, configure_logging, get_logger
from services.auth import KeyStore
from services.config import load_services_config
from services.messaging import Worker
from services.ready import endpoint_argument
from services.workers import load_handler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.workers")
    p.add_argument("--config", default=None)
    p.add_argument("--service", required=True)
    p.add_argument("--handler", default=None, help="module:function (default: from config)")
    p.add_argument("--endpoint", default=None, help="broker endpoint (default: from config)")
    p.add_argument("--name", default=None)
    p.add_argument("--no-warm-up", action="store_true")
    p.add_argument("--key", default="worker",
                   help="name of this worker's key under <paths.root>/keys (role worker)")
    args = p.parse_args(argv)
    configure_logging()
    cfg = load_services_config(args.config)
    bind(process="worker", service=args.service)
    log = get_logger("services.worker")
    spec = args.handler or cfg.workers.handlers.get(args.service)
    if not spec:
        print(f"no handler configured for service {args.service!r}", file=sys.stderr)
        return 2
    endpoint = endpoint_argument(p, cfg, "worker_endpoint", args.endpoint)
    try:
        keys = KeyStore(cfg.paths.root).client_keys(args.key)
    except AuthenticationError as e:
        p.error(str(e))
    handler = load_handler(spec)
    warm = getattr(handler, "warm_up", None)
    if warm is not None and not args.no_warm_up:
        try:
            warm()
            log.info("worker_warmed_up", service=args.service)
        except Exception as e:  # a failed warm-up is logged; the task will fail clearly
            log.error("warm_up_failed", service=args.service, error=repr(e))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    w = Worker(endpoint, args.service, handler,
               heartbeat_interval_s=cfg.orchestrator.heartbeat_interval_s,
               liveness=cfg.orchestrator.heartbeat_liveness, name=args.name)
    w.curve = keys
    w.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
