"""``adaptive replay FRACTION_DIR -o OUT``: the offline adaptive chain for one archived
fraction (register → synthetic CT + contours → Dij → warm-started re-optimisation →
sequencing → deliverable dose → checks → scheduled-vs-adapted comparison)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="replay the adaptive chain on an archived fraction")
    p.add_argument("fraction_dir", help="fraction folder (<case>/fxNN, with CBCT/)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--goals", default=None,
                   help="clinical goals TOML (default config/goals/prostate.toml)")
    p.add_argument("--deadline", type=float, default=None, help="optimisation budget (s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from adaptive.config import config_path
    from adaptive.optimization.goals import load_goals
    from adaptive.pipeline.session import PlanSettings, run_fraction

    fx = Path(args.fraction_dir)
    goals = load_goals(args.goals or config_path("goals", "prostate.toml"))
    res = run_fraction(fx.parent, fx, goals, settings=PlanSettings(deadline_s=args.deadline),
                       out_dir=args.out)
    print(res.comparison.table())
    print()
    print(res.adapted.checks.summary())
    print()
    print(f"{'stage':<36} {'seconds':>8}")
    for k, v in res.timings_s.items():
        print(f"{k:<36} {v:>8.2f}")
    (Path(args.out) / "comparison.json").write_text(res.comparison.to_json())
    return 0
