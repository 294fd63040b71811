"""The online adaptive chain for one fraction, as two stages that communicate through files.

:func:`registration_stage` — CBCT + planning CT + planning structures (+ scheduled plan for
the isocenter) → ``dvf.mha``, ``synthetic_ct/``, propagated ``RS.dcm``, ``REG.dcm``,
``registration.json`` (via :func:`adaptive.registration.register_and_write.register_fraction`).

:func:`planning_stage` — the registration outputs + the scheduled plan → Dij on the synthetic
CT → warm-started re-optimisation (:func:`adaptive.pipeline.planning.plan_case`, the adapted
plan references the scheduled plan as PREDECESSOR and the propagated structure set) →
sequencing → deliverable dose → checks → the scheduled plan recalculated on the synthetic CT →
goal-by-goal comparison. Writes the adapted ``RP.dcm`` + ``RD.dcm`` (only when the plan passed
its checks), ``scheduled_today/RD.dcm``, ``comparison.json`` and ``plan_report.json``.

Both the offline ``adaptive replay`` command (:func:`run_fraction`) and the services'
workers (:mod:`services.workers.stages`) call these two functions; the hand-over
between them is the JSON-able registration record, so a worker process needs nothing else.

Doses per fraction in Gy internally; goal values in reports are total-course Gy (V in %).
LPS mm. Times in seconds.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from adaptive.dicom.ct_series import read_ct_series
from adaptive.dicom.provenance import Provenance
from adaptive.dicom.rtdose import write_rtdose
from adaptive.dicom.rtplan import read_rtplan
from adaptive.dicom.rtstruct import read_rtstruct
from adaptive.dose.plan_dose import plan_dose
from adaptive.errors import OptimizationError, PlanCheckError
from adaptive.geometry.volume import Volume
from adaptive.jsonable import to_jsonable, write_json_atomic
from adaptive.log import get_logger
from adaptive.optimization.checks import CheckItem
from adaptive.optimization.compare import compare_plans
from adaptive.optimization.goals import ClinicalGoals
from adaptive.pipeline import handoff as H
from adaptive.pipeline.planning import (
    PlanResult,
    PlanSettings,
    moved_plan,
    plan_case,
    write_plan_outputs,
)
from adaptive.pipeline.registration_gate import gate_record, make_gate, target_roi_name
from adaptive.pipeline.safety import (
    DEFORMABLE,
    SafetySettings,
    contour_checks,
    registration_checks,
    roi_volumes_cc,
)
from adaptive.pipeline.scheduled_today import rigid_match_statement, run_scheduled_only
from adaptive.registration.register_and_write import register_fraction

log = get_logger("adaptive.pipeline.fraction")

Progress = Callable[[str, float], None]

#: Time (s) the registration stage keeps back from its budget for the synthetic CT,
#: contour propagation and writing the DICOM objects (measured ~1-3 s on the 2-core
#: development machine for the pelvis case; the deformable step is cut at the rest).
REGISTRATION_RESERVE_S = 5.0
#: Share of the planning budget left to the fluence optimiser after the time already spent
#: (loading, Dij) is subtracted; the rest covers sequencing, the deliverable-dose and
#: correction recalculations, the independent check and the scheduled-plan recalculation,
#: which together take about as long as the optimisation itself here.
OPTIMIZER_SHARE = 0.35
#: Shortest optimiser deadline (s): below this the warm start is returned almost unchanged.
MIN_OPTIMIZER_S = 3.0


def _noop(stage: str, fraction: float) -> None:
    return None


# --- registration ---------------------------------------------------------------------------


def registration_stage(planning_ct_dir, rtstruct_path, rtplan_path, cbct_dir, out_dir, *,
                       budget_s: float | None = None, progress: Progress | None = None,
                       spatial_registration=None, config=None) -> dict:
    """Register the CBCT to the planning CT and write the outputs to ``out_dir``.

    ``budget_s``: wall-clock budget of the whole stage (s); the deformable registration gets
    ``budget_s - REGISTRATION_RESERVE_S`` minus the loading time and falls back to its rigid
    result (``fallback="rigid"``) when cut. The isocenter for the initial alignment is the
    scheduled plan's first beam isocenter (planning LPS mm), one candidate of the initial
    alignment beside a received rigid ``spatial_registration`` (path), identity, image
    centres and body centroids. The safety gate (:mod:`adaptive.pipeline.registration_gate`)
    decides which mapping may be used; its fields (``validity``, ``registration_checks``, ...)
    are in the record, with review images of the result (``review_images``). ``config``:
    registration settings (path/dict; default ``config/registration.toml``).

    Returns the JSON-able registration record: ``synthetic_ct_dir``, ``rtstruct``, ``reg``,
    ``dvf``, ``registration_json`` (paths), ``rigid_matrix`` (4×4, CBCT LPS → planning LPS),
    ``frame_of_reference_uid`` (CBCT/synthetic CT), ``quality``, ``timings_s``, ``fallback``.
    """
    progress = progress or _noop
    t0 = time.perf_counter()
    T: dict[str, float] = {}
    progress("registration.load", 0.0)
    ct, ct_info = read_ct_series(planning_ct_dir)
    ss = read_rtstruct(rtstruct_path, series=ct_info, grid=ct.grid)
    plan = read_rtplan(rtplan_path)
    cbct, cbct_info = read_ct_series(cbct_dir)
    T["load"] = round(time.perf_counter() - t0, 3)
    reg_budget = None
    if budget_s:
        reg_budget = max(1.0, budget_s - REGISTRATION_RESERVE_S - T["load"])
    progress("registration.deformable", 0.1)
    target = target_roi_name(plan, ss)
    fr = register_fraction((cbct, cbct_info), (ct, ct_info), structures=ss,
                           isocenter_lps_mm=plan.beams[0].isocenter_lps_mm,
                           spatial_registration=spatial_registration,
                           budget_s=reg_budget, out_dir=out_dir, gate=make_gate(target),
                           config=config)
    progress("registration.written", 0.95)
    gate = gate_record(fr, ct, ss, cbct, target, Path(out_dir) / "review")
    T.update({k: round(v, 3) for k, v in fr.timings_s.items() if k != "load"})
    T["total"] = round(time.perf_counter() - t0, 3)
    r = fr.result
    record = {
        "synthetic_ct_dir": str(fr.paths["synthetic_ct"]),
        "rtstruct": str(fr.paths["rtstruct"]),
        "rtstruct_uid": fr.structures.sop_instance_uid,
        "reg": str(fr.paths["reg"]),
        "dvf": str(fr.paths["dvf"]),
        "registration_json": str(fr.paths["json"]),
        "rigid_matrix": r.rigid_matrix,
        "frame_of_reference_uid": cbct_info.frame_of_reference_uid,
        "cbct_grid": (r.native_grid or r.fixed_grid).to_dict(),
        "study": fr.synthetic_ct_info.study.to_dict(),  # the session's (the CBCT's)
        "cbct_series_uid": cbct_info.series_instance_uid,
        "synthetic_ct_series_uid": fr.synthetic_ct_info.series_instance_uid,
        "planning_ct_series_uid": ct_info.series_instance_uid,
        "scheduled_plan_uid": plan.sop_instance_uid,
        "quality": r.quality,
        # for the hand-off contour sanity checks (adaptive.pipeline.safety)
        "planning_roi_volumes_cc": roi_volumes_cc(ss, ct.grid),
        "roi_interpreted_types": {roi.name: roi.interpreted_type for roi in ss.rois},
        "timings_s": T,
        "registration_timings_s": r.timings_s,
        "budget_s": budget_s,
        "deformable_budget_s": reg_budget,
        "fallback": r.fallback,
        "target_roi": target,
        **gate,
    }
    record = to_jsonable(record)
    write_json_atomic(Path(out_dir) / "registration_result.json", record)
    log.info("registration_stage_done", fallback=r.fallback, total_s=T["total"])
    return record


# --- planning -------------------------------------------------------------------------------


@dataclass
class PlanningOutputs:
    """In-memory results of :func:`planning_stage` (the offline chain uses them)."""

    adapted: object  # adaptive.pipeline.planning.PlanResult
    scheduled_dose: Volume
    comparison: object  # adaptive.optimization.compare.PlanComparison
    result: dict  # the JSON-able record (service contract)
    timings_s: dict


def check_prescription(plan, goals: ClinicalGoals, where) -> None:
    """The scheduled plan and the goals must describe the same prescription."""
    p = getattr(plan, "prescription", None)
    if p is None or not getattr(p, "number_of_fractions", None):
        return
    g = goals.prescription
    if (int(p.number_of_fractions) != int(g.number_of_fractions) or
            abs(float(p.dose_per_fraction_gy) - float(g.dose_per_fraction_gy)) > 1e-3):
        raise OptimizationError(
            f"{where}: plan prescription {p.dose_per_fraction_gy:g} Gy x "
            f"{p.number_of_fractions} does not match the goals {goals.source} "
            f"({g.dose_per_fraction_gy:g} Gy x {g.number_of_fractions})")


def handoff_safety_checks(registration: dict, today, grid, goals: ClinicalGoals,
                          settings=None) -> list:
    """What the adapted plan rests on, as plan check items: the registration gate's
    deformable-level checks (from the record; recomputed from its quality figures for a
    record made without the gate) and the field-of-view-aware contour checks
    (:mod:`adaptive.pipeline.safety`) of today's structures on the synthetic-CT ``grid``."""
    s = settings or SafetySettings.load()
    gate = registration.get("registration_checks")
    if gate:
        items = [CheckItem(c["name"], bool(c["passed"]), c["message"],
                           blocking=bool(c.get("blocking", True)))
                 for c in gate if c.get("level") == "deformable"]
    else:
        items = registration_checks(registration.get("quality") or {},
                                    registration.get("fallback"), s)
    roi_fov = registration.get("roi_fov")
    if roi_fov is None:
        items.append(CheckItem("contour_volumes", False,
                               "registration record has no field-of-view ROI volumes"))
        return items
    items += contour_checks(roi_fov, today, grid, list(goals.structures),
                            goals.prescription.target_roi_name,
                            registration.get("roi_interpreted_types") or {}, s)
    return items


