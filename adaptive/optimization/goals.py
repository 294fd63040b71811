"""Clinical goals and optimisation objectives per treatment site (``config/goals/*.toml``).

Doses in the goal files are **total-course doses in Gy** (as clinicians write them, e.g.
"D95 >= 75.6 Gy" for 42 × 1.8 Gy). Everything downstream (optimiser, evaluation of a dose
distribution computed per fraction) works **per fraction**: :func:`load_goals` divides every
dose by the number of fractions and keeps both numbers (``*_total_gy`` / ``*_gy``).

File format (strict: unknown keys raise :class:`~adaptive.errors.ConfigError` naming file
and key)::

    site = "tg119_cshape"
    description = "..."

    [prescription]
    dose_gy = 50.0            # total course dose to the target (Gy)
    fractions = 25
    target = "PTV"            # ROI the prescription applies to

    [[goal]]                  # clinical goals, evaluated and reported
    structure = "PTV"
    goal = "D95 >= 50 Gy"     # Dx, Dmean, Dmax, Dmin, Vx (x in Gy, value in %)
    priority = 1              # 1 = must, 2 = should, 3 = nice to have

    [[objective]]             # optional EXTRA optimisation terms (smooth penalties); every
    structure = "BODY"        # goal already gets its own term (ClinicalGoals.goal_terms)
    type = "max_dose"         # min_dose | max_dose | uniform | mean_max | mean_min | dvh_min | dvh_max
    dose_gy = 40.0            # total course dose (Gy)
    volume_pct = 95           # only for dvh_min / dvh_max
    weight = 100.0

DVH metric semantics (documented, used everywhere in this package):

* every voxel of the structure has equal volume (one dose grid);
* ``Dx`` = the minimum dose received by the hottest ``x`` % of the volume: with the
  structure's N voxel doses sorted in decreasing order d(1) ≥ d(2) ≥ … ≥ d(N), ``Dx`` =
  d(k) with k = max(1, ceil(x/100 · N − 1e-9)). So D100 = minimum, D0 = D(k=1) = maximum,
  and at least x % of the voxels receive ≥ Dx (no interpolation between voxels);
* ``Dmean``/``Dmax``/``Dmin``: mean/maximum/minimum voxel dose;
* ``Vx`` (x in Gy, total course) = percentage of the volume receiving ≥ x Gy.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from adaptive.config import CONFIG_MODEL, Float, Int, Str, Text, load_config
from adaptive.errors import ConfigError, OptimizationError
from adaptive.geometry.volume import Volume
from adaptive.model.plan import Prescription

OBJECTIVE_TYPES = ("min_dose", "max_dose", "uniform", "mean_max", "mean_min", "dvh_min",
                   "dvh_max")

#: initial weight of the penalty term of a goal of priority p: PRIORITY_WEIGHT ** (1 - p)
#: × GOAL_WEIGHT (must = 100, should = 10, nice to have = 1)
GOAL_WEIGHT = 100.0
PRIORITY_WEIGHT = 10.0

_GOAL_RE = re.compile(
    r"^\s*(?P<metric>D(?:\d+(?:\.\d+)?|mean|max|min)|V\d+(?:\.\d+)?)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<value>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>Gy|%)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Goal:
    """One clinical goal on one structure.

    ``metric``: "D95", "Dmean", "Dmax", "Dmin" (value in Gy) or "V20" (value in % volume,
    the number after V is a total-course dose in Gy). ``op``: "<=" or ">=".
    ``value``: the goal's threshold *per fraction* for dose metrics (Gy), % for V metrics.
    ``value_total``: the threshold as written in the file (total-course Gy, or %).
    """

    structure: str
    metric: str
    op: str
    value: float
    value_total: float
    priority: int = 1
    text: str = ""

    @property
    def is_dose_metric(self) -> bool:
        return self.metric.upper().startswith("D")


@dataclass(frozen=True)
class ObjectiveTerm:
    """One optimisation term. ``dose_gy`` is *per fraction*; ``dose_total_gy`` as written."""

    structure: str
    type: str
    dose_gy: float
    dose_total_gy: float
    weight: float
    volume_pct: float | None = None
    goal_index: int | None = None  # index into ClinicalGoals.goals for a goal-derived term


@dataclass
class ClinicalGoals:
    site: str
    prescription: Prescription
    goals: list[Goal]
    objectives: list[ObjectiveTerm]
    description: str = ""
    source: str = ""

    @property
    def structures(self) -> list[str]:
        names: list[str] = []
        for n in [g.structure for g in self.goals] + [o.structure for o in self.objectives]:
            if n not in names:
                names.append(n)
        return names

    def goal_terms(self) -> list[ObjectiveTerm]:
        """One penalty term per clinical goal (:func:`goal_objective_term`)."""
        return [goal_objective_term(g, i, self.prescription.number_of_fractions)
                for i, g in enumerate(self.goals)]

    def to_dict(self) -> dict:
        return {"site": self.site, "source": self.source,
                "prescription": asdict(self.prescription),
                "goals": [asdict(g) for g in self.goals],
                "objectives": [asdict(o) for o in self.objectives]}


def parse_goal(text: str, structure: str, fractions: int, priority: int = 1,
               where: str = "goal") -> Goal:
    """Parse "D95 >= 50 Gy" / "Dmean <= 20 Gy" / "V65 <= 17 %" (total-course doses)."""
    m = _GOAL_RE.match(str(text))
    if not m:
        raise ConfigError(f"{where}: cannot parse goal {text!r}; expected e.g. 'D95 >= 50 Gy', "
                          "'Dmean <= 20 Gy', 'V65 <= 17 %'")
    metric = m["metric"]
    metric = metric[0].upper() + metric[1:].lower()
    op = {"<": "<=", ">": ">="}.get(m["op"], m["op"])
    value_total = float(m["value"])
    unit = (m["unit"] or "").lower()
    if metric.startswith("V"):
        if unit not in ("%", ""):
            raise ConfigError(f"{where}: {text!r}: V metrics take a volume in %")
        value = value_total
    else:
        if unit not in ("gy", ""):
            raise ConfigError(f"{where}: {text!r}: D metrics take a dose in Gy")
        value = value_total / fractions
    if metric.startswith("D") and metric not in ("Dmean", "Dmax", "Dmin"):
        x = float(metric[1:])
        if not 0 <= x <= 100:
            raise ConfigError(f"{where}: {text!r}: volume percentage must be within 0..100")
    return Goal(structure=structure, metric=metric, op=op, value=value, value_total=value_total,
                priority=int(priority), text=str(text).strip())


def goal_objective_term(goal: Goal, index: int, fractions: int) -> ObjectiveTerm:
    """The smooth penalty term of one clinical goal, at the goal's own dose level.

    ``Dx >= D`` → dvh_min(D, x %), ``Dx <= D`` → dvh_max(D, x %); ``Dmin >= D`` → min_dose,
    ``Dmax <= D`` → max_dose; ``Dmean <=/>= D`` → mean_max / mean_min; ``V_D <= y %`` (at most
    y % receives D) ≡ ``D_y <= D`` → dvh_max(D, y %), ``V_D >= y %`` → dvh_min(D, y %).
    Goals that cannot be penalised in the direction written (``Dmax >= D``, ``Dmin <= D``) get
    the equivalent DVH term at 0 % / 100 %. Initial weight from the priority:
    ``GOAL_WEIGHT × PRIORITY_WEIGHT^(1 − priority)``.
    """
    weight = GOAL_WEIGHT * PRIORITY_WEIGHT ** (1 - goal.priority)
    m = goal.metric
    up = goal.op == ">="
    if m.startswith("V"):
        d_total = float(m[1:])
        return ObjectiveTerm(goal.structure, "dvh_min" if up else "dvh_max", d_total / fractions,
                             d_total, weight, float(goal.value), index)
    d, d_total = goal.value, goal.value_total
    if m == "Dmean":
        typ, vol = ("mean_min" if up else "mean_max"), None
    elif m == "Dmax":
        typ, vol = ("dvh_min", 0.0) if up else ("max_dose", None)
    elif m == "Dmin":
        typ, vol = ("min_dose", None) if up else ("dvh_max", 100.0)
    else:
        typ, vol = ("dvh_min" if up else "dvh_max"), float(m[1:])
    return ObjectiveTerm(goal.structure, typ, d, d_total, weight, vol, index)


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class PrescriptionConfig:
    """``[prescription]``: total course dose (Gy) in ``fractions`` to the ROI ``target``."""

    dose_gy: Annotated[Float, Field(ge=1e-6)]
    fractions: Annotated[Int, Field(ge=1)]
    target: Text


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class GoalConfig:
    """One ``[[goal]]``: ``goal`` in the goals language (:func:`parse_goal`)."""

    structure: Str
    goal: Str
    priority: Annotated[Int, Field(ge=1)] = 1


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class ObjectiveConfig:
    """One ``[[objective]]``: ``dose_gy`` total course (Gy); ``volume_pct`` for (and only
    for) ``dvh_min`` / ``dvh_max``."""

    structure: Str
    type: Literal[OBJECTIVE_TYPES]
    dose_gy: Annotated[Float, Field(ge=0)]
    weight: Annotated[Float, Field(ge=0)]
    volume_pct: Annotated[Float, Field(ge=0, le=100)] | None = None

    @model_validator(mode="after")
    def _volume_for_dvh_only(self):
        dvh = self.type in ("dvh_min", "dvh_max")
        if dvh and self.volume_pct is None:
            raise ValueError("volume_pct: required for dvh_min / dvh_max objectives")
        if not dvh and self.volume_pct is not None:
            raise ValueError("volume_pct: only valid for dvh_min / dvh_max objectives")
        return self


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class GoalsFile:
    """A clinical goals file (module docstring); ``site`` defaults to the file's stem."""

    prescription: PrescriptionConfig
    goal: list[GoalConfig]
    objective: list[ObjectiveConfig] = field(default_factory=list)
    site: Str | None = None
    description: Str = ""


