"""One archived fraction through the services' chain: :func:`registration_stage` then
:func:`planning_stage` of :mod:`adaptive.pipeline.fraction`, called as the services' workers
call them (:mod:`services.workers.stages`: the same safety checks, the clinical
protocol recorded with the plan), so a replayed fraction means what a live session would
have done. Used by ``adaptive replay`` for one fraction and by every Dask task of an
archive replay (:mod:`adaptive.replay.archive`).

The daily image's rigid Spatial Registration, when the archive has one, is passed to the
registration stage as the services pass a received one (a candidate initial alignment).
When the registration gate finds no valid registration (validity ``none``), the planning
stage is not run, as in a session (the scheduled plan would be delivered with the linac's
own image guidance; no metrics may be computed).

Outputs in ``out_dir`` are those of the two stages (``registration_result.json``,
``planning_result.json``, ``dvf.mha``, ``synthetic_ct/``, ``RS.dcm``, ``REG.dcm``, the adapted
``RP.dcm``/``RD.dcm`` when it passed its checks, ``scheduled_today/RD.dcm``,
``comparison.json``), ``timings.json`` (s, wall clock) and ``environment.json`` (thread counts
and the like: :mod:`adaptive.replay.environment`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adaptive.dicom._common import read_dataset
from adaptive.jsonable import write_json_atomic
from adaptive.optimization.goals import ClinicalGoals, load_goals
from adaptive.optimization.protocols import ProtocolTable, protocol_path
from adaptive.pipeline.fraction import Progress, planning_stage, registration_stage
from adaptive.pipeline.planning import PlanSettings
from adaptive.pipeline.safety import NONE
from adaptive.replay.discover import FractionInputs
from adaptive.replay.environment import compute_environment, count_fraction


@dataclass(frozen=True)
class ChainSettings:
    """What a replay may change in the chain. ``deadline_s``: optimiser budget (s, None = run
    to convergence: reproducible); ``registration_budget_s``: registration stage budget (s);
    ``dose_grid_spacing_mm`` / ``bixel_size_mm``: None keeps :class:`PlanSettings`' defaults
    (3 mm / 5 mm)."""

    deadline_s: float | None = None
    registration_budget_s: float | None = None
    dose_grid_spacing_mm: float | None = None
    bixel_size_mm: float | None = None

    def plan_settings(self) -> PlanSettings:
        s = PlanSettings(deadline_s=self.deadline_s)
        if self.dose_grid_spacing_mm is not None:
            s.dose_grid_spacing_mm = float(self.dose_grid_spacing_mm)
        if self.bixel_size_mm is not None:
            s.bixel_size_mm = float(self.bixel_size_mm)
        return s

    def to_dict(self) -> dict:
        return {**asdict(self), "plan": asdict(self.plan_settings())}


@dataclass(frozen=True)
class GoalsChoice:
    """The clinical protocol a patient is replayed with: its name, goals file and where the
    choice came from (a :class:`~adaptive.optimization.protocols.ProtocolSource` text or
    ``--goals``)."""

    name: str
    path: str
    source: str

    def load(self) -> ClinicalGoals:
        return load_goals(self.path)

    @property
    def protocol(self) -> dict:
        """The ``{"name", "source"}`` record the planning stage keeps in its provenance."""
        return {"name": self.name, "source": self.source}


def goals_for(inputs: FractionInputs, override: str | Path | None = None,
              table: ProtocolTable | None = None) -> GoalsChoice:
    """``override`` (``--goals``: a goals file, or a protocol name of ``config/goals``) when
    given; else the protocol mapped from the scheduled plan's Treatment Protocols or RT Plan
    Label through ``config/protocols.toml``, as the services map it when the console names
    none. :class:`~adaptive.errors.ClinicalProtocolError` when the plan is not mapped,
    :class:`~adaptive.errors.NotDicomError` when it cannot be read."""
    if override is not None:
        p = Path(override)
        if not p.is_file() and p.suffix != ".toml":
            p = protocol_path(str(override))
        return GoalsChoice(p.stem, str(p.resolve()), "--goals")
    ds = read_dataset(inputs.planning.rtplan, stop_before_pixels=True)
    name, source = (table or ProtocolTable.load()).for_plan(
        str(ds.get("TreatmentProtocols", "") or ""), str(ds.get("RTPlanLabel", "") or ""))
    return GoalsChoice(name, str(protocol_path(name)), source)


def replay_fraction(inputs: FractionInputs, out_dir: str | Path, goals: GoalsChoice,
                    settings: ChainSettings, progress: Progress | None = None) -> dict:
    """Run the chain on one fraction (module docstring). Returns ``{"registration": record,
    "planning": record or None, "timings_s": {...}}`` (the stages' JSON-able records)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ct_files = [Path(f) for f in inputs.planning.planning_ct.files]
    cbct_files = [Path(f) for f in inputs.cbct.files]
    T: dict[str, float] = {}
    before = count_fraction()
    t = time.perf_counter()
    reg = registration_stage(ct_files, inputs.planning.rtstruct, inputs.planning.rtplan,
                             cbct_files, out, budget_s=settings.registration_budget_s,
                             progress=progress,
                             spatial_registration=inputs.spatial_registration)
    T.update({f"registration.{k}": v for k, v in reg["timings_s"].items() if k != "total"})
    T["registration_total"] = round(time.perf_counter() - t, 3)
    if reg.get("validity") == NONE:
        # as in a session: no planning on an invalid registration (no metrics at all)
        T["total"] = round(time.perf_counter() - t, 3)
        _write_records(out, T, before)
        return {"registration": reg, "planning": None, "timings_s": T}
    po = planning_stage(inputs.planning.rtplan, reg, out, goals.load(),
                        settings=settings.plan_settings(), progress=progress,
                        protocol=goals.protocol)
    T.update({k if k.startswith("plan") else f"planning.{k}": v
              for k, v in po.timings_s.items() if k != "total"})
    T["planning_total"] = round(time.perf_counter() - t - T["registration_total"], 3)
    T["total"] = round(time.perf_counter() - t, 3)
    _write_records(out, T, before)
    return {"registration": reg, "planning": po.result, "timings_s": T}


def _write_records(out: Path, timings: dict[str, float], fractions_before: int) -> None:
    """``timings.json`` and ``environment.json`` of a replayed fraction."""
    write_json_atomic(out / "timings.json", timings)
    write_json_atomic(out / "environment.json", compute_environment(fractions_before))