def optimizer_deadline(budget_s: float | None, elapsed_s: float) -> float | None:
    """Fluence optimisation deadline (s) from the stage budget and the time already used."""
    if not budget_s:
        return None
    return max(MIN_OPTIMIZER_S, OPTIMIZER_SHARE * (budget_s - elapsed_s))


def planning_stage(rtplan_path, registration: dict, out_dir, goals: ClinicalGoals, *,
                   settings=None, budget_s: float | None = None,
                   progress: Progress | None = None,
                   protocol: dict | None = None) -> PlanningOutputs:
    """Re-optimise the scheduled plan on today's anatomy (see the module docstring).

    ``registration``: the record returned by :func:`registration_stage`. ``settings``:
    :class:`~adaptive.pipeline.planning.PlanSettings`; when ``budget_s`` is given and
    ``settings.deadline_s`` is None the optimiser deadline comes from the budget
    (:func:`optimizer_deadline`). The adapted plan is written only when it passed its
    checks (``adapted.rtplan`` is None otherwise); ``fallback`` is ``"best_iterate"`` when
    the optimiser was stopped by its deadline. Doses are computed on the synthetic CT series
    of the registration record, which covers the planning CT's extent (see
    :func:`adaptive.registration.synthetic_ct.extend_synthetic_ct`); what the written objects
    mean (one-session adapted plan, summation types, study) is in
    :mod:`adaptive.pipeline.handoff`. ``protocol``: the session's clinical protocol
    (``{"name", "source"}``), recorded in the result and the written objects' provenance.
    """
    progress = progress or _noop
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T: dict[str, float] = {}
    progress("planning.load", 0.0)
    sct, sct_info, today, scheduled, sched_today = _planning_inputs(rtplan_path, registration,
                                                                    goals)
    dose_ct = sct  # covers the planning CT's extent (extended at registration)
    T["load"] = round(time.perf_counter() - t0, 3)

    s = replace(settings) if settings is not None else PlanSettings()
    if registration.get("validity", DEFORMABLE) != DEFORMABLE:
        # only the rigid match passed its checks: no adapted plan, the scheduled plan's
        # metrics on the rigidly mapped anatomy (adaptive.pipeline.scheduled_today)
        return run_scheduled_only(registration, sched_today, scheduled.sop_instance_uid,
                                  dose_ct, sct_info, today, goals, s, out, rtplan_path, T, t0,
                                  budget_s, PlanningOutputs)
    if s.deadline_s is None and budget_s:
        # Dij and objective set-up come before the optimiser: estimate them as ~1/3 of the
        # remaining budget through OPTIMIZER_SHARE (see its doc)
        s.deadline_s = optimizer_deadline(budget_s, time.perf_counter() - t0)
    progress("planning.optimise", 0.1)
    t = time.perf_counter()
    depth_cache: dict = {}  # radiological depths on dose_ct, shared by all plan-dose calls
    adapted = plan_case(dose_ct, sct_info, today, goals, reference=sched_today, settings=s,
                        label="ADAPTED", depth_cache=depth_cache)
    T.update({f"plan.{k}": v for k, v in adapted.timings_s.items()})
    T["plan_total"] = round(time.perf_counter() - t, 3)
    # what the adapted plan rests on: registration Jacobian and contour sanity (blocking)
    adapted.checks.items.extend(handoff_safety_checks(registration, today,
                                                      H.cbct_grid(registration, sct.grid), goals))
    progress("planning.scheduled_recalc", 0.8)
    t = time.perf_counter()
    sdose = plan_dose(dose_ct, sched_today, dose_grid_spacing_mm=s.dose_grid_spacing_mm,
                      depth_cache=depth_cache)
    T["scheduled_recalc"] = round(time.perf_counter() - t, 3)
    comparison = compare_plans(sdose, adapted.dose, adapted.masks, goals)

    progress("planning.write", 0.9)
    t = time.perf_counter()
    input_uids = {"planning_ct": registration.get("planning_ct_series_uid", ""),
                  "cbct": registration.get("cbct_series_uid", ""),
                  "synthetic_ct": sct_info.series_instance_uid,
                  "rtstruct": today.sop_instance_uid,
                  "predecessor_plan": scheduled.sop_instance_uid}
    params = {"goals": goals.to_dict(), "settings": s.__dict__, "budget_s": budget_s,
              "dose_ct": f"synthetic CT series {sct_info.series_instance_uid} {dose_ct.grid.shape}",
              "plan_scope": "one session of the course (see adaptive.pipeline.handoff)",
              "protocol": protocol}
    fallback = "best_iterate" if adapted.fluence.reason == "deadline" else None
    adapted_rec = _write_adapted(adapted, registration, today, sct_info, dose_ct.grid, goals,
                                 out, input_uids, params, comparison, fallback)
    sd_dir = _write_scheduled_today(sdose, sched_today, sct_info, dose_ct.grid, out, input_uids)
    T["write"] = round(time.perf_counter() - t, 3)
    T["total"] = round(time.perf_counter() - t0, 3)
    result = _planning_result(adapted, adapted_rec, sdose, comparison, registration, goals,
                              rtplan_path, scheduled.sop_instance_uid, sd_dir, s, protocol,
                              fallback, T, budget_s)
    (out / "comparison.json").write_text(comparison.to_json())
    write_json_atomic(out / "planning_result.json", result)
    log.info("planning_stage_done", checks_passed=adapted.checks.passed, fallback=fallback,
             total_s=T["total"])
    return PlanningOutputs(adapted, sdose, comparison, result, T)


