"""Enumerated values of semantics-bearing DICOM attributes we write (no silent defaults: the
caller states what an object means by choosing a member)."""

from __future__ import annotations

from enum import StrEnum


class DoseSummationType(StrEnum):
    """Dose Summation Type (3004,000A) of the RT Dose module (PS3.3 C.8.8.3), Defined Terms:

    * PLAN: "dose calculated for entire delivery of all fraction groups of RT Plan";
    * MULTI_PLAN: "dose calculated for entire delivery of 2 or more RT Plans";
    * FRACTION: "dose calculated for entire delivery of a single Fraction Group within RT
      Plan" (all the fractions of that group);
    * BEAM: "dose calculated for entire delivery of one or more Beams within RT Plan";
    * BRACHY: the same for Brachy Application Setups;
    * FRACTION_SESSION: "dose calculated for a single session ("fraction") of a single
      Fraction Group within RT Plan";
    * BEAM_SESSION / BRACHY_SESSION: one session of one or more Beams / Application Setups;
    * CONTROL_POINT: "dose calculated for one or more Control Points within a Beam for a
      single fraction";
    * RECORD: "dose calculated for RT Beams Treatment Record".

    Readers (treatment planning and record-and-verify systems, dicompyler-core, plastimatch)
    take pixel value × Dose Grid Scaling as exactly that quantity: a PLAN dose of a 20-fraction
    plan holding one session's dose is read 20 times too low.
    """

    PLAN = "PLAN"
    MULTI_PLAN = "MULTI_PLAN"
    FRACTION = "FRACTION"
    BEAM = "BEAM"
    BRACHY = "BRACHY"
    FRACTION_SESSION = "FRACTION_SESSION"
    BEAM_SESSION = "BEAM_SESSION"
    BRACHY_SESSION = "BRACHY_SESSION"
    CONTROL_POINT = "CONTROL_POINT"
    RECORD = "RECORD"

    @property
    def needs_plan(self) -> bool:
        """Referenced RT Plan Sequence is required (Type 1C) for every type but RECORD."""
        return self is not DoseSummationType.RECORD

    @property
    def needs_fraction_group(self) -> bool:
        """Referenced Fraction Group Sequence is required (Type 1C) for these types."""
        return self in (DoseSummationType.FRACTION, DoseSummationType.BEAM,
                        DoseSummationType.BRACHY, DoseSummationType.FRACTION_SESSION,
                        DoseSummationType.BEAM_SESSION, DoseSummationType.BRACHY_SESSION,
                        DoseSummationType.CONTROL_POINT)

    @property
    def one_session(self) -> bool:
        """The dose of one delivery session (as opposed to the whole plan / fraction group)."""
        return self in (DoseSummationType.FRACTION_SESSION, DoseSummationType.BEAM_SESSION,
                        DoseSummationType.BRACHY_SESSION, DoseSummationType.CONTROL_POINT)


#: Summation types :func:`adaptive.dicom.rtdose.write_rtdose` writes (the beam-, brachy- and
#: control-point-level ones need per-beam references we do not produce).
WRITABLE_SUMMATION_TYPES = (DoseSummationType.PLAN, DoseSummationType.FRACTION,
                            DoseSummationType.FRACTION_SESSION, DoseSummationType.RECORD)
