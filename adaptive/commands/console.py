"""``adaptive console``: the therapist's terminal client (docs/console-protocol.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("console", help="talk to the orchestrator: start, status, "
                              "watch, choose, cancel")
    p.add_argument("--config", default=None,
                   help="services TOML (endpoints; where they say port 0, the running "
                        "orchestrator's <paths.root>/run/orchestrator.json is read)")
    p.add_argument("--json", action="store_true", help="print raw JSON")
    p.add_argument("--key", default="console",
                   help="this client's key under <paths.root>/keys (default 'console', a "
                        "therapist; a viewer key may only look: status, watch, review)")
    sub = p.add_subparsers(dest="console_cmd", metavar="ACTION", required=True)
    s = sub.add_parser("start", help="start (or attach to) a session")
    s.add_argument("room")
    s.add_argument("patient_id")
    s.add_argument("--protocol", default=None,
                   help="clinical protocol (a goals file stem in config/goals, e.g. prostate); "
                        "default: mapped from the scheduled plan (config/protocols.toml)")
    s = sub.add_parser("status", help="status of a session (by id or room) or of all")
    s.add_argument("--session", default=None)
    s.add_argument("--room", default=None)
    s = sub.add_parser("watch", help="print session events as they happen")
    s.add_argument("--room", default=None)
    s.add_argument("--timeout", type=float, default=3600.0)
    s = sub.add_parser("choose", help="choose the plan to hand off")
    s.add_argument("session")
    s.add_argument("plan", choices=["scheduled", "adapted"])
    s.add_argument("--acknowledge", action="append", default=[], metavar="CHECK",
                   help=("a review check looked at (repeat; needed for the adapted plan "
                         "when the session lists reviews)"))
    s = sub.add_parser("review", help="save the session's registration review images")
    s.add_argument("session")
    s.add_argument("-o", "--out", required=True, help="directory for the PNG files")
    s = sub.add_parser("retry-handoff", help=("send the chosen plan to the TMS again after "
                                              "a failed hand-off (same objects and SOP "
                                              "Instance UIDs)"))
    s.add_argument("session")
    s = sub.add_parser("cancel", help="cancel a session")
    s.add_argument("session")
    s.add_argument("--reason", default="cancelled at the console")
    p.set_defaults(func=run)


def format_session(s: dict) -> str:
    lines = [(f"session {s['session_id']}  room {s['room']}  patient {s['patient_id']}  "
             f"state {s['state']}")]
    if s.get("protocol"):
        lines.append(f"  protocol: {s['protocol']['name']} ({s['protocol']['source']})")
    if s.get("offered"):
        lines.append(f"  offered: {', '.join(s['offered'])}")
    for name, st in s.get("stages", {}).items():
        if "duration_s" in st:
            b = f" / budget {st['budget_s']:g} s" if st.get("budget_s") else ""
            lines.append(f"  {name:<12} {st['duration_s']:8.2f} s{b}")
    for ex in s.get("budgets_exceeded", []):
        lines.append(f"  BUDGET EXCEEDED {ex['stage']}: {ex['elapsed_s']:.1f} s > "
                     f"{ex['budget_s']:g} s -> {ex['action']}")
    for n in s.get("notes", []):
        lines.append(f"  note: {n}")
    summary = (s.get("metrics") or {}).get("dose_summary")
    if summary:
        cells = [f"{roi} D95 {v['D95']:.3g} Dmean {v['Dmean']:.3g}"
                 for roi, v in summary.get("adapted", {}).items() if v]
        lines.append(f"  adapted dose, {summary['units']}: " + "; ".join(cells))
    for c in s.get("checks_failed", []):
        lines.append(f"  CHECK FAILED {c['check']} ({c['stage']}): {c['message']}")
    for c in s.get("reviews", []):
        lines.append(f"  REVIEW {c['name']}: {c['message']}")
    if s.get("metrics"):
        lines.append("  metrics: " + json.dumps(s["metrics"])[:500])
    if s.get("handoff"):
        h = s["handoff"]
        lines.append(f"  hand-off: {h.get('plan')} -> {h.get('tms')}: {h.get('outcome')} "
                     f"(outbox {h.get('outbox')})")
        for i in h.get("recorded") or []:
            if i["status"] != "stored":
                lines.append(f"    {i['status'].upper()} {i['sop_instance_uid']} "
                             f"({i['attempts']} attempt(s)) {i['error']}")
    if s.get("error"):
        lines.append(f"  error: {s['error']}")
    return "\n".join(lines)


def run(args) -> int:
    from services.config import load_services_config  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from services.console import ConsoleClient  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    cfg = load_services_config(args.config)
    cl = ConsoleClient.from_config(cfg, key=args.key)
    out = None
    try:
        c = args.console_cmd
        if c == "start":
            out = cl.start(args.room, args.patient_id, args.protocol)
        elif c == "status":
            r = cl.status(args.session, args.room)
            out = r.get("session") or r.get("sessions")
        elif c == "choose":
            out = cl.choose(args.session, args.plan, args.acknowledge)
        elif c == "review":
            r = cl.review(args.session)
            d = Path(args.out)
            d.mkdir(parents=True, exist_ok=True)
            for im in r["images"]:
                (d / Path(im["name"]).name).write_bytes(im["png"])
                print(d / Path(im["name"]).name)
            print(f"registration {r['validity']}: {r['summary']}")
            return 0
        elif c == "cancel":
            out = cl.cancel(args.session, args.reason)
        elif c == "retry-handoff":
            out = cl.retry_handoff(args.session)
        elif c == "watch":
            for ev in cl.events(args.room, timeout_s=args.timeout):
                if args.json:
                    print(json.dumps(ev), flush=True)
                else:
                    t = time.strftime("%H:%M:%S", time.localtime(ev["t"]))
                    det = {k: v for k, v in ev.get("details", {}).items()
                           if k not in ("metrics", "sop_instance_uids")}
                    print(f"{t} {ev.get('room', '-'):<8} {ev.get('state', ''):<18} "
                          f"{ev['event']:<20} {json.dumps(det)[:200]}", flush=True)
            return 0
    finally:
        cl.close()
    if args.json or not isinstance(out, (dict, list)):
        print(json.dumps(out, indent=2))
    elif isinstance(out, list):
        for s in out:
            print(format_session(s))
    else:
        print(format_session(out))
    return 0