def _planning_inputs(rtplan_path, registration: dict, goals: ClinicalGoals):
    """(synthetic CT (HU), its series, today's structures on it, the scheduled plan, the
    scheduled plan moved into the CBCT frame by the rigid part of the registration)."""
    sct, sct_info = read_ct_series(registration["synthetic_ct_dir"])
    today = read_rtstruct(registration["rtstruct"], grid=sct.grid)
    scheduled = read_rtplan(rtplan_path)
    check_prescription(scheduled, goals, rtplan_path)
    if (registration.get("scheduled_plan_uid") and
            registration["scheduled_plan_uid"] != scheduled.sop_instance_uid):
        raise OptimizationError(f"{rtplan_path}: plan {scheduled.sop_instance_uid} is not the "
                                f"plan the registration used ({registration['scheduled_plan_uid']})")
    if sct_info.frame_of_reference_uid != registration["frame_of_reference_uid"]:
        raise OptimizationError(f"synthetic CT {registration['synthetic_ct_dir']} is not in the "
                                f"registration's frame {registration['frame_of_reference_uid']}")
    # the synthetic CT lives in the CBCT frame: map the isocenters with the rigid part
    m = np.linalg.inv(np.asarray(registration["rigid_matrix"], dtype=float))
    sched_today = moved_plan(scheduled, m, sct_info.frame_of_reference_uid)
    return sct, sct_info, today, scheduled, sched_today


