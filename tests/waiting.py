"""Waiting by condition in tests: a bounded poll, never a fixed sleep as synchronisation."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str,
               interval_s: float = 0.05) -> T:
    """Call ``condition`` until it returns something truthy and return that; fail the
    test naming ``what`` after ``timeout_s`` (bounds are generous: a loaded 2-core
    machine is slow, and a passing wait returns as soon as the condition holds)."""
    end = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)  # bounded poll interval, not synchronisation
