"""Timing helpers for benchmarks: median and spread over repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_repeats(fn: Callable[[], object], repeats: int = 3) -> tuple[list[float], object]:
    """Call ``fn`` ``repeats`` times; return (durations in s, last result)."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def summary(times: list[float]) -> str:
    """'median s (min–max, n=N)'."""
    med = statistics.median(times)
    return f"{med:.2f} s ({min(times):.2f}–{max(times):.2f}, n={len(times)})"
