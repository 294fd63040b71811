"""``python -m services.gateway [--config services.toml] [--events-endpoint URL]``: the DICOM
gateway process.

Listens on ``[gateway].host:port`` (port 0: an ephemeral port of its own), then writes its
ready record ``<paths.root>/run/gateway.json`` with the address actually bound
(:mod:`services.ready`). Events go to ``--events-endpoint`` (the supervisor passes the
orchestrator's real endpoint), else to ``[orchestrator].gateway_events_endpoint`` (read
from the orchestrator's ready record when the config says port 0)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from adaptive.errors import AuthenticationError
from adaptive.log import bind, configure_logging
from services.auth import KeyStore
from services.config import load_services_config
from services.events import EventPusher
from services.gateway.scp import Gateway
from services.ready import clear_ready, endpoint_argument, write_ready


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.gateway")
    p.add_argument("--config", default=None)
    p.add_argument("--events-endpoint", default=None,
                   help="orchestrator's gateway events endpoint (default: from config)")
    p.add_argument("--key", default="gateway",
                   help="name of this gateway's key under <paths.root>/keys (role gateway)")
    p.add_argument("--port", type=int, default=None,
                   help="DICOM port (default: from config; a restart keeps the first port)")
    args = p.parse_args(argv)
    configure_logging()
    bind(process="gateway")
    cfg = load_services_config(args.config)
    events = endpoint_argument(p, cfg, "gateway_events_endpoint", args.events_endpoint)
    if args.port is not None:
        cfg.gateway.port = args.port
    try:
        keys = KeyStore(cfg.paths.root).client_keys(args.key)
    except AuthenticationError as e:
        p.error(str(e))
    pusher = EventPusher(events, keys=keys)
    gw = Gateway(cfg.gateway, cfg.paths.store, cfg.paths.quarantine, pusher)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    gw.start()
    try:
        write_ready(cfg.paths.root, "gateway", {"ae_title": cfg.gateway.ae_title,
                                                "host": cfg.gateway.host, "port": gw.port})
        stop.wait()
    finally:
        clear_ready(cfg.paths.root, "gateway", pid=os.getpid())
        gw.stop()
        pusher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