def load_goals(path: str | Path) -> ClinicalGoals:
    """Read and validate a goals file (see module docstring). Doses become per fraction."""
    path = Path(path)
    f = load_config(GoalsFile, path)
    rx = f.prescription
    nfx = rx.fractions
    presc = Prescription(dose_per_fraction_gy=rx.dose_gy / nfx, number_of_fractions=nfx,
                         target_roi_name=rx.target)
    goals = [parse_goal(g.goal, g.structure, nfx, g.priority, f"{path}: goal.{i}")
             for i, g in enumerate(f.goal)]
    objectives = [ObjectiveTerm(structure=o.structure, type=o.type, dose_gy=o.dose_gy / nfx,
                                dose_total_gy=o.dose_gy, weight=o.weight,
                                volume_pct=o.volume_pct) for o in f.objective]
    return ClinicalGoals(site=f.site if f.site is not None else path.stem, prescription=presc,
                         goals=goals, objectives=objectives, description=f.description,
                         source=str(path))


# --- DVH metrics --------------------------------------------------------------------------


def dose_at_volume(doses: np.ndarray, volume_pct: float) -> float:
    """Dx (Gy): minimum dose to the hottest ``volume_pct`` % of equal-volume voxels.

    k = max(1, ceil(x/100·N)); Dx = k-th largest dose. NaN for an empty structure.
    """
    d = np.asarray(doses, dtype=np.float64).ravel()
    n = d.size
    if n == 0:
        return float("nan")
    k = max(1, math.ceil(volume_pct / 100.0 * n - 1e-9))
    k = min(k, n)
    # k-th largest = element n-k in ascending order
    return float(np.partition(d, n - k)[n - k])


