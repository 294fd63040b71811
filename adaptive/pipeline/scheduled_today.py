"""The scheduled plan on today's anatomy when no adapted plan may be made: the registration's
deformable result failed its checks, but its rigid match passed its own (validity "rigid"),
so the registration stage made the synthetic CT and today's contours from the rigid match.
The scheduled plan is positioned by that rigid match, recalculated, and evaluated against
the clinical goals; no adapted plan is optimised (nothing could be offered).

Doses per fraction in Gy internally; goal values in the metrics are total-course Gy (V in %).
"""

from __future__ import annotations

import time
from pathlib import Path

from adaptive.dicom.provenance import Provenance
from adaptive.dicom.rtdose import write_rtdose
from adaptive.dose.plan_dose import plan_dose
from adaptive.jsonable import to_jsonable, write_json_atomic
from adaptive.log import get_logger
from adaptive.optimization.goals import ClinicalGoals, evaluate_goals
from adaptive.pipeline.handoff import SCHEDULED_TODAY_SUMMATION
from adaptive.pipeline.planning import stage_masks

log = get_logger("adaptive.pipeline.scheduled_today")


def rigid_match_statement(registration: dict) -> str:
    """What the scheduled plan's position on today's anatomy rests on, with the rigid
    match's own check figures (for the console's metrics label)."""
    checks = {c["name"]: c for c in registration.get("registration_checks") or []}
    figs = []
    for name, label in (("rigid_similarity", "NMI"), ("rigid_body_outline", "body Dice"),
                        ("setup_translation", "setup correction mm")):
        v = (checks.get(name) or {}).get("values", {}).get("value")
        if v is not None:
            figs.append(f"{label} {v:.3g}")
    passed = all(c["passed"] for c in checks.values() if c.get("level") == "rigid"
                 and c.get("blocking", True))
    state = "passed its checks" if passed and checks else "UNCHECKED" if not checks else \
        "FAILED its checks"
    return (f"scheduled plan positioned by the rigid match, which {state}"
            + (f" ({', '.join(figs)})" if figs else ""))


def scheduled_only_result(registration: dict, sdose, masks: dict, goals: ClinicalGoals,
                          scheduled_uid: str, rtplan_path, rtdose_today: Path, out: Path,
                          timings: dict, budget_s) -> dict:
    """The planning stage's record when only the rigid match is valid (no adapted plan):
    the scheduled plan's goals on today's (rigidly mapped) anatomy, labelled as such."""
    rows = []
    for g in evaluate_goals(sdose, masks, goals):
        v = None if g.value_total != g.value_total else round(g.value_total, 4)
        rows.append({"structure": g.structure, "goal": g.label, "priority": g.priority,
                     "scheduled_value": v, "scheduled_passed": g.passed,
                     "adapted_value": None, "adapted_passed": None})
    failed = registration.get("registration_failed") or []
    reason = ("no adapted plan: the deformable registration failed its checks ("
              + ", ".join(failed) + "): " + registration.get("registration_summary", ""))
    checks = [{"name": c["name"], "passed": bool(c["passed"]), "message": c["message"],
               "blocking": bool(c.get("blocking", True))}
              for c in registration.get("registration_checks") or []
              if c.get("level") == "deformable"]
    result = to_jsonable({
        "adapted": {"rtplan": None, "rtdose": None, "checks_passed": False, "checks": checks,
                    "blocked_by": "registration", "reason": reason},
        "scheduled": {"rtplan": str(rtplan_path), "rtplan_uid": scheduled_uid,
                      "rtdose": None, "rtdose_today": str(rtdose_today)},
        "metrics": {"rows": rows, "scheduled_goals_passed": sum(bool(r["scheduled_passed"])
                                                                for r in rows),
                    "adapted_goals_passed": None, "n_goals": len(rows),
                    "units": "total-course Gy (V: %)",
                    "on": ("rigidly mapped planning CT (CBCT body and air) + rigidly mapped "
                           "structures; " + rigid_match_statement(registration)),
                    "registration_validity": registration.get("validity")},
        "fallback": None,
        "timings_s": timings,
        "budget_s": budget_s,
    })
    write_json_atomic(out / "planning_result.json", result)
    log.info("scheduled_only_done", reason=reason[:200], total_s=timings.get("total"))
    return result


def run_scheduled_only(registration: dict, sched_today, scheduled_uid: str, dose_ct,
                       sct_info, today, goals: ClinicalGoals, settings, out: Path,
                       rtplan_path, timings: dict, t0: float, budget_s,
                       planning_result) -> object:
    """Recalculate the scheduled plan (already positioned by the rigid match:
    ``sched_today``) on ``dose_ct`` and evaluate the goals with today's structures; write
    ``scheduled_today/RD.dcm`` and ``planning_result.json``. Returns ``planning_result``
    (the caller's result type) built from ``(None, dose, None, record, timings)``."""

    t = time.perf_counter()
    sdose = plan_dose(dose_ct, sched_today, dose_grid_spacing_mm=settings.dose_grid_spacing_mm)
    _, masks = stage_masks(dose_ct, today, goals, settings.dose_grid_spacing_mm)
    timings["scheduled_recalc"] = round(time.perf_counter() - t, 3)
    sd_dir = out / "scheduled_today"
    sd_dir.mkdir(exist_ok=True)
    prov = Provenance(input_uids={"planning_ct": registration.get("planning_ct_series_uid", ""),
                                  "cbct": registration.get("cbct_series_uid", ""),
                                  "synthetic_ct": sct_info.series_instance_uid,
                                  "rtstruct": today.sop_instance_uid,
                                  "plan": scheduled_uid},
                      parameters={"recalculated_on": "rigidly mapped planning CT",
                                  "registration_validity": registration.get("validity")},
                      description="scheduled plan recalculated on today's anatomy "
                                  "(rigid match)")
    write_rtdose(sdose, sd_dir / "RD.dcm", summation=SCHEDULED_TODAY_SUMMATION,
                 plan=sched_today, series=sct_info, image_grid=dose_ct.grid,
                 study=sct_info.study, provenance=prov,
                 comment="scheduled plan on the rigidly mapped planning CT")
    timings["total"] = round(time.perf_counter() - t0, 3)
    rec = scheduled_only_result(registration, sdose, masks, goals, scheduled_uid, rtplan_path,
                                sd_dir / "RD.dcm", out, timings, budget_s)
    return planning_result(None, sdose, None, rec, timings)
