"""Test doubles for worker services (messaging tests and orchestrator tests without the
compute stages). They do real, checkable work on their inputs; they are NOT stages of the
pipeline and are never configured outside tests."""

from __future__ import annotations

import os
import time

import numpy as np


def array_sum(payload, arrays, ctx):
    """Service 'sum': returns the float64 sum of every array and sleeps payload['sleep_s']."""
    ctx.progress("summing", 0.0)
    time.sleep(float(payload.get("sleep_s", 0.0)))
    sums = {k: float(np.asarray(v, dtype=np.float64).sum()) for k, v in arrays.items()}
    ctx.progress("summing", 1.0)
    doubled = {k: np.asarray(v) * 2 for k, v in arrays.items()}
    return {"sums": sums, "pid": os.getpid(), "attempt": ctx.attempt}, doubled


def failing(payload, arrays, ctx):
    from adaptive.errors import RegistrationError

    raise RegistrationError(f"cannot register: {payload.get('why', 'test')}")
