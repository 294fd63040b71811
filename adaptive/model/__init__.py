"""Typed domain objects: patient/series identity, structures, plans."""

from adaptive.model.identity import PatientInfo, SeriesInfo
from adaptive.model.plan import Beam, ControlPoint, Plan, Prescription
from adaptive.model.structures import Roi, StructureSet

__all__ = ["Beam", "ControlPoint", "PatientInfo", "Plan", "Prescription", "Roi", "SeriesInfo",
           "StructureSet"]
