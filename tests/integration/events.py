"""Console events in integration tests, from a subscription known to be live.

A ZeroMQ SUB socket receives nothing until its subscription has reached the publisher
("slow joiner"), and nothing tells the subscriber when that happened. :class:`EventWatch`
therefore subscribes to the rooms a test watches and then to a probe prefix, and starts
and cancels probe sessions (rooms under that prefix) until one of their events arrives:
subscriptions travel in order on one connection, so from then on every event of the
watched rooms is delivered. No sleep decides when a subscription is ready."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from services.console import ConsoleClient
from services.protocol import decode

Predicate = Callable[[dict], bool]


class EventWatch:
    def __init__(self, client: ConsoleClient, rooms: list[str], timeout_s: float = 30.0):
        self.client = client
        self.seen: list[dict] = []
        self.rooms = set(rooms)
        for room in rooms:
            client.subscribe(room)
        self._probe = f"PROBE-{uuid.uuid4().hex[:8]}"
        self.sock = client.subscribe(self._probe)    # subscribed after the watched rooms
        self._confirm(timeout_s)

    def _is_probe(self, e: dict) -> bool:
        return str(e.get("room", "")).startswith(self._probe)

    def _confirm(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        for k in range(1, 10_000):
            room = f"{self._probe}-{k}"
            s = self.client.start(room, room)        # publishes session_started
            self.client.cancel(s["session_id"], "event subscription probe")  # and a state
            if self._receive_until(self._is_probe, 0.5) is not None:
                return
            if time.monotonic() > end:
                break
        raise AssertionError(f"console event subscription not live after {timeout_s:g} s")

    def _receive_until(self, pred: Predicate, timeout_s: float) -> dict | None:
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                return None
            frames = self.sock.recv_multipart()
            h, _ = decode(frames[1:])
            if self._is_probe(h):
                if pred(h):
                    return h
            elif h.get("room") in self.rooms:  # topics are prefixes: ROOM-A gets ROOM-AB
                self.seen.append(h)
                if pred(h):
                    return h

    def wait_for(self, pred: Predicate, timeout_s: float, what: str) -> dict:
        """The first event (already received or arriving within ``timeout_s``) that
        matches ``pred``; fails the test naming ``what`` otherwise."""
        for e in self.seen:
            if pred(e):
                return e
        got = self._receive_until(lambda e: not self._is_probe(e) and pred(e), timeout_s)
        if got is None:
            raise AssertionError(f"no console event {what} within {timeout_s:g} s; saw "
                                 f"{[e.get('event') for e in self.seen]}")
        return got

    def names(self) -> list[str]:
        return [e["event"] for e in self.seen]
