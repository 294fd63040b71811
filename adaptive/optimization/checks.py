"""Plan checks run before anything is handed off. A plan that fails a blocking check must
not leave the system (:func:`require_passed` raises :class:`PlanCheckError`).

Checks (doses per fraction in Gy, MU per fraction):

* ``dose_recalculation`` (MPPG 11.a style): the deliverable dose and an independent
  recalculation of the written plan agree within 5 % at the target mean dose;
* ``mu_sanity``: MU finite and positive per beam and segment, total MU per Gy of the
  prescribed fraction dose within [``mu_per_gy_min``, ``mu_per_gy_max``];
* ``deliverability``: every beam honours the machine limits (segments count, minimum MU per
  segment, leaf travel, minimum gap, interdigitation) — :func:`check_deliverable`;
* ``dose_finite``: the deliverable dose is finite and non-negative;
* ``goals``: clinical goal evaluation; blocking only when ``goals_blocking=True`` (a clinical
  decision, the comparison table shows them), otherwise reported as warnings.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from adaptive.errors import PlanCheckError
from adaptive.geometry.volume import Volume
from adaptive.model.plan import Plan
from adaptive.optimization.goals import ClinicalGoals, GoalResult, evaluate_goals
from adaptive.optimization.sequencing import MlcGeometry, SequencingSettings, check_deliverable


@dataclass
class CheckItem:
    name: str
    passed: bool
    detail: str
    blocking: bool = True
    value: float | None = None


@dataclass
class PlanCheckReport:
    items: list[CheckItem] = field(default_factory=list)
    goal_results: list[GoalResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(i.passed for i in self.items if i.blocking)

    @property
    def failures(self) -> list[CheckItem]:
        return [i for i in self.items if i.blocking and not i.passed]

    @property
    def warnings(self) -> list[CheckItem]:
        return [i for i in self.items if not i.blocking and not i.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "items": [asdict(i) for i in self.items],
                "goals": [g.to_dict() for g in self.goal_results]}

    def summary(self) -> str:
        lines = [f"plan checks: {'PASSED' if self.passed else 'FAILED'}"]
        for i in self.items:
            tag = "ok" if i.passed else ("FAIL" if i.blocking else "warn")
            lines.append(f"  [{tag:>4}] {i.name}: {i.detail}")
        return "\n".join(lines)


def _mean_in(dose: Volume, mask: np.ndarray) -> float:
    v = dose.array[mask]
    return float(v.mean()) if v.size else float("nan")


def check_plan(plan: Plan, deliverable_dose: Volume, independent_dose: Volume | None,
               masks: dict, goals: ClinicalGoals, mlc: MlcGeometry,
               settings: SequencingSettings, *, tolerance: float = 0.05,
               mu_per_gy_min: float = 100.0, mu_per_gy_max: float = 2000.0,
               goals_blocking: bool = False) -> PlanCheckReport:
    """Run all checks (see module doc). ``masks`` on the dose grid of ``deliverable_dose``."""
    rep = PlanCheckReport()
    lower = {k.lower(): v for k, v in masks.items()}
    target = goals.prescription.target_roi_name
    tmask = lower.get(target.lower())
    arr = deliverable_dose.array
    finite = bool(np.all(np.isfinite(arr))) and bool(np.all(arr >= 0))
    rep.items.append(CheckItem("dose_finite", finite,
                               "deliverable dose finite and >= 0" if finite
                               else "deliverable dose has NaN/inf/negative values"))
    # recalculation consistency at the target mean
    if independent_dose is None:
        rep.items.append(CheckItem("dose_recalculation", False, "no independent recalculation"))
    elif tmask is None or not np.any(tmask):
        rep.items.append(CheckItem("dose_recalculation", False, f"target {target!r} missing"))
    else:
        a = _mean_in(deliverable_dose, tmask)
        ind = independent_dose if independent_dose.grid.same_as(deliverable_dose.grid) else \
            independent_dose.resample_to(deliverable_dose.grid)
        b = _mean_in(ind, tmask)
        dev = abs(a - b) / b if b > 0 else math.inf
        rep.items.append(CheckItem("dose_recalculation", dev <= tolerance,
                                   f"target mean {a:.4f} Gy vs independent {b:.4f} Gy: "
                                   f"{100 * dev:.2f} % (tolerance {100 * tolerance:.0f} %)",
                                   value=float(dev)))
    # MU sanity
    problems = []
    for b in plan.beams:
        if not (math.isfinite(b.meterset_mu) and b.meterset_mu > 0):
            problems.append(f"{b.name}: beam MU {b.meterset_mu}")
        for _cp, mu in b.segments():
            if not (math.isfinite(mu) and mu > 0):
                problems.append(f"{b.name}: segment MU {mu}")
        w = [cp.cumulative_meterset_weight for cp in b.control_points]
        if any(y < x - 1e-9 for x, y in itertools.pairwise(w)):
            problems.append(f"{b.name}: cumulative meterset weights decrease")
    total = plan.total_mu
    mu_per_gy = total / goals.prescription.dose_per_fraction_gy
    if not (mu_per_gy_min <= mu_per_gy <= mu_per_gy_max):
        problems.append(f"total {total:.1f} MU = {mu_per_gy:.0f} MU/Gy outside "
                        f"[{mu_per_gy_min:.0f}, {mu_per_gy_max:.0f}]")
    rep.items.append(CheckItem("mu_sanity", not problems,
                               "; ".join(problems) if problems else
                               f"total {total:.1f} MU ({mu_per_gy:.0f} MU/Gy)",
                               value=float(mu_per_gy)))
    # deliverability
    dprob = [p for b in plan.beams for p in check_deliverable(b, mlc, settings)]
    rep.items.append(CheckItem("deliverability", not dprob,
                               "; ".join(dprob[:5]) + (" ..." if len(dprob) > 5 else "")
                               if dprob else
                               f"{sum(len(b.segments()) for b in plan.beams)} segments within "
                               "machine limits"))
    # goals
    res = evaluate_goals(deliverable_dose, masks, goals)
    rep.goal_results = res
    failed = [r for r in res if not r.passed and r.priority == 1]
    rep.items.append(CheckItem("goals", not failed,
                               "all priority-1 goals met" if not failed else
                               "; ".join(f"{r.structure} {r.label}: {r.value_total:.2f} "
                                         f"(missed by {-r.margin_total:.2f})" for r in failed),
                               blocking=goals_blocking))
    return rep


def require_passed(report: PlanCheckReport) -> None:
    """Raise :class:`PlanCheckError` listing the blocking failures."""
    if not report.passed:
        raise PlanCheckError("plan failed its checks: " + "; ".join(
            f"{i.name}: {i.detail}" for i in report.failures))
