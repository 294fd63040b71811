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
        r = subprocess.run([shutil.which("storescu"), "-aet", "IMAGER", "-aec", "ADAPTIVE_GW",
                            "127.0.0.1", str(gw.port), *map(str, paths)],
                           env=dict(os.environ, TCP_NODELAY="1"), capture_output=True,
                           text=True, timeout=120, check=False)
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
    except Exception as e:  # noqa: BLE001 - reported in the benchmark text
        return (f"Sessions through the services with the real stages: not run "
                f"({type(e).__name__}: {e}).")
    try:
        return bench_sessions()
    except Exception as e:  # noqa: BLE001
        return f"Sessions through the services with the real stages: FAILED ({type(e).__name__}: {e})."


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def session_stack(work: Path, tms, planning: Path, pid: str):
    """The service stack on this machine (config under ``work``, hand-off to ``tms``), ready,
    with a console client and the case's planning data (``planning``: CT/, RS.dcm, RP.dcm)
    registered by the orchestrator. Returns (stack, console client, gateway port); the
    caller stops the stack and closes the client."""
    from adaptive.commands.demo import push
    from services.config import write_local_config
    from services.supervisor import ServiceStack

    stack = None
    try:
        stack = ServiceStack(write_local_config(work, tms.port))
        gw_port = stack.start(120).gateway_port
        stack.wait_ready(240)
        cl = stack.console_client()
        push(gw_port, sorted((planning / "CT").glob("*.dcm")) +
             [planning / "RS.dcm", planning / "RP.dcm"], "TPS")
        end = time.monotonic() + 60
        while cl.request("planning_data", patient_id=pid)["planning"]["missing"]:
            if time.monotonic() > end:
                raise RuntimeError("planning data not registered by the orchestrator")
            time.sleep(0.2)  # bounded poll (60 s)
    except BaseException:
        if stack is not None:
            stack.stop()
        raise
    return stack, cl, gw_port


def bench_sessions(n: int | None = None, workdir: str | Path | None = None) -> str:
    """N sessions (default: one per replay fraction of the first case, at most 3) through one
    service stack with the real stages: planning data pushed once, then per session the CBCT
    of the next fraction by storescu, the adapted plan chosen as soon as it is offered (the
    scheduled plan otherwise) and handed off to a local Orthanc (or the pynetdicom TMS
    stand-in). p50/p95 per stage (orchestrator clocks: dispatch to result) and end to end
    (CBCT complete to plan stored, excluding the decision)."""
    from adaptive.commands.demo import Tms, _patient_id, find_fraction, push
    from services.orchestrator.state import HANDOFF_ENDS

    fx0, planning = find_fraction(None)
    fractions = sorted(p.parent for p in fx0.parent.glob("fx*/CBCT"))
    n = n or min(3, len(fractions))
    pid = _patient_id(planning / "RP.dcm")
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-sessions-"))
    tms = Tms(work)
    stack, cl, gw_port = None, None, None
    rows = []
    try:
        stack, cl, gw_port = session_stack(work, tms, planning, pid)
        for i in range(n):
            fx = fractions[i % len(fractions)]
            s = cl.start("BENCH_ROOM", pid, protocol="prostate")
            push(gw_port, sorted((fx / "CBCT").glob("*.dcm")), "IMAGER")
            s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"},
                                  900, poll_s=0.25)
            if s["state"] == "failed":
                raise RuntimeError(f"session {i + 1} failed: {s['error']}")
            plan = "adapted" if "adapted" in s["offered"] else "scheduled"
            cl.choose(s["session_id"], plan)
            s = cl.wait_for_state(s["session_id"], HANDOFF_ENDS, 120, poll_s=0.25)
            st = s["stages"]
            rows.append({"fraction": fx.name, "plan": plan, "state": s["state"],
                         "registration": st.get("registration", {}).get("duration_s"),
                         "planning": st.get("planning", {}).get("duration_s"),
                         "handoff": st.get("handoff", {}).get("duration_s"),
                         "end_to_end": s["end_to_end"].get("duration_s"),
                         "within": s["end_to_end"].get("within_budget"),
                         "notes": "; ".join(s.get("notes", []))[:300]})
    finally:
        if cl:
            cl.close()
        if stack:
            stack.stop()
        tms.stop()
    out = [(f"Sessions: {n} online sessions through the services with the real stages "
            f"(replay case {fx0.parent.name}; registration + planning workers, 1 each; "
            f"TMS: {tms.label.split(' ')[0]}). Budgets from config/budgets.toml."), "",
           ("| session | fraction | plan handed off | registration s | planning s | hand-off s "
            "| end to end s | within budget |"), "|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else f"{v:.1f}"
    for i, r in enumerate(rows):
        out.append(f"| {i + 1} | {r['fraction']} | {r['plan']} ({r['state']}) | "
                   f"{f(r['registration'])} | {f(r['planning'])} | {f(r['handoff'])} | "
                   f"{f(r['end_to_end'])} | {r['within']} |")
    for i, r in enumerate(rows):
        if r["plan"] != "adapted":
            out.append(f"\nSession {i + 1}: scheduled plan only: {r['notes']}")
    out += ["", "| stage | p50 s | p95 s | n |", "|---|---|---|---|"]
    for k in ("registration", "planning", "handoff", "end_to_end"):
        xs = [r[k] for r in rows if r[k] is not None]
        if xs:
            out.append(f"| {k} | {_pct(xs, 50):.1f} | {_pct(xs, 95):.1f} | {len(xs)} |")
    return "\n".join(out)