def volume_at_dose(doses: np.ndarray, dose_gy: float) -> float:
    """Vx: percentage (0..100) of equal-volume voxels receiving ≥ ``dose_gy``."""
    d = np.asarray(doses, dtype=np.float64).ravel()
    if d.size == 0:
        return float("nan")
    return float(100.0 * np.count_nonzero(d >= dose_gy) / d.size)


def metric_value(doses: np.ndarray, metric: str, fractions: int = 1) -> float:
    """Value of ``metric`` ("D95", "Dmean", "Dmax", "Dmin", "V20") for voxel ``doses``.

    Doses in Gy (whatever scale they are in: per fraction in, per fraction out). For Vx the
    threshold x is a total-course dose, converted with ``fractions``; result in %.
    """
    d = np.asarray(doses, dtype=np.float64).ravel()
    if d.size == 0:
        return float("nan")
    m = metric.lower()
    if m == "dmean":
        return float(d.mean())
    if m == "dmax":
        return float(d.max())
    if m == "dmin":
        return float(d.min())
    if m.startswith("d"):
        return dose_at_volume(d, float(m[1:]))
    if m.startswith("v"):
        return volume_at_dose(d, float(m[1:]) / fractions)
    raise OptimizationError(f"unknown DVH metric {metric!r}")


