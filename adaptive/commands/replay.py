"""``adaptive replay PATH -o OUT``: archived fractions through the services' chain
(register → synthetic CT + contours → warm-started re-optimisation → sequencing → checks →
scheduled-vs-adapted comparison), with a report per fraction.

* ``PATH`` a fraction folder of the replay layout (``<case>/fxNN`` with ``CBCT/`` and the
  case's ``planning/``): that one fraction, in this process; OUT receives the chain's
  outputs, ``report.html`` and ``fraction.json``; the comparison is printed.
* ``PATH`` any other folder of DICOM (a clinic's export: one or many patients, any layout):
  every fraction found in it (:mod:`adaptive.replay.discover`) on Dask
  (:mod:`adaptive.replay.archive`), resumable; OUT receives ``index.html``,
  ``summary.csv`` and one folder per fraction.
* ``--from-orthanc URL``: the patients (``--patient``, default all) are pulled from an
  Orthanc server first (:mod:`adaptive.replay.orthanc_pull`) into ``OUT/archive`` and replayed.

Exit status: 0 when every fraction was replayed (and, for one fraction, its adapted plan
passed its checks), 2 when a fraction failed or its adapted plan did not pass, 1 on errors.
"""

from __future__ import annotations

import json
from pathlib import Path

from adaptive.errors import ReplayDataError
from adaptive.log import bind


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="replay archived fractions (one, or a whole "
                                             "archive on Dask) with reports")
    p.add_argument("path", nargs="?", help="a fraction folder (<case>/fxNN with CBCT/) or a "
                                           "folder of DICOM holding one or many patients")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--goals", default=None,
                   help="clinical goals TOML for every patient (default: the services' "
                        "default goals)")
    p.add_argument("--deadline", type=float, default=None,
                   help="optimisation budget (s); default: run to convergence (reproducible)")
    p.add_argument("--registration-budget", type=float, default=None,
                   help="registration budget (s); the deformable step falls back to rigid")
    p.add_argument("--dose-grid-mm", type=float, default=None,
                   help="dose grid spacing (mm; default that of the planning settings, 3)")
    p.add_argument("--bixel-mm", type=float, default=None,
                   help="beamlet size (mm; default that of the planning settings, 5)")
    p.add_argument("--workers", type=int, default=None,
                   help="local Dask worker processes (default: the machine's cores)")
    p.add_argument("--scheduler", default=None,
                   help="run on an existing Dask cluster (tcp://HOST:8786); the archive and "
                        "OUT must be at the same path on every worker")
    p.add_argument("--dashboard-port", type=int, default=0,
                   help="local Dask dashboard port on 127.0.0.1 (default: any free port)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-orthanc", default=None, metavar="URL",
                   help="pull the archive from this Orthanc (REST API) first")
    p.add_argument("--patient", action="append", default=None,
                   help="with --from-orthanc: a Patient ID to pull (repeatable; default all)")
    p.set_defaults(func=run)


def _chain_settings(args):
    from adaptive.replay.chain import ChainSettings  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    return ChainSettings(deadline_s=args.deadline, registration_budget_s=args.registration_budget,
                         dose_grid_spacing_mm=args.dose_grid_mm, bixel_size_mm=args.bixel_mm)


def is_fraction_folder(path: Path) -> bool:
    """A fraction folder of the replay layout: ``CBCT/`` inside, ``planning/`` beside."""
    return (path / "CBCT").is_dir() and (path.parent / "planning").is_dir()


def run(args) -> int:

    if args.from_orthanc:
        from adaptive.replay.orthanc_pull import pull_patients  # noqa: PLC0415 - deferred: loaded when the subcommand runs

        archive = Path(args.out) / "archive"
        got = pull_patients(args.from_orthanc, archive, patient_ids=args.patient)
        print(f"pulled {sum(got.values())} instances of {len(got)} patient(s) from "
              f"{args.from_orthanc} into {archive}")
        return _run_archive(archive, args)
    if not args.path:
        raise ReplayDataError("give a fraction or archive folder, or --from-orthanc URL")
    path = Path(args.path)
    if is_fraction_folder(path):
        return _run_one(path, args)
    return _run_archive(path, args)


def _run_archive(archive: Path, args) -> int:
    from adaptive.replay.archive import ClusterSettings, replay_archive  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    res = replay_archive(archive, args.out, goals_override=args.goals,
                         chain=_chain_settings(args),
                         cluster=ClusterSettings(args.scheduler, args.workers,
                                                 args.dashboard_port),
                         progress=not args.no_progress)
    print(f"{len(res.rows)} fractions: {res.counts}; {res.wall_time_s:.0f} s")
    print(f"summary: {Path(args.out) / 'index.html'} and {Path(args.out) / 'summary.csv'}")
    return 2 if res.failed else 0


def _run_one(fx: Path, args) -> int:
    from adaptive.replay.archive import one_fraction_job, run_job  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    bind(case_id=fx.resolve().parent.name, fraction=fx.name)
    job = one_fraction_job(fx, args.out, goals_override=args.goals,
                           chain=_chain_settings(args))
    row = run_job(job, in_process=True, clean=False)
    if row.get("status") != "done":
        print(f"FAILED at {row.get('failed_stage')}: {row.get('reason')}")
        return 2
    print(f"registration: fallback={row.get('registration_fallback')}, "
          f"Jacobian min {row.get('jacobian_min')}")
    print("\nscheduled (on today's anatomy) vs adapted, total-course doses (V: %):")
    print(goal_table(row["goals"]))
    print(f"\nadapted plan: {'written' if row.get('adapted_plan_written') else 'NOT WRITTEN'}"
          f"{'' if row.get('adapted_plan_written') else ': ' + row.get('adapted_missing_reason', '')}")
    print(f"report: {Path(args.out) / 'report.html'}\n")

    t = json.loads((Path(args.out) / "timings.json").read_text())
    print(f"{'stage':<40} {'seconds':>8}")
    for k, v in t.items():
        print(f"{k:<40} {v:>8.2f}")
    return 0 if row.get("adapted_plan_written") else 2


def goal_table(rows: list[dict]) -> str:
    """The goal rows of a planning record as a text table."""
    def cell(v, ok, unit):
        if v is None:
            return f"{'n/a':>12} {'':<4}"
        return f"{v:>9.2f} {unit:<2} {'ok' if ok else 'FAIL':<4}"

    lines = [f"{'structure':<12} {'goal':<20} {'scheduled':>17} {'adapted':>17}"]
    for r in rows:
        unit = "%" if r["goal"].startswith("V") else "Gy"
        lines.append(f"{r['structure']:<12} {r['goal']:<20} "
                     f"{cell(r.get('scheduled_value'), r.get('scheduled_passed'), unit)} "
                     f"{cell(r.get('adapted_value'), r.get('adapted_passed'), unit)}")
    return "\n".join(lines)
