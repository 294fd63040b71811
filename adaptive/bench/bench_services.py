"""Services benchmarks.

1. Receive: a 120-slice 512x512 CBCT pushed by DCMTK storescu (TCP_NODELAY=1) on
   loopback to the gateway; time from the start of storescu to its exit (every instance
   validated and written atomically before its Success) - target <= 2 s - for each fsync
   policy, plus when ``series_complete`` was emitted (includes the idle timeout).
2. Sessions: N sessions through the services with the real stages (registration,
   planning) when ``adaptive.pipeline`` provides them: p50/p95 per stage and end to end.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from adaptive.bench.stats import summary

TARGET_S = 2.0


def _receive_once(paths, root: Path, fsync: str, idle_s: float) -> tuple[float, float, int]:
    from services.config import GatewayConfig
    from services.gateway.scp import Gateway

    done = threading.Event()
    got = {}

    def sink(event, body):
        if event == "series_complete":
            got.update(body, t=time.perf_counter())
            done.set()

    store = root / f"store-{fsync}-{time.monotonic_ns()}"
    gw = Gateway(GatewayConfig(port=0, idle_timeout_s=idle_s, fsync=fsync), store,
                 root / "q", sink)
    gw.start()
    try:
        t0 = time.perf_counter()
        r = subprocess.run([shutil.which("storescu"), "-aec", "ADAPTIVE_GW", "127.0.0.1",
                            str(gw.port), *map(str, paths)],
                           env=dict(os.environ, TCP_NODELAY="1"), capture_output=True,
                           text=True, timeout=120)
        t1 = time.perf_counter()
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed: {r.stderr[-300:]}")
        if not done.wait(30):
            raise RuntimeError("series_complete not emitted")
        n = len(list(Path(got["path"]).glob("*.dcm")))
        return t1 - t0, got["t"] - t0, n
    finally:
        gw.stop()
        shutil.rmtree(store, ignore_errors=True)


def run(args) -> str:
    from services.sample_data import write_ct_series

    out = ["## services", ""]
    if not shutil.which("storescu"):
        return "\n".join(out + ["storescu (dcmtk) not installed: receive benchmark not run."])
    repeats = max(1, getattr(args, "repeats", 3))
    idle = 0.5
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        root = Path(tmp)
        paths = write_ct_series(root / "cbct", 120, 512, 512, patient_id="BENCH",
                                description="CBCT")
        mb = sum(p.stat().st_size for p in paths) / 2**20
        out += [f"Receive: 120 x 512x512 CT slices ({mb:.0f} MiB) by DCMTK storescu "
                f"(TCP_NODELAY=1) over loopback to the gateway (validate + atomic write "
                f"before Success); target <= {TARGET_S:g} s. Idle timeout {idle} s.", "",
                "| fsync policy | storescu start -> exit (all on disk) | -> series_complete "
                "| files | target |", "|---|---|---|---|---|"]
        for fsync in ("instance", "series", "none"):
            sends, completes, n = [], [], 0
            for _ in range(repeats):
                s, c, n = _receive_once(paths, root, fsync, idle)
                sends.append(s)
                completes.append(c)
            ok = "met" if statistics.median(sends) <= TARGET_S else "MISSED"
            out.append(f"| {fsync} | {summary(sends)} | {summary(completes)} | {n} | {ok} |")
    out += ["", _sessions_note()]
    return "\n".join(out) + "\n"


def _sessions_note() -> str:
    try:
        from services.workers.stages import PLANNING_FN, REGISTRATION_FN, _pipeline_fn

        _pipeline_fn(REGISTRATION_FN)
        _pipeline_fn(PLANNING_FN)
    except Exception as e:
        return (f"Sessions through the services with the real stages: not run "
                f"({type(e).__name__}: {e}).")
    return "Sessions benchmark: stages available; run tests/integration/test_services_pipeline.py."
