"""Peak resident memory of a service stack's processes, sampled from /proc.

A worker runs each stage in a forked child (and the B-spline stage in a grandchild) that
exits with the stage, so the worker's own ``VmHWM`` misses most of the stage's memory. The
sampler reads every process's ``VmRSS`` every ``period_s`` and adds each descendant to the
top-level service process it belongs to; a group's peak is the largest sum seen in one
sample (a lower bound of the true peak: a spike shorter than the period can be missed).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Self


def _ppid_rss(pid: int) -> tuple[int, int] | None:
    """(parent pid, resident set in bytes) of ``pid``, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    return ppid, rss


def sample_groups(roots: dict[int, str]) -> dict[str, int]:
    """Resident bytes per group now: each of ``roots`` (pid -> group name) with all its
    descendants."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            v = _ppid_rss(int(d))
            if v is not None:
                procs[int(d)] = v
    out = dict.fromkeys(roots.values(), 0)
    for pid, (_, rss) in procs.items():
        p, seen = pid, 0
        while p in procs and p not in roots and seen < 64:
            p, seen = procs[p][0], seen + 1
        if p in roots:
            out[roots[p]] += rss
    return out


class PeakRss:
    """Background sampler (context manager) of :func:`sample_groups`; ``peaks`` (group ->
    bytes) after exit. ``roots``: a callable giving the current pid -> group map (services
    restarted by a supervisor get new pids)."""

    def __init__(self, roots, period_s: float = 0.25):
        self.roots = roots
        self.period_s = period_s
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            for g, b in sample_groups(self.roots()).items():
                self.peaks[g] = max(self.peaks.get(g, 0), b)
            self._stop.wait(self.period_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
