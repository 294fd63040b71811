"""The production worker handlers: thin calls into :mod:`adaptive.pipeline`, the same
stage functions the offline ``adaptive replay`` chain uses.

Task contract (the orchestrator builds the payloads; paths are on the shared store):

registration payload
    ``session_id``, ``patient_id``, ``planning_ct_dir``, ``rtstruct_path``,
    ``rtplan_path``, ``cbct_dir``, ``out_dir``, optional ``spatial_registration`` (a rigid
    Spatial Registration received with the CBCT: one candidate of the initial alignment);
    the budget arrives as the task deadline (``ctx.remaining_s()``).
registration result
    JSON-able dict from the pipeline's registration stage (synthetic CT folder,
    propagated structure set, registration object paths, quality, timings) with
    ``fallback`` = None or ``"rigid"`` when the deadline forced the rigid result, and the
    safety gate's verdict: ``validity`` ("deformable" | "rigid" | "none"),
    ``registration_checks`` (named checks with their numbers), ``review_images``.

planning payload
    as above plus ``registration`` (the registration result) and ``protocol`` (the
    session's clinical protocol ``{"name", "source"}``: the goals it is planned with).
planning result
    ``{"adapted": {"rtplan", "rtstruct", "rtdose", "registration", "checks_passed",
    "checks": [{"name", "passed", "message"}]}, "scheduled": {"rtplan", "rtdose", ...},
    "metrics": {...}, "fallback": None | "best_iterate"}``. Only an adapted plan with
    ``checks_passed`` true is ever offered for hand-off.

The stage functions are imported directly from :mod:`adaptive.pipeline.fraction`
(:func:`registration_task` and :func:`planning_task` adapt the task payload to them); there
is no stand-in computation here.

Each stage runs in a child process forked from the worker (:func:`run_in_child`, through
:func:`adaptive.forked.call_in_child`): native code (ITK/elastix, numba) can hold the GIL for
tens of seconds, which would starve the worker's heartbeat thread and make the broker declare
a busy worker dead. The child inherits the worker's warmed-up state (fork), reports progress
and its result over a pipe, and dies with the worker (parent-death signal; the registration's
own B-spline grandchild dies with it the same way), so a killed worker leaves no orphan
computing. A ``CANCEL`` from the broker kills the child at once and the worker becomes idle.

Results are sealed at this boundary (:func:`seal`): validated against the typed stage
record (:mod:`adaptive.pipeline.records`), stamped with the task's session and patient, and
given the SHA-256 of every file they name, which the orchestrator checks on receipt and
again before hand-off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

import adaptive.errors as aerr
from adaptive.forked import ChildError, call_in_child
from adaptive.log import bind
from adaptive.optimization.protocols import load_protocol
from adaptive.pipeline.fraction import Progress, planning_stage, registration_stage
from adaptive.pipeline.records import RECORDS, PlanningRecord, RegistrationRecord, sha256_file
from adaptive.registration.core import warm_up
from adaptive.registration.review import preload_plotting


def registration_task(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir, out_dir,
                      budget_s: float | None = None, progress: Progress | None = None,
                      spatial_registration=None) -> dict:
    """The registration stage of one task (runs in the forked child). ``budget_s``: seconds
    left of the stage budget (the deformable step is cut to fit; ``fallback="rigid"`` then).
    ``spatial_registration``: a rigid Spatial Registration received with the CBCT (path), one
    candidate of the initial alignment. ``$ADAPTIVE_REGISTRATION_CONFIG``: another
    registration config (default ``config/registration.toml``). Returns the record of
    :func:`adaptive.pipeline.fraction.registration_stage`, validated, as JSON types (it
    crosses the pipe to the worker)."""
    rec = registration_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir, out_dir,
                             budget_s=budget_s, progress=progress,
                             spatial_registration=spatial_registration,
                             config=os.environ.get("ADAPTIVE_REGISTRATION_CONFIG") or None)
    return RegistrationRecord.model_validate(rec).model_dump(mode="json")


def planning_task(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir, registration: dict,
                  out_dir, protocol: dict, budget_s: float | None = None,
                  progress: Progress | None = None) -> dict:
    """The planning stage of one task (runs in the forked child): ``{"adapted": {...},
    "scheduled": {...}, "metrics": {...}, "fallback": None | "best_iterate", "protocol":
    {...}, ...}``. ``protocol``: the session's clinical protocol ``{"name", "source"}`` (goals
    ``config/goals/<name>.toml``; the scheduled plan's prescription must match it).
    ``budget_s`` sets the optimiser deadline. The planning CT, planning RT Struct and CBCT are
    not re-read: the registration record carries everything derived from them (synthetic CT
    covering the planning CT's extent, propagated structures, rigid matrix)."""
    t0 = time.perf_counter()
    goals = load_protocol(protocol["name"])
    left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
    po = planning_stage(rtplan_path, registration, out_dir, goals, budget_s=left,
                        progress=progress, protocol=protocol)
    return PlanningRecord.model_validate(po.result).model_dump(mode="json")


def run_in_child(fn: Callable[..., dict], kwargs: dict, ctx) -> dict:
    """Run ``fn(**kwargs, progress=...)`` in a forked child; forward its progress to ``ctx``;
    stop it when ``ctx.cancelled`` is set; return its result or re-raise its error (same
    :mod:`adaptive.errors` class when it is one)."""
    try:
        return call_in_child(fn, (), kwargs, on_progress=ctx.progress,
                             cancelled=getattr(ctx, "cancelled", None))
    except ChildError as e:
        err = e.as_adaptive_error()
        if err is not None:
            raise err from None
        raise aerr.AdaptiveError(f"{fn.__name__}: {e.type_name}: {e.message}\n{e.tb}") from None


def seal(stage: str, record: dict, payload: dict) -> dict:
    """``record`` validated against the stage's typed model, stamped with the task's
    ``session_id`` and ``patient_id`` and the SHA-256 of every file it names."""
    try:
        rec = RECORDS[stage].model_validate(record)
    except ValidationError as e:
        raise aerr.ServiceError(f"{stage} stage returned a malformed record: "
                                f"{str(e)[:1500]}") from None
    rec = rec.model_copy(update={"session_id": str(payload.get("session_id", "")),
                                 "patient_id": str(payload.get("patient_id", ""))})
    files = {}
    for f in rec.named_files():
        if not Path(f).is_file():
            raise aerr.ServiceError(f"{stage} record names {f}, which does not exist")
        files[str(f)] = sha256_file(f)
    return rec.model_copy(update={"files": files}).model_dump(mode="json")


def _bind_session(payload: dict, stage: str) -> None:
    """Every log line of the stage carries the session (and the patient) it works for."""
    bind(session_id=payload.get("session_id"), patient_id=payload.get("patient_id"),
         stage=stage)


def run_registration(payload: dict, arrays: dict, ctx) -> dict:
    _bind_session(payload, "registration")
    ctx.progress("registration", 0.0)
    result = run_in_child(registration_task, {
        "planning_ct_dir": payload["planning_ct_dir"], "rtstruct_path": payload["rtstruct_path"],
        "rtplan_path": payload["rtplan_path"], "cbct_dir": payload["cbct_dir"],
        "out_dir": payload["out_dir"], "budget_s": ctx.remaining_s(),
        "spatial_registration": payload.get("spatial_registration")}, ctx)
    ctx.progress("registration", 1.0)
    return seal("registration", result, payload)


def run_planning(payload: dict, arrays: dict, ctx) -> dict:
    _bind_session(payload, "planning")
    ctx.progress("planning", 0.0)
    result = run_in_child(planning_task, {
        "planning_ct_dir": payload["planning_ct_dir"], "rtstruct_path": payload["rtstruct_path"],
        "rtplan_path": payload["rtplan_path"], "cbct_dir": payload["cbct_dir"],
        "registration": payload["registration"], "out_dir": payload["out_dir"],
        "protocol": payload["protocol"], "budget_s": ctx.remaining_s()}, ctx)
    ctx.progress("planning", 1.0)
    return seal("planning", result, payload)


def _warm_up_registration() -> None:
    warm_up()
    preload_plotting()  # the review images' matplotlib import (~1 s), inherited by the fork


run_registration.warm_up = _warm_up_registration