def _write_adapted(adapted: PlanResult, registration: dict, today, sct_info, image_grid,
                   goals: ClinicalGoals, out: Path, input_uids: dict, params: dict, comparison,
                   fallback: str | None) -> dict:
    """Write the adapted plan and its dose (RP.dcm, RD.dcm in ``out``) when it passed its
    checks; returns its record (``rtplan``/``rtdose`` None when it did not)."""
    adapted_rec = {"rtplan": None, "rtdose": None, "rtstruct": registration["rtstruct"],
                   "registration": registration["reg"],
                   "checks_passed": bool(adapted.checks.passed),
                   "checks": [{"name": i.name, "passed": bool(i.passed),
                               "message": i.detail, "blocking": bool(i.blocking)}
                              for i in adapted.checks.items],
                   "rtstruct_uid": today.sop_instance_uid,
                   "synthetic_ct_dir": registration["synthetic_ct_dir"]}
    study = sct_info.study  # the session's: the CBCT's (adaptive.dicom.study)
    H.make_session_plan(adapted.plan, goals.prescription)
    try:
        rep = write_plan_outputs(adapted, sct_info, out, study=study, image_grid=image_grid,
                                 summation=H.ADAPTED_DOSE_SUMMATION, input_uids=input_uids,
                                 parameters=params,
                                 extra_report={"comparison": comparison.to_dict(),
                                               "fallback": fallback})
        adapted_rec.update(rtplan=str(out / "RP.dcm"), rtdose=str(out / "RD.dcm"),
                           rtplan_uid=rep["plan"]["sop_instance_uid"])
    except PlanCheckError as e:
        log.warning("adapted_plan_failed_checks", error=str(e))
    return adapted_rec


