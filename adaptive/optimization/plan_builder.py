"""Beam arrangements and deliverable :class:`Plan` objects from sequenced beams.

Angles in degrees (IEC 61217), isocenter LPS mm, MU per fraction.
"""

from __future__ import annotations

import numpy as np

from adaptive.errors import OptimizationError
from adaptive.model.plan import Beam, Plan, Prescription
from adaptive.optimization.sequencing import MlcGeometry, SequencedBeam, sequenced_beam_to_beam


def equispaced_beams(isocenter_lps_mm, n_beams: int = 9, *, start_deg: float = 0.0,
                     energy_mv: float = 6.0, sad_mm: float = 1000.0,
                     machine: str = "ADAPTIVE_6MV") -> list[Beam]:
    """``n_beams`` coplanar beam templates at gantry start + k·360/n (0, 40, …, 320 for 9),
    collimator and couch 0, common isocenter; no control points yet (set by sequencing)."""
    if n_beams < 1:
        raise OptimizationError(f"need at least one beam, got {n_beams}")
    iso = np.asarray(isocenter_lps_mm, dtype=np.float64).reshape(3)
    out = []
    for k in range(n_beams):
        g = (start_deg + k * 360.0 / n_beams) % 360.0
        out.append(Beam(number=k + 1, name=f"G{round(g):03d}", gantry_deg=float(g),
                        collimator_deg=0.0, couch_deg=0.0, isocenter_lps_mm=iso,
                        control_points=[], meterset_mu=0.0, energy_mv=energy_mv, sad_mm=sad_mm,
                        beam_type="DYNAMIC", treatment_machine_name=machine))
    return out


def templates_from_plan(plan: Plan) -> list[Beam]:
    """Beam templates (geometry only) of an existing plan, e.g. the scheduled plan."""
    return [Beam(number=b.number, name=b.name, gantry_deg=b.gantry_deg,
                 collimator_deg=b.collimator_deg, couch_deg=b.couch_deg,
                 isocenter_lps_mm=b.isocenter_lps_mm.copy(), control_points=[], meterset_mu=0.0,
                 energy_mv=b.energy_mv, sad_mm=b.sad_mm, beam_type="DYNAMIC",
                 treatment_machine_name=b.treatment_machine_name) for b in plan.beams]


def build_plan(sequenced: list[SequencedBeam], templates: list[Beam], mlc: MlcGeometry, *,
               prescription: Prescription, frame_of_reference_uid: str, label: str = "ADAPTIVE",
               name: str = "", referenced_structure_set_uid: str = "",
               predecessor_plan_uid: str = "", plan_intent: str = "RESEARCH",
               patient_id: str = "", patient_name: str = "", study_instance_uid: str = "",
               extra: dict | None = None) -> Plan:
    """A deliverable step-and-shoot plan (beams without MU after sequencing are omitted;
    an error if none is left)."""
    beams = []
    for sb, tpl in zip(sequenced, templates):
        if sb.segments:
            beams.append(sequenced_beam_to_beam(sb, tpl, mlc))
    if not beams:
        raise OptimizationError("no beam has any segment after sequencing")
    return Plan(label=label[:16], beams=beams, frame_of_reference_uid=frame_of_reference_uid,
                prescription=prescription, name=name or label,
                referenced_structure_set_uid=referenced_structure_set_uid,
                predecessor_plan_uid=predecessor_plan_uid, plan_intent=plan_intent,
                patient_id=patient_id, patient_name=patient_name,
                study_instance_uid=study_instance_uid, extra=dict(extra or {}))
