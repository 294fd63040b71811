"""What a session hands to the treatment management system means, and the numbers the console
shows for it.

**The adapted RT Plan is a plan for this session only.** Online adaptation re-plans on every
session's anatomy: the adapted plan is made for today's CBCT and is never meant to be
delivered again (tomorrow gets its own). So its one fraction group has Number of Fractions
Planned = 1, its TARGET dose reference's Target Prescription Dose is the course's dose per
fraction (what this one plan delivers in total), and its Fraction Group Description names
the course it is one session of. Its RT Dose holds that one delivery, i.e. the dose of the
whole plan: Dose Summation Type PLAN ("dose calculated for entire delivery of all fraction
groups of RT Plan", PS3.3 C.8.8.3), which for a one-fraction plan is also its one session.
A reader therefore gets today's dose in Gy, and a record-and-verify system never schedules
the adapted plan for more than the session it was made for. The course continues with the
scheduled plan (the adapted plan references it as PREDECESSOR).

**The scheduled plan recalculated on today's anatomy** keeps its N-fraction fraction group;
its recalculated RT Dose holds one session's dose: Dose Summation Type FRACTION_SESSION
("dose calculated for a single session ("fraction") of a single Fraction Group within RT
Plan"), referencing that fraction group.

**The image the dose was computed on** (the synthetic CT completed beyond the CBCT with the
rigidly mapped planning CT) is handed off first, in the CBCT's study and Frame of Reference;
the RT Struct references it, the RT Plan and RT Dose are in its frame and the RT Dose grid
lies inside it (checked by the writer).

Doses in Gy per session unless a name says ``total``; LPS mm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaptive.dicom.enums import DoseSummationType
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Plan, Prescription
from adaptive.optimization.goals import metric_value

#: what the adapted plan's RT Dose holds: the whole one-session plan
ADAPTED_DOSE_SUMMATION = DoseSummationType.PLAN
#: what the scheduled plan's dose recalculated on today's anatomy holds: one of its sessions
SCHEDULED_TODAY_SUMMATION = DoseSummationType.FRACTION_SESSION
#: DVH figures the console shows per ROI (Gy per session, as in the handed-off RT Dose)
SUMMARY_METRICS = ("D98", "D95", "D50", "D2", "Dmean", "Dmax")


def make_session_plan(plan: Plan, course: Prescription) -> Plan:
    """``plan`` (in place, and returned) as a plan for one session of ``course``: one fraction
    of ``course.dose_per_fraction_gy`` to the same target, its fraction group described as
    one session of the course (see the module doc)."""
    plan.prescription = Prescription(dose_per_fraction_gy=course.dose_per_fraction_gy,
                                     number_of_fractions=1,
                                     target_roi_name=course.target_roi_name)
    plan.extra = dict(plan.extra, fraction_group_description=(
        f"one session of {course.total_dose_gy:g} Gy in {course.number_of_fractions} fx"))
    return plan


def dose_summary(dose: Volume, masks: dict[str, np.ndarray],
                 metrics: tuple[str, ...] = SUMMARY_METRICS) -> dict[str, dict[str, float]]:
    """ROI name → metric → value (Gy, the units of ``dose``) on ``dose``'s grid, with the DVH
    semantics of :mod:`adaptive.optimization.goals` (``masks`` on the dose grid)."""
    out: dict[str, dict[str, float]] = {}
    a = np.asarray(dose.array)
    for name, given in masks.items():
        m = np.asarray(given, dtype=bool)
        if m.shape != a.shape:
            raise ValueError(f"mask {name!r} has shape {m.shape}, dose {a.shape}")
        d = a[m]
        out[name] = {k: round(metric_value(d, k), 4) for k in metrics} if d.size else {}
    return out


def console_dose_summary(adapted: Volume, scheduled: Volume, masks: dict,
                         course: Prescription) -> dict:
    """The console's DVH table: per ROI, Gy per session of the adapted plan (as in its
    handed-off RT Dose) and of the scheduled plan recalculated on today's anatomy."""
    return {"units": "Gy per session (as in the handed-off RT Dose)",
            "fractions_in_course": int(course.number_of_fractions),
            "adapted": dose_summary(adapted, masks), "scheduled": dose_summary(scheduled, masks)}


def cbct_grid(registration: dict, default: Grid) -> Grid:
    """The CBCT's grid from a registration record (``cbct_grid``), else ``default``: checks of
    today's contours against the CBCT's field of view use it, not the extended synthetic CT's."""
    g = registration.get("cbct_grid")
    return Grid.from_dict(g) if g else default


def image_series_files(series_dir: str | Path) -> list[str]:
    """The instance files of a written image series (to hand off before the RT objects)."""
    return [str(p) for p in sorted(Path(series_dir).glob("*.dcm"))]
