"""Thread-safe event publishing from the gateway to the orchestrator (ZeroMQ PUSH).

PUSH queues messages while the orchestrator is not (yet) connected instead of dropping
them as PUB would; the pynetdicom handler threads put events on a queue and a single
sender thread owns the socket (ZeroMQ sockets are not thread-safe). With ``keys`` (the
gateway's, :mod:`services.auth`) the socket is a CURVE client: the orchestrator accepts
gateway events only from keys with the ``gateway`` role."""

from __future__ import annotations

import queue
import threading
import time

import zmq

from services.auth import apply_client_keys
from services.protocol import encode


class EventPusher:
    def __init__(self, endpoint: str, *, context: zmq.Context | None = None,
                 linger_ms: int = 2000, hwm: int = 10000, keys: dict | None = None):
        self.endpoint = endpoint
        self._keys = keys
        self._ctx = context or zmq.Context.instance()
        self._q: queue.Queue = queue.Queue()
        self._linger = linger_ms
        self._hwm = hwm
        self._thread = threading.Thread(target=self._run, name="event-pusher", daemon=True)
        self._thread.start()

    def __call__(self, event: str, body: dict) -> None:
        self._q.put((event, dict(body, t=time.time())))

    def _run(self):
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, self._linger)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        if self._keys is not None:
            apply_client_keys(sock, self._keys)
        sock.connect(self.endpoint)
        try:
            while True:
                item = self._q.get()
                if item is None:
                    break
                event, body = item
                sock.send_multipart(encode("gateway_event", {"event": event, "data": body}))
        finally:
            sock.close()

    def close(self, timeout_s: float = 3.0) -> None:
        self._q.put(None)
        self._thread.join(timeout_s)
