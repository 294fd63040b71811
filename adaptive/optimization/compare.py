"""Scheduled vs adapted plan: goal-by-goal comparison on today's anatomy.

The scheduled (reference) plan is recalculated on today's anatomy (synthetic CT +
propagated structures) by the caller; this module compares the two per-fraction doses
against the same clinical goals (values reported as total-course doses, Gy; V in %).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from adaptive.optimization.goals import ClinicalGoals, GoalResult, evaluate_goals


@dataclass
class ComparisonRow:
    structure: str
    goal: str
    priority: int
    scheduled: GoalResult
    adapted: GoalResult

    def to_dict(self) -> dict:
        def num(x):
            return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)
        return {"structure": self.structure, "goal": self.goal, "priority": self.priority,
                "scheduled_value": num(self.scheduled.value_total),
                "scheduled_passed": self.scheduled.passed,
                "adapted_value": num(self.adapted.value_total),
                "adapted_passed": self.adapted.passed}


@dataclass
class PlanComparison:
    rows: list[ComparisonRow]

    @property
    def scheduled_passed(self) -> int:
        return sum(r.scheduled.passed for r in self.rows)

    @property
    def adapted_passed(self) -> int:
        return sum(r.adapted.passed for r in self.rows)

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows],
                "scheduled_goals_passed": self.scheduled_passed,
                "adapted_goals_passed": self.adapted_passed, "n_goals": len(self.rows)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        head = (f"{'structure':<12} {'goal':<20} {'scheduled':>12}      {'adapted':>12}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            unit = "%" if r.scheduled.metric.startswith("V") else "Gy"

            def cell(g: GoalResult, unit: str = unit) -> str:
                v = "n/a" if math.isnan(g.value_total) else f"{g.value_total:.2f} {unit}"
                return f"{v:>12} {'ok' if g.passed else 'FAIL':<4}"
            lines.append(f"{r.structure:<12} {r.goal:<20} {cell(r.scheduled)} {cell(r.adapted)}")
        lines.append(f"goals met: scheduled {self.scheduled_passed}/{len(self.rows)}, "
                     f"adapted {self.adapted_passed}/{len(self.rows)}")
        return "\n".join(lines)


def compare_plans(scheduled_dose, adapted_dose, masks: dict, goals: ClinicalGoals
                  ) -> PlanComparison:
    """Evaluate ``goals`` on both per-fraction doses (same grid as ``masks``)."""
    s = evaluate_goals(scheduled_dose, masks, goals)
    a = evaluate_goals(adapted_dose, masks, goals)
    rows = [ComparisonRow(x.structure, x.label, x.priority, x, y) for x, y in zip(s, a)]
    return PlanComparison(rows)
