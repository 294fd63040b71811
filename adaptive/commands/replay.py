"""``adaptive replay FRACTION_DIR -o OUT``: the offline adaptive chain for one archived
fraction (register → synthetic CT + contours → Dij → warm-started re-optimisation →
sequencing → deliverable dose → checks → scheduled-vs-adapted comparison).

OUT/ receives ``dvf.mha``, ``synthetic_ct/``, ``RS.dcm`` (propagated), ``REG.dcm``,
``registration.json``, the adapted ``RP.dcm`` + ``RD.dcm`` (only if it passed its checks),
``scheduled_today/RD.dcm`` (scheduled plan on today's anatomy), ``comparison.json``,
``plan_report.json`` and ``timings.json``."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="replay the adaptive chain on an archived fraction")
    p.add_argument("fraction_dir", help="fraction folder (<case>/fxNN, with CBCT/)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--goals", default=None,
                   help="clinical goals TOML (default config/goals/prostate.toml)")
    p.add_argument("--deadline", type=float, default=None, help="optimisation budget (s)")
    p.add_argument("--registration-budget", type=float, default=None,
                   help="registration budget (s); the deformable step falls back to rigid")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from adaptive.config import config_path
    from adaptive.optimization.goals import load_goals
    from adaptive.pipeline.fraction import run_fraction
    from adaptive.pipeline.session import PlanSettings

    from adaptive.log import bind

    fx = Path(args.fraction_dir)
    bind(case_id=fx.resolve().parent.name, fraction=fx.name)
    goals = load_goals(args.goals or config_path("goals", "prostate.toml"))
    res = run_fraction(fx.parent, fx, goals, settings=PlanSettings(deadline_s=args.deadline),
                       out_dir=args.out, registration_budget_s=args.registration_budget)
    reg = res.registration
    print(f"registration: fallback={reg['fallback']}; quality "
          f"{ {k: v for k, v in reg['quality'].items() if not isinstance(v, (dict, list))} }")
    print()
    print("scheduled (recalculated on the synthetic CT) vs adapted, total-course doses:")
    print(res.comparison.table())
    print()
    print(res.adapted.checks.summary())
    a = res.result["adapted"]
    print(f"\nadapted plan: {a['rtplan'] or 'NOT WRITTEN (failed its checks)'}; "
          f"fallback={res.result['fallback']}")
    print()
    print(f"{'stage':<40} {'seconds':>8}")
    for k, v in res.timings_s.items():
        print(f"{k:<40} {v:>8.2f}")
    return 0 if a["checks_passed"] else 2
