"""Services benchmarks.

1. Receive: a 120-slice 512x512 CBCT pushed by DCMTK storescu (TCP_NODELAY=1) on
   loopback to the gateway; time from the start of storescu to its exit (every instance
   validated and written atomically before its Success) - target <= 2 s - for each fsync
   policy, plus when ``series_complete`` was emitted (includes the idle timeout).
2. Sessions: N sessions through the services with the real stages (registration,
   planning) when ``adaptive.pipeline`` provides them: p50/p95 per stage and end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from adaptive.bench.rss import PeakRss
from adaptive.bench.stats import summary
from adaptive.replay.build import build_replay_data
from services.config import GatewayConfig, write_local_config
from services.gateway.scp import Gateway
from services.local_peers import (
    Tms,
    find_fraction,
    patient_id_of,
    push,
    wait_planning_data,
    write_synthetic_ct,
)
from services.orchestrator.state import HANDOFF_ENDS
from services.supervisor import ServiceStack

TARGET_S = 2.0


def _receive_once(paths, root: Path, fsync: str, idle_s: float) -> tuple[float, float, int]:
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
    out = ["## services", ""]
    if not shutil.which("storescu"):
        return "\n".join(out + ["storescu (dcmtk) not installed: receive benchmark not run."])
    repeats = max(1, getattr(args, "repeats", 3))
    smoke = bool(getattr(args, "smoke", False))  # 8 small slices; one session, no large case
    slices, size = (8, 64) if smoke else (120, 512)
    idle = 0.5
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        root = Path(tmp)
        paths = write_synthetic_ct(root / "cbct", slices, size, size, patient_id="BENCH",
                                   description="CBCT")
        mb = sum(p.stat().st_size for p in paths) / 2**20
        out += [(f"Receive: {slices} x {size}x{size} CT slices ({mb:.0f} MiB) by DCMTK storescu "
                f"(TCP_NODELAY=1) over loopback to the gateway (validate + atomic write "
                f"before Success); target <= {TARGET_S:g} s. Idle timeout {idle} s."), "",
                ("| fsync policy | storescu start -> exit (all on disk) | -> series_complete "
                "| files | target |"), "|---|---|---|---|---|"]
        for fsync in ("instance", "series", "none"):
            sends, completes, n = [], [], 0
            for _ in range(repeats):
                s, c, n = _receive_once(paths, root, fsync, idle)
                sends.append(s)
                completes.append(c)
            ok = "met" if statistics.median(sends) <= TARGET_S else "MISSED"
            out.append(f"| {fsync} | {summary(sends)} | {summary(completes)} | {n} | {ok} |")
    out += ["", _sessions_note(smoke)]
    return "\n".join(out) + "\n"


LARGE_DIR = Path(__file__).resolve().parents[2] / "replay_data_large"


def _large_case() -> Path:
    """A fraction of the clinical-size case (``adaptive replay-data build --large``), built
    into ``replay_data_large/`` when missing (not committed; takes minutes)."""
    fx = sorted(LARGE_DIR.glob("*/fx*/CBCT"))
    if not fx:
        build_replay_data(LARGE_DIR, large=True)
        fx = sorted(LARGE_DIR.glob("*/fx*/CBCT"))
    return fx[0].parent


def _sessions_note(smoke: bool = False) -> str:
    out = []
    # the committed pelvis, then the clinical-size case: same settings for both
    cases = (("committed pelvis", None), ("clinical-size case", _large_case))
    for label, where in cases[:1] if smoke else cases:
        try:
            fx = where() if where else None
            out.append(f"### Sessions: {label}\n\n"
                       + bench_sessions(n=1 if smoke else None, fraction_dir=fx))
        except Exception as e:  # noqa: BLE001 - reported in the benchmark text
            out.append(f"### Sessions: {label}\n\nFAILED ({type(e).__name__}: {e}).")
    return "\n\n".join(out)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def session_stack(work: Path, tms, planning: Path, pid: str):
    """The service stack on this machine (config under ``work``, hand-off to ``tms``), ready,
    with a console client and the case's planning data (``planning``: CT/, RS.dcm, RP.dcm)
    registered by the orchestrator. Returns (stack, console client, gateway port); the
    caller stops the stack and closes the client."""
    stack = None
    try:
        stack = ServiceStack(write_local_config(work, tms.port))
        gw_port = stack.start(120).gateway_port
        stack.wait_ready(240)
        cl = stack.console_client()
        push(gw_port, sorted((planning / "CT").glob("*.dcm")) +
             [planning / "RS.dcm", planning / "RP.dcm"], "TPS")
        wait_planning_data(cl, pid)
    except BaseException:
        if stack is not None:
            stack.stop()
        raise
    return stack, cl, gw_port


def _stage_timings(session_dir: Path) -> dict[str, float]:
    """The stages' own clocks (``timings_s`` of the registration and planning records),
    prefixed ``registration.`` / ``planning.``; empty when a record is missing."""
    out = {}
    for stage, name in (("registration", "registration_result.json"),
                        ("planning", "planning_result.json")):
        f = session_dir / stage / name
        if f.is_file():
            for k, v in (json.loads(f.read_text()).get("timings_s") or {}).items():
                if isinstance(v, (int, float)):
                    out[f"{stage}.{k}"] = float(v)
    return out


# the stage-internal timings the breakdown shows (others are in the session folders)
BREAKDOWN = ("registration.load", "registration.working_images", "registration.initial_alignment",
             "registration.rigid", "registration.deformable", "registration.gate",
             "registration.native_field", "registration.synthetic_ct",
             "registration.propagation", "registration.write", "registration.total",
             "planning.load", "planning.plan_total", "planning.scheduled_recalc",
             "planning.checks", "planning.write", "planning.total")


def _loadavg() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def bench_sessions(n: int | None = None, workdir: str | Path | None = None,
                   fraction_dir: str | Path | None = None) -> str:
    """N sessions (default: one per replay fraction of the case; a CBCT series is used by
    one session only, so at most that many) through one service stack with the real stages: planning data pushed
    once, then per session the CBCT of the next fraction by storescu, the adapted plan
    chosen as soon as it is offered (the scheduled plan otherwise) and handed off to a local
    Orthanc (or the pynetdicom TMS stand-in). ``fraction_dir``: a fraction of the case
    (default: the first committed replay case). p50/p95 per stage (orchestrator clocks:
    dispatch to result) and end to end (CBCT complete to plan stored, excluding the
    decision), the stages' own sub-stage clocks, the load average and the peak resident
    memory of each service process with its stage children (:mod:`adaptive.bench.rss`)."""
    fx0, planning = find_fraction(None if fraction_dir is None else str(fraction_dir))
    fractions = sorted(p.parent for p in fx0.parent.glob("fx*/CBCT"))
    n = n or len(fractions)
    if n > len(fractions):
        raise ValueError(f"{n} sessions need {n} fractions; {fx0.parent} has {len(fractions)}")
    pid = patient_id_of(planning / "RP.dcm")
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-sessions-"))
    tms = Tms(work)
    stack, cl, gw_port = None, None, None
    rows = []
    load0 = _loadavg()
    try:
        stack, cl, gw_port = session_stack(work, tms, planning, pid)

        def roots(st=stack):
            return {p.popen.pid: p.name for p in st.procs if p.popen is not None}
        with PeakRss(roots) as rss:
            for i in range(n):
                rows.append(_one_session(cl, stack, gw_port, pid, fractions[i], i))
    finally:
        if cl:
            cl.close()
        if stack:
            stack.stop()
        tms.stop()
        if workdir is None:  # ours: session folders and the TMS's store, 0.3-2 GB a run
            shutil.rmtree(work, ignore_errors=True)
    load1 = _loadavg()
    out = [(f"Sessions: {n} online sessions through the services with the real stages "
            f"(replay case {fx0.parent.name}, one per fraction; "
            f"registration + planning workers, 1 each; TMS: {tms.label.split(' ')[0]}). "
            f"Budgets from config/budgets.toml. Load average (1/5/15 min) {load0} before, "
            f"{load1} after."), "",
           *_session_tables(rows, rss.peaks, rss.peaks_pss)]
    return "\n".join(out)


def _one_session(cl, stack: ServiceStack, gw_port: int, pid: str, fx: Path, i: int) -> dict:
    """Session ``i``: push the fraction's CBCT, choose the adapted plan when offered (the
    scheduled plan otherwise), wait for the hand-off; returns its stage durations (s)."""
    s = cl.start("BENCH_ROOM", pid, protocol="prostate")
    push(gw_port, sorted((fx / "CBCT").glob("*.dcm")), "IMAGER")
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 900,
                          poll_s=0.25)
    if s["state"] == "failed":
        raise RuntimeError(f"session {i + 1} failed: {s['error']}")
    plan = "adapted" if "adapted" in s["offered"] else "scheduled"
    cl.choose(s["session_id"], plan, [r["name"] for r in s.get("reviews", [])])
    s = cl.wait_for_state(s["session_id"], HANDOFF_ENDS, 120, poll_s=0.25)
    st = s["stages"]
    return {"fraction": fx.name, "plan": plan, "state": s["state"],
            "registration": st.get("registration", {}).get("duration_s"),
            "planning": st.get("planning", {}).get("duration_s"),
            "handoff": st.get("handoff", {}).get("duration_s"),
            "end_to_end": s["end_to_end"].get("duration_s"),
            "within": s["end_to_end"].get("within_budget"),
            "notes": "; ".join(s.get("notes", []))[:300],
            "inner": _stage_timings(stack.cfg.paths.sessions / s["session_id"]),
            "load": os.getloadavg()[0]}


def _session_tables(rows: list[dict], peaks: dict, peaks_pss: dict | None = None) -> list[str]:
    """Markdown tables of :func:`bench_sessions`: per session, p50/p95 per stage and inside the
    stages (s), peak RSS per service process (GiB)."""
    out = [("| session | fraction | plan handed off | registration s | planning s | hand-off s "
            "| end to end s | within budget | load (1 min) |"),
           "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else f"{v:.1f}"
    for i, r in enumerate(rows):
        out.append(f"| {i + 1} | {r['fraction']} | {r['plan']} ({r['state']}) | "
                   f"{f(r['registration'])} | {f(r['planning'])} | {f(r['handoff'])} | "
                   f"{f(r['end_to_end'])} | {r['within']} | {r['load']:.2f} |")
    for i, r in enumerate(rows):
        if r["plan"] != "adapted":
            out.append(f"\nSession {i + 1}: scheduled plan only: {r['notes']}")
    out += ["", "| stage | p50 s | p95 s | n |", "|---|---|---|---|"]
    for k in ("registration", "planning", "handoff", "end_to_end"):
        xs = [r[k] for r in rows if r[k] is not None]
        if xs:
            out.append(f"| {k} | {_pct(xs, 50):.1f} | {_pct(xs, 95):.1f} | {len(xs)} |")
    out += ["", "Inside the stages (their own clocks):", "",
            "| part | p50 s | p95 s | n |", "|---|---|---|---|"]
    for k in BREAKDOWN:
        xs = [r["inner"][k] for r in rows if k in r["inner"]]
        if xs:
            out.append(f"| {k} | {_pct(xs, 50):.2f} | {_pct(xs, 95):.2f} | {len(xs)} |")
    out += ["", ("Peak memory per service process with its stage children (sampled every "
                 "0.25 s from /proc; adaptive.bench.rss): PSS, the memory the process tree "
                 "uses (a page shared by forked processes counted once in all; read at the "
                 "VmRSS peaks), and the sum of VmRSS, which counts a copy-on-write page once "
                 "per process that maps it (an upper bound):"), "",
            "| process | peak PSS GiB | peak VmRSS sum GiB |", "|---|---|---|"]
    for name, b in sorted(peaks.items()):
        pss = (peaks_pss or {}).get(name)
        out.append(f"| {name} | {'-' if pss is None else f'{pss / 2**30:.2f}'} | "
                   f"{b / 2**30:.2f} |")
    return out
