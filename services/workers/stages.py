"""The production worker handlers: thin calls into :mod:`adaptive.pipeline`, the same
stage functions the offline ``adaptive replay`` chain uses.

Task contract (the orchestrator builds the payloads; paths are on the shared store):

registration payload
    ``session_id``, ``patient_id``, ``planning_ct_dir``, ``rtstruct_path``,
    ``rtplan_path``, ``cbct_dir``, ``out_dir``; the budget arrives as the task deadline
    (``ctx.remaining_s()``).
registration result
    JSON-able dict from the pipeline's registration stage (synthetic CT folder,
    propagated structure set, registration object paths, quality, timings) with
    ``fallback`` = None or ``"rigid"`` when the deadline forced the rigid result.

planning payload
    as above plus ``registration`` (the registration result).
planning result
    ``{"adapted": {"rtplan", "rtstruct", "rtdose", "registration", "checks_passed",
    "checks": [{"name", "passed", "message"}]}, "scheduled": {"rtplan", "rtdose", ...},
    "metrics": {...}, "fallback": None | "best_iterate"}``. Only an adapted plan with
    ``checks_passed`` true is ever offered for hand-off.

If the pipeline's stage functions are not installed, the task fails with
:class:`StageUnavailableError` (the session falls back to the scheduled plan) - there is
no stand-in computation here.
"""

from __future__ import annotations

import importlib

from adaptive.errors import StageUnavailableError

REGISTRATION_FN = "service_registration_stage"
PLANNING_FN = "service_planning_stage"


def _pipeline_fn(name: str):
    try:
        mod = importlib.import_module("adaptive.pipeline")
    except ImportError as e:
        raise StageUnavailableError(f"adaptive.pipeline is not installed: {e}") from e
    fn = getattr(mod, name, None)
    if fn is None:
        raise StageUnavailableError(f"adaptive.pipeline has no {name}(); the online "
                                    f"services need it (see services/workers/stages.py)")
    return fn


def run_registration(payload: dict, arrays: dict, ctx) -> dict:
    ctx.progress("registration", 0.0)
    fn = _pipeline_fn(REGISTRATION_FN)
    result = fn(planning_ct_dir=payload["planning_ct_dir"],
                rtstruct_path=payload["rtstruct_path"], rtplan_path=payload["rtplan_path"],
                cbct_dir=payload["cbct_dir"], out_dir=payload["out_dir"],
                budget_s=ctx.remaining_s(), progress=ctx.progress)
    ctx.progress("registration", 1.0)
    return result


def run_planning(payload: dict, arrays: dict, ctx) -> dict:
    ctx.progress("planning", 0.0)
    fn = _pipeline_fn(PLANNING_FN)
    result = fn(planning_ct_dir=payload["planning_ct_dir"],
                rtstruct_path=payload["rtstruct_path"], rtplan_path=payload["rtplan_path"],
                cbct_dir=payload["cbct_dir"], registration=payload["registration"],
                out_dir=payload["out_dir"], budget_s=ctx.remaining_s(), progress=ctx.progress)
    ctx.progress("planning", 1.0)
    return result


def _warm_up_registration() -> None:
    from adaptive.registration.core import warm_up

    warm_up()


run_registration.warm_up = _warm_up_registration