def _write_scheduled_today(sdose: Volume, sched_today, sct_info, image_grid, out: Path,
                           input_uids: dict) -> Path:
    """Write the scheduled plan's dose on today's anatomy (total-course Gy, CBCT frame) as
    ``out/scheduled_today/RD.dcm``; returns that folder."""
    study = sct_info.study  # the session's: the CBCT's (adaptive.dicom.study)
    sd_dir = out / "scheduled_today"
    sd_dir.mkdir(exist_ok=True)
    prov = Provenance(input_uids=input_uids, parameters={"recalculated_on": "synthetic CT"},
                      description="scheduled plan recalculated on today's anatomy")
    write_rtdose(sdose, sd_dir / "RD.dcm", summation=H.SCHEDULED_TODAY_SUMMATION,
                 plan=sched_today, series=sct_info, image_grid=image_grid, study=study,
                 provenance=prov, comment="scheduled plan recalculated on the synthetic CT")
    return sd_dir


def _planning_result(adapted: PlanResult, adapted_rec: dict, sdose: Volume, comparison,
                     registration: dict, goals: ClinicalGoals, rtplan_path, scheduled_uid: str,
                     sd_dir: Path, s: PlanSettings, protocol: dict | None, fallback: str | None,
                     T: dict, budget_s: float | None) -> dict:
    """The stage's JSON-able result: adapted and scheduled objects, metrics (total-course
    Gy), optimiser outcome and timings (s)."""
    metrics = {**comparison.to_dict(), "units": "total-course Gy (V: %)",
               "on": "synthetic CT + propagated structures; "
                     + rigid_match_statement(registration),
               "registration_validity": registration.get("validity", DEFORMABLE),
               "dose_summary": H.console_dose_summary(adapted.dose, sdose, adapted.masks,
                                                      goals.prescription)}
    result = to_jsonable({
        "adapted": adapted_rec,
        "scheduled": {"rtplan": str(rtplan_path), "rtplan_uid": scheduled_uid,
                      # the dose on today's anatomy is in the CBCT frame, not the plan's:
                      # reported, not handed off with the scheduled plan
                      "rtdose": None, "rtdose_today": str(sd_dir / "RD.dcm")},
        "metrics": metrics,
        "protocol": protocol,
        "fallback": fallback,
        "optimizer": {"deadline_s": s.deadline_s, "iterations": adapted.fluence.iterations,
                      "reason": adapted.fluence.reason},
        "timings_s": T,
        "budget_s": budget_s,
    })
    return result


