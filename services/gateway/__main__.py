"""``python -m services.gateway [--config services.toml]``: the DICOM gateway process."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from adaptive.log import bind, configure_logging
from services.config import load_services_config
from services.events import EventPusher
from services.gateway.scp import Gateway


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.gateway")
    p.add_argument("--config", default=None)
    args = p.parse_args(argv)
    configure_logging()
    bind(process="gateway")
    cfg = load_services_config(args.config)
    pusher = EventPusher(cfg.orchestrator.gateway_events_endpoint)
    gw = Gateway(cfg.gateway, cfg.paths.store, cfg.paths.quarantine, pusher)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    gw.start()
    try:
        stop.wait()
    finally:
        gw.stop()
        pusher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
