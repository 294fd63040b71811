"""What a fraction report shows, read back from the files the chain wrote (not from the
chain's memory): the stage records, the doses as written to DICOM (RT Dose), today's
structures as written (propagated RT Struct), the CBCT, and the ground truth when the
fraction has one.

Frames and units: everything of today (synthetic CT, propagated structures, both doses) is
in the daily image's (CBCT) Frame of Reference, LPS mm. Doses are read per fraction (Gy) and
shown as total-course Gy (× the prescription's number of fractions), like the goals.

Structure masks on the dose grid are made the way the planning stage makes them
(:func:`adaptive.pipeline.planning.stage_masks`): rasterised on the image the structure set
references, then resampled onto the dose grid (linear, ≥ 0.5), so DVHs and goal values
recomputed here agree with the stage's own (:attr:`FractionData.recomputed`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adaptive.dicom.ct_series import read_ct_series
from adaptive.dicom.rtdose import read_rtdose
from adaptive.dicom.rtstruct import read_rtstruct
from adaptive.dose.dose_grid import mask_on_grid
from adaptive.geometry.dvf_io import read_dvf
from adaptive.geometry.volume import Volume
from adaptive.optimization.goals import ClinicalGoals, metric_value
from adaptive.registration.evaluate import dice, dilate_mm, tre
from adaptive.reports.dvh import Dvh, cumulative_dvh

if TYPE_CHECKING:  # the replay (a layer above) hands its discovered inputs to the reports
    from adaptive.replay.discover import FractionInputs

#: margin (mm) around the true target in which the registration error is also reported
#: (the region the dose gradient lives in; the registration benchmark uses the same)
TRE_MARGIN_MM = 20.0

PLANS = ("scheduled", "adapted")


@dataclass
class FractionData:
    """A replayed fraction as its report shows it (module docstring for frames/units)."""

    inputs: FractionInputs
    goals: ClinicalGoals
    registration: dict
    planning: dict | None
    timings_s: dict
    cbct: Volume
    synthetic_ct: Volume | None
    target: str
    #: today's structures on the CBCT grid (bool (z, y, x)), by ROI name
    today_cbct: dict[str, np.ndarray] = field(default_factory=dict)
    #: per-fraction doses (Gy) on their dose grid, by plan ("scheduled", "adapted")
    doses: dict[str, Volume] = field(default_factory=dict)
    #: why a plan's dose is absent, by plan
    missing: dict[str, str] = field(default_factory=dict)
    #: DVHs on today's (propagated) structures, plan → ROI → DVH
    dvh_today: dict[str, dict[str, Dvh]] = field(default_factory=dict)
    #: DVHs on the true structures (ground truth only), plan → ROI → DVH
    dvh_truth: dict[str, dict[str, Dvh]] = field(default_factory=dict)
    #: goal values recomputed from the files: plan → "ROI metric" → total Gy (V: %)
    recomputed: dict[str, dict[str, float]] = field(default_factory=dict)
    #: goal values on the true anatomy: plan → "ROI metric" → total Gy (V: %)
    truth_goals: dict[str, dict[str, float]] = field(default_factory=dict)
    tre_mm: dict[str, dict] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)

    @property
    def fractions(self) -> int:
        return int(self.goals.prescription.number_of_fractions)


def goal_key(structure: str, metric: str) -> str:
    return f"{structure} {metric}"


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_fraction_data(out_dir: str | Path, inputs: FractionInputs, goals: ClinicalGoals
                       ) -> FractionData:
    """Read a replayed fraction's outputs in ``out_dir`` (see :mod:`adaptive.replay.chain`)."""
    out = Path(out_dir)
    reg = _json(out / "registration_result.json") or {}
    planning = _json(out / "planning_result.json")
    timings = _json(out / "timings.json") or {}
    cbct, _ = read_ct_series([Path(f) for f in inputs.cbct.files])
    sct = None
    if reg.get("synthetic_ct_dir") and Path(reg["synthetic_ct_dir"]).is_dir():
        sct, _ = read_ct_series(reg["synthetic_ct_dir"])
    data = FractionData(inputs, goals, reg, planning, timings, cbct, sct,
                        goals.prescription.target_roi_name)
    _load_doses(data)
    today = None
    if reg.get("rtstruct") and Path(reg["rtstruct"]).is_file() and sct is not None:
        today = read_rtstruct(reg["rtstruct"], grid=sct.grid)
        for name in goals.structures:
            if name in today:
                data.today_cbct[name] = mask_on_grid(today.mask(name, sct.grid), sct.grid,
                                                     cbct.grid, name)
    if today is not None:
        data.dvh_today, data.recomputed = _dvhs(data, today, sct.grid)
    if inputs.truth is not None:
        _truth(data, today)
    return data