@dataclass
class GoalResult:
    """Evaluation of one goal. Dose values are per fraction (Gy) in ``value``/``goal`` and
    total-course in ``value_total``/``goal_total``; V metrics are in % in both."""

    structure: str
    metric: str
    op: str
    value: float
    goal: float
    passed: bool
    value_total: float = float("nan")
    goal_total: float = float("nan")
    priority: int = 1
    margin_total: float = float("nan")  # how far inside (+) or outside (−) the goal, total Gy/%

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}

    @property
    def label(self) -> str:
        unit = "%" if self.metric.startswith("V") else "Gy"
        return f"{self.metric} {self.op} {self.goal_total:g} {unit}"


def _voxel_doses_of(dose, mask) -> np.ndarray:
    if isinstance(dose, Volume):
        arr = dose.array
    else:
        arr = np.asarray(dose)
    m = mask.array if isinstance(mask, Volume) else np.asarray(mask)
    if m.dtype == bool:
        if m.shape != arr.shape:
            raise OptimizationError(f"mask shape {m.shape} != dose shape {arr.shape}")
        return arr[m]
    return arr.ravel()[m.ravel()]  # integer indices


def evaluate_goals(dose_gy_per_fraction, masks: dict, goals: ClinicalGoals | list[Goal],
                   fractions: int | None = None) -> list[GoalResult]:
    """Evaluate clinical goals on a per-fraction dose.

    ``dose_gy_per_fraction``: a dose :class:`Volume` or numpy array (Gy per fraction).
    ``masks``: ROI name → boolean mask (same shape as the dose; :class:`Volume` or array) or
    integer flat indices into the dose array. ROI names match case-insensitively.
    A goal whose structure is missing or empty fails with value NaN (never silently passes).
    """
    if isinstance(goals, ClinicalGoals):
        fractions = goals.prescription.number_of_fractions if fractions is None else fractions
        glist = goals.goals
    else:
        glist = list(goals)
        fractions = fractions or 1
    lower = {k.lower(): v for k, v in masks.items()}
    out = []
    for g in glist:
        m = lower.get(g.structure.lower())
        doses = np.empty(0) if m is None else _voxel_doses_of(dose_gy_per_fraction, m)
        v = metric_value(doses, g.metric, fractions)
        scale = 1.0 if g.metric.startswith("V") else float(fractions)
        if math.isnan(v):
            passed = False
            margin = float("nan")
        else:
            # tolerance: 1e-6 relative, so that a value printed equal to the goal passes
            tol = 1e-6 * max(abs(g.value), 1e-9)
            passed = v >= g.value - tol if g.op == ">=" else v <= g.value + tol
            margin = (v - g.value) * scale if g.op == ">=" else (g.value - v) * scale
        out.append(GoalResult(structure=g.structure, metric=g.metric, op=g.op, value=v,
                              goal=g.value, passed=bool(passed), value_total=v * scale,
                              goal_total=g.value_total, priority=g.priority,
                              margin_total=margin))
    return out


def goal_table(results: list[GoalResult], title: str = "") -> str:
    """Plain-text table of goal results (total-course doses)."""
    lines = [title] if title else []
    lines.append(f"{'structure':<12} {'goal':<22} {'value':>10} {'margin':>9}  result")
    for r in results:
        unit = "%" if r.metric.startswith("V") else "Gy"
        val = "n/a" if math.isnan(r.value_total) else f"{r.value_total:.2f} {unit}"
        mar = "" if math.isnan(r.margin_total) else f"{r.margin_total:+.2f}"
        lines.append(f"{r.structure:<12} {r.label:<22} {val:>10} {mar:>9}  "
                     f"{'PASS' if r.passed else 'FAIL'}")
    return "\n".join(lines)


__all__ = [
    "GOAL_WEIGHT",
    "OBJECTIVE_TYPES",
    "PRIORITY_WEIGHT",
    "ClinicalGoals",
    "Goal",
    "GoalResult",
    "ObjectiveTerm",
    "dose_at_volume",
    "evaluate_goals",
    "goal_objective_term",
    "goal_table",
    "load_goals",
    "metric_value",
    "parse_goal",
    "volume_at_dose",
]
