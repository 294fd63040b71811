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
  processes counts 1/n in each, so the sum is the memory the group uses.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Self


def _ppid_mem(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, resident set bytes, proportional set bytes) of ``pid``, None if it is
    gone (PSS 0 where smaps_rollup cannot be read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    rss = pss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        rollup = ""
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
            break
    return ppid, rss, pss


def sample_groups(roots: dict[int, str], *, measure: str = "rss") -> dict[str, int]:
    """Bytes per group now (``measure`` "rss": VmRSS, or "pss"; see the module doc): each of
    ``roots`` (pid -> group name) with all its descendants."""
    return _sample(roots)[0 if measure == "rss" else 1]


def _sample(roots: dict[int, str]) -> tuple[dict[str, int], dict[str, int]]:
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            v = _ppid_mem(int(d))
            if v is not None:
                procs[int(d)] = v
    rss_out = dict.fromkeys(roots.values(), 0)
    pss_out = dict.fromkeys(roots.values(), 0)
    for pid, (_, rss, pss) in procs.items():
        p, seen = pid, 0
        while p in procs and p not in roots and seen < 64:
            p, seen = procs[p][0], seen + 1
        if p in roots:
            rss_out[roots[p]] += rss
            pss_out[roots[p]] += pss
    return rss_out, pss_out


class PeakRss:
    """Background sampler (context manager) of :func:`sample_groups`; ``peaks`` (group ->
    bytes, VmRSS sums) and ``peaks_pss`` (PSS sums) after exit. ``roots``: a callable giving the current pid -> group map (services
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
            rss, pss = _sample(self.roots())
            for g, b in rss.items():
                self.peaks[g] = max(self.peaks.get(g, 0), b)
            for g, b in pss.items():
                self.peaks_pss[g] = max(self.peaks_pss.get(g, 0), b)
            self._stop.wait(self.period_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
