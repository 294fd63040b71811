"""Archive replay throughput: fractions per hour with 1 and 2 Dask worker processes.

The archive is the committed pelvis case (``replay_data/pelvis01``: planning CT, RT Struct,
scheduled plan, every daily CBCT; ``ADAPTIVE_BENCH_REPLAY_ARCHIVE`` names another folder),
replayed from scratch (fresh output folder: nothing resumed) by
:func:`adaptive.replay.archive.replay_archive` on a LocalCluster, chain at its default
settings (3 mm dose grid, 5 mm beamlets, no deadline), reports included. Throughput =
fractions replayed ÷ wall time of the whole run (cluster start-up, discovery, hashing,
every fraction, the summary). The committed plan names no treatment protocol, so the goals
are ``config/goals/prostate.toml`` (``--goals``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

from adaptive.config import config_path
from adaptive.replay.archive import ClusterSettings, replay_archive

REPO = Path(__file__).resolve().parents[2]
WORKERS = (1, 2)


def _first_fraction_copy(archive: Path, to: Path) -> Path:
    """``archive`` with its planning data and only its first fraction (the smoke run)."""
    first = min(p for p in archive.iterdir() if p.is_dir() and p.name.startswith("fx"))
    for d in (archive / "planning", first):
        shutil.copytree(d, to / d.name)
    return to


def run(args) -> str:
    archive = Path(os.environ.get("ADAPTIVE_BENCH_REPLAY_ARCHIVE")
                   or REPO / "replay_data" / "pelvis01")
    lines = ["## replay", ""]
    if not archive.is_dir():
        return "\n".join(lines + [f"No archive ({archive} missing): nothing to measure.", ""])
    load = os.getloadavg()
    lines += [(f"Archive `{archive.relative_to(REPO) if archive.is_relative_to(REPO) else archive}`"
              f", replayed from scratch once per worker count (`replay_archive`, LocalCluster of "
              f"worker processes x 1 thread, numba/ITK threads = cores / workers), goals "
              f"`config/goals/prostate.toml`. Load average before the runs: "
              f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on "
              f"{os.cpu_count()} cores: the machine is shared with other work, so these are "
              f"lower bounds of what it does alone."), "",
              ("| workers | fractions replayed | failed | wall time (s) | fractions per hour | "
              "task time per fraction, median (s) | chain time per fraction, median (s) |"),
              "|---|---|---|---|---|---|---|"]
    smoke = bool(getattr(args, "smoke", False))  # one worker, the first fraction only
    for n in (1,) if smoke else WORKERS:
        with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
            src = _first_fraction_copy(archive, Path(tmp) / "archive") if smoke else archive
            res = replay_archive(src, Path(tmp) / "out",
                                 goals_override=str(config_path("goals", "prostate.toml")),
                                 cluster=ClusterSettings(n_workers=n), progress=False,
                                 announce=lambda s: None)
        done = [r for r in res.rows if r.get("status") == "done" and not r.get("skipped")]
        task = [r["time_task_s"] for r in done if r.get("time_task_s")]
        chain = [r["time_chain_s"] for r in done if r.get("time_chain_s")]
        rate = 3600.0 * len(done) / res.wall_time_s if res.wall_time_s else float("nan")
        lines.append(f"| {n} | {len(done)} | {len(res.failed)} | {res.wall_time_s:.0f} | "
                     f"{rate:.1f} | {statistics.median(task) if task else float('nan'):.0f} | "
                     f"{statistics.median(chain) if chain else float('nan'):.0f} |")
    load = os.getloadavg()
    lines += ["", (f"Load average after the runs: {load[0]:.1f} / {load[1]:.1f} / "
                  f"{load[2]:.1f}. Task time = chain + report + input hashing in the worker; "
                  f"the first fraction of each worker process also pays the itk/numba imports "
                  f"and elastix's first-registration warm-up."), ""]
    return "\n".join(lines)