# --- the offline chain ----------------------------------------------------------------------


@dataclass
class FractionResult:
    adapted: object  # PlanResult
    scheduled_dose: Volume
    comparison: object  # PlanComparison
    timings_s: dict
    registration: dict
    result: dict | None = None  # the planning stage record (paths, checks, metrics)


def run_fraction(case_dir: str | Path, fraction_dir: str | Path, goals: ClinicalGoals, *,
                 settings=None, out_dir: str | Path | None = None,
                 registration_budget_s: float | None = None) -> FractionResult:
    """The whole chain for an archived fraction: :func:`registration_stage` then
    :func:`planning_stage`, writing everything to ``out_dir`` (a temporary folder when None).

    ``case_dir``: holds ``planning/CT``, ``planning/RS.dcm``, ``planning/RP.dcm``;
    ``fraction_dir``: holds ``CBCT/``.
    """
    case, fx = Path(case_dir), Path(fraction_dir)
    rp = case / "planning" / "RP.dcm"
    if not rp.is_file():
        raise OptimizationError(f"no scheduled plan {rp} (run make_scheduled_plan first)")
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="adaptive-fx-")
        out_dir = tmp.name
    out = Path(out_dir)
    try:
        T: dict[str, float] = {}
        t = time.perf_counter()
        reg = registration_stage(case / "planning" / "CT", case / "planning" / "RS.dcm", rp,
                                 fx / "CBCT", out, budget_s=registration_budget_s)
        T.update({f"registration.{k}": v for k, v in reg["timings_s"].items()
                  if k != "total"})
        T["registration_total"] = round(time.perf_counter() - t, 3)
        po = planning_stage(rp, reg, out, goals, settings=settings)
        T.update({k if k.startswith("plan") else f"planning.{k}": v
                  for k, v in po.timings_s.items() if k != "total"})
        T["planning_total"] = round(time.perf_counter() - t - T["registration_total"], 3)
        T["total"] = round(time.perf_counter() - t, 3)
        write_json_atomic(out / "timings.json", T)
        return FractionResult(po.adapted, po.scheduled_dose, po.comparison, T,
                              reg, po.result)
    finally:
        if tmp is not None:
            tmp.cleanup()
