"""Plan normalisation: scale the MU so that the target's prescription goal is met exactly.

This is what clinical treatment planning systems do after optimisation ("normalise the plan
so that 95 % of the PTV receives the prescription"): dose is linear in MU, so one scale
factor applied to every beamlet weight (or segment MU) moves the whole DVH. The goal used is
the **prescription goal**: the highest-priority lower-bound goal on a D metric ("D95 >= 50
Gy", "Dmin >= …", "Dmean >= …") of the prescription target; without one, the target's mean
dose is normalised to the prescription dose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaptive.errors import OptimizationError
from adaptive.optimization.goals import ClinicalGoals, Goal, metric_value


@dataclass(frozen=True)
class Normalization:
    """``factor``: multiply MU (and dose) by this; ``metric``/``goal_gy``: the normalised
    goal (per fraction Gy); ``before_gy``: its value before scaling (per fraction)."""

    factor: float
    structure: str
    metric: str
    goal_gy: float
    before_gy: float

    def to_dict(self) -> dict:
        return {"factor": self.factor, "structure": self.structure, "metric": self.metric,
                "goal_gy": self.goal_gy, "before_gy": self.before_gy}


def prescription_goal(goals: ClinicalGoals) -> Goal | None:
    """The target's lower-bound dose goal of highest priority (lowest number), if any."""
    t = goals.prescription.target_roi_name.lower()
    cands = [g for g in goals.goals if g.structure.lower() == t and g.op == ">="
             and g.is_dose_metric]
    return min(cands, key=lambda g: g.priority) if cands else None


def normalization_factor(dose_gy, target_mask, goals: ClinicalGoals) -> Normalization:
    """Scale factor that makes the prescription goal exact on ``dose_gy`` (per fraction,
    array or Volume on the grid of ``target_mask``, a boolean mask or flat indices)."""
    arr = dose_gy.array if hasattr(dose_gy, "array") else np.asarray(dose_gy)
    m = target_mask.array if hasattr(target_mask, "array") else np.asarray(target_mask)
    d = arr[m] if m.dtype == bool else arr.ravel()[m.ravel()]
    g = prescription_goal(goals)
    if g is None:
        metric, want = "Dmean", goals.prescription.dose_per_fraction_gy
    else:
        metric, want = g.metric, g.value
    have = metric_value(d, metric)
    if not (np.isfinite(have) and have > 0):
        raise OptimizationError(f"cannot normalise: target {metric} is {have}")
    return Normalization(float(want / have), goals.prescription.target_roi_name, metric,
                         float(want), float(have))