def _load_doses(data: FractionData) -> None:
    p = data.planning or {}
    paths = {"scheduled": (p.get("scheduled") or {}).get("rtdose_today"),
             "adapted": (p.get("adapted") or {}).get("rtdose")}
    for plan, path in paths.items():
        if path and Path(path).is_file():
            data.doses[plan], _ = read_rtdose(path)
        elif data.planning is None and data.registration.get("validity") == "none":
            failed = ", ".join(data.registration.get("registration_failed") or [])
            data.missing[plan] = (f"no valid registration ({failed}): as in a session, the "
                                  f"scheduled plan would be delivered with the linac's own "
                                  f"image guidance and no metrics may be computed")
        elif data.planning is None:
            data.missing[plan] = "the planning stage did not run"
        elif plan == "adapted":
            a = p.get("adapted") or {}
            failed = [c["name"] for c in a.get("checks", []) if not c.get("passed")
                      and c.get("blocking", True)]
            data.missing[plan] = a.get("reason") or (
                "no adapted plan was written: it failed its checks ("
                + ", ".join(failed) + ")" if failed else "no adapted plan was written")
        else:
            data.missing[plan] = ("no dose of the scheduled plan on today's anatomy (no valid "
                                  "registration to position it)")


def _masks_on(ss, names, image_grid, dose_grid) -> dict[str, np.ndarray]:
    return {n: mask_on_grid(ss.mask(n, image_grid), image_grid, dose_grid, n)
            for n in names if n in ss}


def _dvhs(data: FractionData, ss, image_grid) -> tuple[dict, dict]:
    dvhs: dict[str, dict[str, Dvh]] = {}
    values: dict[str, dict[str, float]] = {}
    n = data.fractions
    for plan, dose in data.doses.items():
        masks = _masks_on(ss, data.goals.structures, image_grid, dose.grid)
        vv = dose.grid.voxel_volume_mm3
        dvhs[plan] = {k: cumulative_dvh(k, dose.array[m] * n, vv) for k, m in masks.items()}
        values[plan] = {goal_key(g.structure, g.metric): _goal_value(dose, masks, g, n)
                        for g in data.goals.goals if g.structure in masks}
    return dvhs, values


def _goal_value(dose: Volume, masks: dict, g, n: int) -> float:
    v = metric_value(dose.array[masks[g.structure]], g.metric, n)
    return v if g.metric.startswith("V") else v * n


def _truth(data: FractionData, today) -> None:
    t = data.inputs.truth
    truth = read_rtstruct(t.rtstruct, grid=data.cbct.grid)
    data.dvh_truth, data.truth_goals = _dvhs(data, truth, data.cbct.grid)
    for name in data.goals.structures:
        if name in truth and name in data.today_cbct:
            data.dice[name] = dice(data.today_cbct[name], truth.mask(name, data.cbct.grid))
    dvf_path = data.registration.get("dvf")
    if not dvf_path or not Path(dvf_path).is_file() or data.target not in truth:
        return
    u, ugrid = read_dvf(dvf_path)
    u_true, tgrid = read_dvf(t.dvf)
    if not ugrid.same_as(tgrid):
        u = np.stack([Volume(u[..., c], ugrid).resample_to(tgrid, order=1).array
                      for c in range(3)], axis=-1)
    target = mask_on_grid(truth.mask(data.target, data.cbct.grid), data.cbct.grid, tgrid,
                          data.target)
    data.tre_mm[data.target] = tre(u, u_true, target)
    near = dilate_mm(target, tgrid, TRE_MARGIN_MM)
    data.tre_mm[f"{data.target} + {TRE_MARGIN_MM:g} mm"] = tre(u, u_true, near)
