"""``adaptive demo`` (``make demo``): one online adaptive session through the real
services, end to end, on this machine.

Starts a TMS (a local Orthanc, :mod:`services.orthanc`, if the ``Orthanc`` binary exists,
else a pynetdicom Storage SCP on an ephemeral port, clearly labelled), starts the services
(``adaptive serve`` stack with a temporary config asking for ephemeral ports; the stack
reports the ports the services bound), pushes a replay fraction's planning data (CT, RT
Structure Set, scheduled RT Plan) and then its CBCT over DICOM (DCMTK storescu if present,
else pynetdicom), chooses the adapted plan through the console API (the scheduled plan
when no adapted plan passed its checks), prints the per-stage timeline and where the
plan was stored, and shuts everything down.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from adaptive.commands.console import format_session
from adaptive.errors import ServiceError


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run one adaptive session through the services "
                              "(local TMS, replay fraction over DICOM)")
    p.add_argument("--fraction", default=None,
                   help="replay fraction folder (fxNN with CBCT/; default: first in replay_data/)")
    p.add_argument("--workdir", default=None, help="keep everything here (default: temp dir)")
    p.add_argument("--timeout", type=float, default=600.0, help="overall bound (s)")
    p.set_defaults(func=run)


def run(args) -> int:
    # deferred: the CLI imports every command module at start (see adaptive/cli.py)
    from services.config import write_local_config  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from services.local_peers import Tms, find_fraction, patient_id_of, push, wait_planning_data  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from services.orchestrator.state import HANDOFF_ENDS  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from services.supervisor import ServiceStack  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    fx, planning = find_fraction(args.fraction)
    pid = patient_id_of(planning / "RP.dcm")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="adaptive-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    print(f"adaptive demo (RESEARCH USE ONLY): fraction {fx}, patient {pid}, workdir {work}")
    tms = Tms(work)
    print(f"TMS: {tms.label}")
    stack = cl = None
    try:
        stack = ServiceStack(write_local_config(work, tms.port))
        ep = stack.start(min(120.0, args.timeout))
        stack.wait_ready(min(240.0, args.timeout))
        gw_port = ep.gateway_port
        print(f"services up in {time.monotonic() - t_start:.1f} s "
              f"(gateway {ep.gateway_ae_title}@{ep.gateway_host}:{gw_port}; logs "
              f"{stack.log_dir})")
        cl = stack.console_client()
        how = push(gw_port, sorted((planning / "CT").glob("*.dcm")) +
                   [planning / "RS.dcm", planning / "RP.dcm"], "TPS")
        wait_planning_data(cl, pid)
        print(f"planning data received ({how})")
        s = cl.start("DEMO_ROOM", pid, protocol="prostate")
        print(f"session {s['session_id']} started; sending CBCT")
        push(gw_port, sorted((fx / "CBCT").glob("*.dcm")), "IMAGER")
        left = max(10.0, args.timeout - (time.monotonic() - t_start))
        s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed",
                                                "cancelled"}, left, poll_s=0.25)
        if s["state"] in ("failed", "cancelled"):
            raise ServiceError(f"session ended {s['state']}: {s['error'] or s['notes']}")
        plan = "adapted" if "adapted" in s["offered"] else "scheduled"
        if plan == "scheduled":
            print(f"adapted plan not offered ({'; '.join(s['notes'])}); choosing scheduled")
        reg = s.get("registration") or {}
        print(f"registration: {reg.get('validity')} ({reg.get('registration_summary', '')}); "
              f"review images: {', '.join(reg.get('review_images') or []) or 'none'}")
        for r in s.get("reviews", []):  # the demo stands in for the clinician who looked
            print(f"review: {r['message']} (acknowledged by the demo)")
        cl.choose(s["session_id"], plan, [r["name"] for r in s.get("reviews", [])])
        s = cl.wait_for_state(s["session_id"], HANDOFF_ENDS, 120, poll_s=0.25)
        _print_timeline(s)
        if s["state"] != "handed_off":
            raise ServiceError(f"hand-off failed: {s['error']}")
        uids = [i["sop_instance_uid"] for i in s["handoff"]["instances"]]
        for line in tms.describe_stored(uids):
            print(f"  stored: {line}")
        return 0
    finally:
        if cl:
            cl.close()
        if stack:
            stack.stop()
        tms.stop()
        print(f"demo finished in {time.monotonic() - t_start:.1f} s; everything stopped")


def _print_timeline(s: dict) -> None:
    print("\nper-stage timeline:")
    t0 = s["history"][0]["t"]
    for h in s["history"]:
        print(f"  +{h['t'] - t0:8.2f} s  {h['to']:<18} {h['note']}")
    plans = s.get("plans") or {}
    for name, rec in (("registration", None), ("planning", plans)):
        st = s.get("stages", {}).get(name, {})
        if "duration_s" in st:
            print(f"  {name}: {st['duration_s']:.1f} s (budget {st.get('budget_s', 0):g} s)")
        t = (rec or {}).get("timings_s") or {}
        if t:
            print("    worker steps: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    _print_metrics(s.get("metrics") or {})
    s = {k: v for k, v in s.items() if k != "metrics"}
    print(format_session(s))


def _print_metrics(m: dict) -> None:
    """The scheduled-vs-adapted goal table the clinician sees (total-course Gy; V in %)."""
    rows = m.get("rows") or []
    if not rows:
        return
    print(f"\nscheduled (recalculated on today's anatomy) vs adapted, {m.get('units', '')}:")
    print(f"  {'structure':<10} {'goal':<18} {'scheduled':>14} {'adapted':>14}")

    def cell(v, ok):
        return f"{'n/a' if v is None else f'{v:.2f}'} {'ok' if ok else 'FAIL':<4}"
    for r in rows:
        print(f"  {r['structure']:<10} {r['goal']:<18} "
              f"{cell(r['scheduled_value'], r['scheduled_passed']):>14} "
              f"{cell(r['adapted_value'], r['adapted_passed']):>14}")
    print(f"  goals met: scheduled {m.get('scheduled_goals_passed')}/{m.get('n_goals')}, "
          f"adapted {m.get('adapted_goals_passed')}/{m.get('n_goals')}")
