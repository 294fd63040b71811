"""The pipeline's entry points for the services' workers (see services/workers/stages.py for
the payload/result contract). Thin: they call the same stage functions as the offline chain
(:mod:`adaptive.pipeline.fraction`) and return their records validated against the typed
models of :mod:`adaptive.pipeline.records` (as JSON-able dicts: they cross a process
boundary).

Clinical goals: each planning task names the session's clinical protocol (payload
``protocol``: ``{"name", "source"}``, see :mod:`adaptive.optimization.protocols`); the stage
plans with ``config/goals/<name>.toml`` and records the protocol in the result and in the
provenance of what it writes. The scheduled plan's prescription must match the protocol's
(checked, clear error otherwise).
"""

from __future__ import annotations

import os
import time

from adaptive.pipeline.fraction import Progress, planning_stage, registration_stage
from adaptive.pipeline.records import PlanningRecord, RegistrationRecord


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
    rec = registration_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir, out_dir,
                             budget_s=budget_s, progress=progress,
                             spatial_registration=spatial_registration,
                             config=os.environ.get("ADAPTIVE_REGISTRATION_CONFIG") or None)
    return RegistrationRecord.model_validate(rec).model_dump(mode="json")


def service_planning_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir,
                           registration: dict, out_dir, protocol: dict,
                           budget_s: float | None = None,
                           progress: Progress | None = None) -> dict:
    """Planning worker stage: ``{"adapted": {...}, "scheduled": {...}, "metrics": {...},
    "fallback": None | "best_iterate", "protocol": {...}, ...}``. ``protocol``: the
    session's clinical protocol ``{"name", "source"}`` (goals ``config/goals/<name>.toml``). ``budget_s`` sets the optimiser deadline
    (:func:`adaptive.pipeline.fraction.optimizer_deadline`). The planning CT, planning RT
    Struct and CBCT are not re-read: the registration record carries everything derived from
    them (synthetic CT covering the planning CT's extent, propagated structures, rigid
    matrix)."""
    from adaptive.optimization.protocols import load_protocol

    t0 = time.perf_counter()
    goals = load_protocol(protocol["name"])
    left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
    po = planning_stage(rtplan_path, registration, out_dir, goals, budget_s=left,
                        progress=progress, protocol=protocol)
    return PlanningRecord.model_validate(po.result).model_dump(mode="json")
