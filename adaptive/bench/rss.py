"""Peak memory of a service stack's processes, sampled from /proc.

A worker runs each stage in a forked child (and the B-spline stage and the synthetic CT's
writing in grandchildren) that exits with the stage, so the worker's own ``VmHWM`` misses
most of the stage's memory. The sampler reads every process's memory every ``period_s`` and
adds each descendant to the top-level service process it belongs to; a group's peak is the
largest sum seen in one sample (a lower bound of the true peak: a spike shorter than the
period can be missed). Two sums:

* ``VmRSS`` (``/proc/<pid>/status``): a forked child maps its parent's pages copy-on-write
  and each process counts them in full, so the sum counts a page shared by a stage child and
  its grandchild twice: an upper bound of the memory the group uses;
* ``Pss`` (``/proc/<pid>/smaps_rollup``, proportional set size): a page shared by n
  processes counts 1/n in each, so the sum is the memory the group uses. Reading it walks
  the process's page tables under its memory-map lock, so :class:`PeakRss` reads it only
  for a group whose VmRSS sum reaches a new peak, to disturb the measured stages as little
  as possible: the PSS peak reported is the largest PSS at those samples.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Self


def _ppid_rss(pid: int) -> tuple[int, int] | None:
    """(parent pid, resident set bytes) of ``pid``, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return ppid, int(line.split()[1]) * 1024
    return ppid, 0                                  # a kernel thread or a zombie


def _pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (0 when gone or unreadable)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _members(roots: dict[int, str]) -> tuple[dict[str, list[int]], dict[int, int]]:
    """(group -> pids of the root and its descendants, pid -> VmRSS bytes)."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            v = _ppid_rss(int(d))
            if v is not None:
                procs[int(d)] = v
    groups: dict[str, list[int]] = {g: [] for g in roots.values()}
    for pid in procs:
        p, seen = pid, 0
        while p in procs and p not in roots and seen < 64:
            p, seen = procs[p][0], seen + 1
        if p in roots:
            groups[roots[p]].append(pid)
    return groups, {pid: v[1] for pid, v in procs.items()}


def sample_groups(roots: dict[int, str], *, measure: str = "rss") -> dict[str, int]:
    """Bytes per group now (``measure`` "rss": VmRSS, or "pss"; see the module doc): each of
    ``roots`` (pid -> group name) with all its descendants."""
    groups, rss = _members(roots)
    if measure == "rss":
        return {g: sum(rss[p] for p in pids) for g, pids in groups.items()}
    return {g: sum(_pss(p) for p in pids) for g, pids in groups.items()}


class PeakRss:
    """Background sampler (context manager) of :func:`sample_groups`; ``peaks`` (group ->
    bytes, VmRSS sums) and ``peaks_pss`` (PSS sums, read at the VmRSS peaks) after exit. ``roots``: a callable giving the current pid -> group map (services
    restarted by a supervisor get new pids)."""

    def __init__(self, roots, period_s: float = 0.25):
        self.roots = roots
        self.period_s = period_s
        self.peaks: dict[str, int] = {}
        self.peaks_pss: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            groups, rss = _members(self.roots())
            for g, pids in groups.items():
                b = sum(rss[p] for p in pids)
                if b >= self.peaks.get(g, 0):       # a new VmRSS peak: read PSS now
                    self.peaks[g] = b
                    self.peaks_pss[g] = max(self.peaks_pss.get(g, 0),
                                            sum(_pss(p) for p in pids))
            self._stop.wait(self.period_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
