"""``adaptive replay-data``: build the replay cases (phantoms, CBCTs, ground truth) and list them."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("replay-data", help="build or list replay cases with ground truth",
                              description="Replay cases: analytic phantoms as DICOM, simulated CBCT "
                                          "fractions with ground-truth deformations, manifest.toml.")
    sub = p.add_subparsers(dest="replay_command", metavar="ACTION")
    b = sub.add_parser("build", help="deterministically (re)build replay cases")
    b.add_argument("--out", default=None,
                   help="output folder (default replay_data, or replay_data_large with --large)")
    b.add_argument("--seed", type=int, default=None, help="generator seed (default from config/replay.toml)")
    b.add_argument("--case", action="append", default=None, metavar="NAME",
                   help="build only this case (repeatable): pelvis, tg119_cshape, tg119_prostate")
    b.add_argument("--large", action="store_true",
                   help="build the large fine-grid pelvis case (not committed) instead")
    b.add_argument("--no-plan", action="store_true",
                   help="do not plan the pelvis case's scheduled plan (planning/RP.dcm)")
    b.add_argument("--config", default=None, help="generator parameters (default config/replay.toml)")
    b.set_defaults(func=_build)
    ls = sub.add_parser("list", help="summarise a replay folder's manifest")
    ls.add_argument("--dir", default="replay_data", help="folder holding manifest.toml")
    ls.set_defaults(func=_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _build(args: argparse.Namespace) -> int:
    from adaptive.replay.build import build_replay_data, load_replay_config  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    out = args.out or ("replay_data_large" if args.large else "replay_data")
    path = build_replay_data(out, seed=args.seed, cases=args.case, large=args.large,
                             config=load_replay_config(args.config),
                             scheduled_plan=not args.no_plan)
    _print_manifest(path)
    return 0


def _list(args: argparse.Namespace) -> int:
    _print_manifest(args.dir)
    return 0


def _print_manifest(path) -> None:
    from adaptive.replay.manifest import load_manifest  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    m = load_manifest(path)
    print(f"{m.path} (schema {m.schema_version}, adaptive {m.software_version}, seed {m.seed})")
    for c in m.cases:
        g = c.planning_grid
        rx = (f"{c.prescription.total_dose_gy:g} Gy / {c.prescription.number_of_fractions} fx"
              if c.prescription else "no prescription")
        print(f"  {c.name:16s} {c.anatomy:15s} planning {g.shape_zyx[::-1]} @ {g.spacing_mm} mm, {rx}, "
              f"{len(c.fractions)} fractions, {c.size_bytes / 1e6:.1f} MB, "
              f"RP.dcm {'present' if c.has_rtplan else 'absent'}")
