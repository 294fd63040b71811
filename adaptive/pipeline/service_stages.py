"""The pipeline's entry points for the services' workers (see services/workers/stages.py for
the payload/result contract). Thin: they call the same stage functions as the offline chain
(:mod:`adaptive.pipeline.fraction`) and return JSON-able records.

Clinical goals: the workers use ``$ADAPTIVE_GOALS`` if set, else ``config/goals/prostate.toml``;
the scheduled plan's prescription must match the goals file (checked, clear error otherwise).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from adaptive.pipeline.fraction import Progress, planning_stage, registration_stage


def goals_path() -> Path:
    from adaptive.config import config_path

    p = os.environ.get("ADAPTIVE_GOALS")
    return Path(p) if p else config_path("goals", "prostate.toml")


def service_registration_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir, out_dir,
                               budget_s: float | None = None,
                               progress: Progress | None = None) -> dict:
    """Registration worker stage. ``budget_s``: seconds left of the stage budget (the
    deformable step is cut to fit; ``fallback="rigid"`` then). Returns the registration
    record of :func:`adaptive.pipeline.fraction.registration_stage`."""
    return registration_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir, out_dir,
                              budget_s=budget_s, progress=progress)


def service_planning_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir,
                           registration: dict, out_dir, budget_s: float | None = None,
                           progress: Progress | None = None) -> dict:
    """Planning worker stage: ``{"adapted": {...}, "scheduled": {...}, "metrics": {...},
    "fallback": None | "best_iterate", ...}``. ``budget_s`` sets the optimiser deadline
    (:func:`adaptive.pipeline.fraction.optimizer_deadline`). The planning CT, planning RT
    Struct and CBCT are not re-read: the registration record carries everything derived from
    them (synthetic CT covering the planning CT's extent, propagated structures, rigid
    matrix)."""
    from adaptive.optimization.goals import load_goals

    t0 = time.perf_counter()
    goals = load_goals(goals_path())
    left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
    po = planning_stage(rtplan_path, registration, out_dir, goals, budget_s=left,
                        progress=progress)
    return po.result
