"""The benchmark's peak-RSS sampler counts a service process's children in its group."""

import subprocess
import sys

from adaptive.bench.rss import PeakRss, sample_groups
from tests.waiting import wait_until


def test_child_memory_is_counted_in_its_parents_group(tmp_path):
    ready = tmp_path / "ready"
    # a parent whose child touches 300 MB and stays until told to stop
    code = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', "
            "\"import time, pathlib, sys; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
            f"pathlib.Path({str(ready)!r}).write_text('1'); sys.stdin.read()\"], stdin=sys.stdin); c.wait()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        with PeakRss(lambda: {p.pid: "svc"}, period_s=0.05) as rss:
            wait_until(ready.is_file, 30, "child allocated")
            now = sample_groups({p.pid: "svc"})["svc"]
            wait_until(lambda: rss.peaks.get("svc", 0) >= 300 * 2**20, 10, "peak sampled")
        # the parent alone is a bare interpreter (~10 MB): the child's pages are counted
        assert now >= 300 * 2**20
    finally:
        p.stdin.close()
        p.wait(30)


def test_pss_counts_pages_shared_with_a_forked_child_once(tmp_path):
    """A process touches 300 MB and forks a child that only reads it (copy-on-write): the
    VmRSS sum of the two counts the pages twice, the PSS sum once."""
    ready = tmp_path / "ready"
    code = ("import os, sys, pathlib; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    s = sum(b[::4096]); pathlib.Path(sys.argv[1]).write_text(str(s)); sys.stdin.read(); os._exit(0)\n"
            "sys.stdin.read(); os.waitpid(pid, 0)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(ready)], stdin=subprocess.PIPE)
    try:
        wait_until(ready.is_file, 30, "child forked and read the buffer")
        rss = sample_groups({p.pid: "svc"})["svc"]
        pss = sample_groups({p.pid: "svc"}, measure="pss")["svc"]
        assert rss >= 600 * 2**20                      # each process counts the 300 MB
        assert 300 * 2**20 <= pss < 450 * 2**20        # the pages once (+ two interpreters)
    finally:
        p.stdin.close()
        p.wait(30)
