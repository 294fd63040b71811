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
                               progress: Progress | None = None,
                               spatial_registration=None) -> dict:
    """Registration worker stage. ``budget_s``: seconds left of the stage budget (the
    deformable step is cut to fit; ``fallback="rigid"`` then). ``spatial_registration``: a
    rigid Spatial Registration received with the CBCT (path), one candidate of the initial
    alignment. ``$ADAPTIVE_REGISTRATION_CONFIG``: another registration config (default
    ``config/registration.toml``). Returns the registration record of
    :func:`adaptive.pipeline.fraction.registration_stage`."""
    return registration_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir, out_dir,
                              budget_s=budget_s, progress=progress,
                              spatial_registration=spatial_registration,
                              config=os.environ.get("ADAPTIVE_REGISTRATION_CONFIG") or None)


def service_planning_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir,
                           registration: dict, out_dir, budget_s: float | None = None,
                           progress: Progress | None = None) -> dict:
    """Planning worker stage: ``{"adapted": {...}, "scheduled": {...}, "metrics": {...},
    "fallback": None | "best_iterate", ...}``. ``budget_s`` sets the optimiser deadline
    (:func:`adaptive.pipeline.fraction.optimizer_deadline`). The planning CT, planning RT
    Struct and CBCT are not re-read: the registration record carries everything derived from
    them (synthetic CT, propagated structures, rigid matrix); the planning CT completes the
    synthetic CT beyond the CBCT's volume for dose."""
    from adaptive.optimization.goals import load_goals

    t0 = time.perf_counter()
    goals = load_goals(goals_path())
    left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
    po = planning_stage(rtplan_path, registration, out_dir, goals, budget_s=left,
                        progress=progress, planning_ct_dir=planning_ct_dir)
    return po.result
