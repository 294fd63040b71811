"""``adaptive plan CT_DIR RS.dcm --goals GOALS.toml -o OUT [--reference RP.dcm]``: optimise,
sequence, recalculate and check an IMRT plan; write RP.dcm, RD.dcm, plan_report.json."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="optimise a step-and-shoot IMRT plan (from scratch or "
                                           "adapted from a reference plan)")
    p.add_argument("ct_dir", help="planning (or synthetic) CT series folder")
    p.add_argument("rtstruct", help="RT Structure Set on that CT")
    p.add_argument("--goals", required=True, help="clinical goals TOML (config/goals/<site>.toml)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--reference", help="reference RT Plan to adapt (warm start, PREDECESSOR)")
    p.add_argument("--deadline", type=float, default=None,
                   help="fluence optimisation budget in seconds (best iterate when reached)")
    p.add_argument("--beams", type=int, default=9, help="beams of a plan from scratch (default 9)")
    p.add_argument("--label", default="ADAPTIVE", help="RT Plan Label (max 16 characters)")
    p.add_argument("--correction-rounds", type=int, default=1,
                   help="segment-weight re-optimisations with the plan-dose correction (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    from adaptive.dicom.ct_series import read_ct_series  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dicom.enums import DoseSummationType  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dicom.rtplan import read_rtplan  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dicom.rtstruct import read_rtstruct  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.optimization.goals import goal_table, load_goals  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.pipeline.planning import PlanSettings, plan_case, write_plan_outputs  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    goals = load_goals(args.goals)
    ct, series = read_ct_series(args.ct_dir)
    ss = read_rtstruct(args.rtstruct, series=series, grid=ct.grid)
    ref = read_rtplan(args.reference) if args.reference else None
    settings = PlanSettings(deadline_s=args.deadline, n_beams=args.beams,
                            correction_rounds=args.correction_rounds)
    res = plan_case(ct, series, ss, goals, reference=ref, settings=settings, label=args.label)
    print(goal_table(res.goals_fluence, "Optimised fluence (Dij dose):"))
    print()
    print(goal_table(res.goals_deliverable, "Deliverable plan (sequenced, plan-dose engine):"))
    print()
    print(res.checks.summary())
    print(f"total MU {res.plan.total_mu:.1f}; segments per beam "
          f"{[len(b.segments()) for b in res.plan.beams]}")
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings_s.items()))
    uids = {"ct_series": series.series_instance_uid, "rtstruct": ss.sop_instance_uid}
    if ref is not None:
        uids["predecessor_plan"] = ref.sop_instance_uid
    params = {"goals_file": str(args.goals), "goals": goals.to_dict(),
              "settings": settings.__dict__, "n_beams": args.beams}
    # MU per fraction of an N-fraction plan: the RT Dose holds one session of its fraction group
    write_plan_outputs(res, series, args.out, study=series.study, image_grid=ct.grid,
                       summation=DoseSummationType.FRACTION_SESSION, input_uids=uids,
                       parameters=params)
    print(f"wrote {args.out}/RP.dcm, RD.dcm, plan_report.json")
    return 0
