"""Photon treatment plans in IEC 61217 beam geometry.

Angles in degrees (IEC 61217: gantry, beam limiting device (collimator) and patient
support (couch) angles). Isocenter in DICOM patient LPS mm. Jaw and MLC positions in mm
projected to the isocenter plane, in the beam limiting device coordinate system
(IEC X = leaf travel direction for an MLCX, Y = across leaves), as in DICOM RT Plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ControlPoint:
    """One control point (step-and-shoot: segments are pairs of identical apertures).

    ``cumulative_meterset_weight``: running fraction of the beam meterset (0..1 once
    normalised; DICOM Final Cumulative Meterset Weight defines the scale).
    ``jaw_x_mm`` / ``jaw_y_mm``: (X1, X2) and (Y1, Y2) jaw positions at isocenter.
    ``mlc_x1_mm`` / ``mlc_x2_mm``: per-leaf-pair positions (bank X1 = negative side, bank
    X2 = positive side), shape (n_leaf_pairs,), or None when the beam has no MLC.
    """

    index: int
    cumulative_meterset_weight: float
    jaw_x_mm: tuple[float, float] = (-50.0, 50.0)
    jaw_y_mm: tuple[float, float] = (-50.0, 50.0)
    mlc_x1_mm: np.ndarray | None = None
    mlc_x2_mm: np.ndarray | None = None
    gantry_deg: float | None = None  # None = same as the beam's
    collimator_deg: float | None = None
    couch_deg: float | None = None


@dataclass
class Beam:
    number: int
    name: str
    gantry_deg: float
    collimator_deg: float
    couch_deg: float
    isocenter_lps_mm: np.ndarray
    control_points: list[ControlPoint]
    meterset_mu: float  # Beam Meterset in the fraction group (MU per fraction)
    energy_mv: float = 6.0
    sad_mm: float = 1000.0
    leaf_boundaries_mm: np.ndarray | None = None  # (n_leaf_pairs + 1,) along IEC Y at isocenter
    radiation_type: str = "PHOTON"
    beam_type: str = "STATIC"  # STATIC or DYNAMIC (step-and-shoot IMRT uses DYNAMIC)
    treatment_machine_name: str = "ADAPTIVE_6MV"
    final_cumulative_meterset_weight: float = 1.0
    description: str = ""

    def __post_init__(self):
        self.isocenter_lps_mm = np.asarray(self.isocenter_lps_mm, dtype=np.float64).reshape(3)

    def segments(self) -> list[tuple[ControlPoint, float]]:
        """(aperture control point, MU) pairs: the MU delivered between consecutive
        control points, through the aperture of the first of the two (step-and-shoot)."""
        out = []
        cps = self.control_points
        scale = self.meterset_mu / (self.final_cumulative_meterset_weight or 1.0)
        for a, b in itertools.pairwise(cps):
            mu = (b.cumulative_meterset_weight - a.cumulative_meterset_weight) * scale
            if mu > 0:
                out.append((a, mu))
        return out


@dataclass
class Prescription:
    dose_per_fraction_gy: float
    number_of_fractions: int
    target_roi_name: str = "PTV"

    @property
    def total_dose_gy(self) -> float:
        return self.dose_per_fraction_gy * self.number_of_fractions


@dataclass
class Plan:
    """An RT Plan. ``referenced_structure_set_uid`` and ``predecessor_plan_uid`` carry
    the DICOM references (RTPlanRelationship PREDECESSOR when this plan adapts another)."""

    label: str
    beams: list[Beam]
    frame_of_reference_uid: str
    prescription: Prescription | None = None
    name: str = ""
    sop_instance_uid: str = ""
    referenced_structure_set_uid: str = ""
    predecessor_plan_uid: str = ""
    plan_intent: str = "RESEARCH"
    fraction_group_number: int = 1
    patient_id: str = ""
    patient_name: str = ""
    study_instance_uid: str = ""
    extra: dict = field(default_factory=dict)  # provenance, metrics...

    @property
    def total_mu(self) -> float:
        return float(sum(b.meterset_mu for b in self.beams))
