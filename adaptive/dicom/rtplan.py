"""RT Plan (photon, IEC 61217) write/read.

Angles in degrees (IEC 61217), isocenter in LPS mm, jaw/MLC positions in mm at the
isocenter plane (beam limiting device coordinates), meterset in MU. Bank X1 of an MLCX
are the first N Leaf/Jaw Positions, bank X2 the next N (DICOM order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from adaptive.dicom._common import (
    RT_PLAN_STORAGE,
    RT_STRUCT_STORAGE,
    ds_element,
    ds_floats,
    ds_list,
    ds_str,
    new_dataset,
    new_series,
    read_dataset,
    require,
    save_atomic,
    set_patient_study,
)
from adaptive.dicom.provenance import (
    Provenance,
    apply_provenance,
    dicom_date_time,
    new_uid,
    read_provenance,
)
from adaptive.errors import (
    DicomInputError,
    DicomWriteError,
    MissingTagError,
    StudyMismatchError,
    UnsupportedObjectError,
)
from adaptive.log import get_logger
from adaptive.model.identity import StudyIdentity
from adaptive.model.plan import Beam, ControlPoint, Plan, Prescription

log = get_logger(__name__)

PLAN_INTENTS = {"CURATIVE", "PALLIATIVE", "PROPHYLACTIC", "VERIFICATION", "MACHINE_QA", "RESEARCH",
                "SERVICE"}


def _device(kind: str, n: int, boundaries=None) -> Dataset:
    d = Dataset()
    d.RTBeamLimitingDeviceType = kind
    d.NumberOfLeafJawPairs = n
    if boundaries is not None:
        d.LeafPositionBoundaries = ds_list(boundaries)
    return d


def _position(kind: str, values) -> Dataset:
    d = Dataset()
    d.RTBeamLimitingDeviceType = kind
    d.add(ds_element("LeafJawPositions", values))
    return d


def _control_point(beam: Beam, cp: ControlPoint, idx: int, n_leaves: int) -> Dataset:
    c = Dataset()
    c.ControlPointIndex = idx
    c.CumulativeMetersetWeight = ds_str(cp.cumulative_meterset_weight)
    pos = [_position("ASYMX", cp.jaw_x_mm), _position("ASYMY", cp.jaw_y_mm)]
    if n_leaves:
        if cp.mlc_x1_mm is None or cp.mlc_x2_mm is None:
            if idx == 0:
                raise DicomWriteError(f"beam {beam.number} ({beam.name!r}) has an MLC but its first "
                                      f"control point has no leaf positions")
        else:
            x1 = np.asarray(cp.mlc_x1_mm, dtype=np.float64).reshape(-1)
            x2 = np.asarray(cp.mlc_x2_mm, dtype=np.float64).reshape(-1)
            if x1.size != n_leaves or x2.size != n_leaves:
                raise DicomWriteError(f"beam {beam.number} control point {idx}: {x1.size}/{x2.size} "
                                      f"leaf positions for {n_leaves} leaf pairs")
            if np.any(x1 > x2 + 1e-6):
                raise DicomWriteError(f"beam {beam.number} control point {idx}: bank X1 beyond bank X2")
            pos.append(_position("MLCX", np.concatenate([x1, x2])))
    if idx == 0:
        c.NominalBeamEnergy = ds_str(beam.energy_mv)
        c.GantryAngle = ds_str(beam.gantry_deg if cp.gantry_deg is None else cp.gantry_deg)
        c.GantryRotationDirection = "NONE"
        c.BeamLimitingDeviceAngle = ds_str(beam.collimator_deg if cp.collimator_deg is None
                                           else cp.collimator_deg)
        c.BeamLimitingDeviceRotationDirection = "NONE"
        c.PatientSupportAngle = ds_str(beam.couch_deg if cp.couch_deg is None else cp.couch_deg)
        c.PatientSupportRotationDirection = "NONE"
        c.TableTopEccentricAngle = "0"
        c.TableTopEccentricRotationDirection = "NONE"
        c.TableTopVerticalPosition = ""
        c.TableTopLongitudinalPosition = ""
        c.TableTopLateralPosition = ""
        c.IsocenterPosition = ds_list(beam.isocenter_lps_mm)
    else:
        if cp.gantry_deg is not None:
            c.GantryAngle = ds_str(cp.gantry_deg)
            c.GantryRotationDirection = "NONE"
        if cp.collimator_deg is not None:
            c.BeamLimitingDeviceAngle = ds_str(cp.collimator_deg)
            c.BeamLimitingDeviceRotationDirection = "NONE"
        if cp.couch_deg is not None:
            c.PatientSupportAngle = ds_str(cp.couch_deg)
            c.PatientSupportRotationDirection = "NONE"
    c.BeamLimitingDevicePositionSequence = Sequence(pos)
    return c


def write_rtplan(plan: Plan, path: str | Path, *, study: StudyIdentity,
                 provenance: Provenance | None = None) -> str:
    """Write ``plan`` as RT Plan Storage in ``study``; returns (and sets)
    ``plan.sop_instance_uid``.

    Patient and study attributes come from ``study``; a plan naming another patient
    (``plan.patient_id`` / ``patient_name`` when set) or another study
    (``plan.study_instance_uid`` when set) raises :class:`StudyMismatchError`.
    RT Plan Geometry is PATIENT when the plan references a structure set, else
    TREATMENT_DEVICE (the standard requires the structure set reference for PATIENT).
    The predecessor plan (if any) is referenced with RT Plan Relationship PREDECESSOR; the
    prescription (if any) becomes a TARGET dose reference (Target Prescription Dose = total
    Gy of this plan, i.e. of all its fractions, Dose Reference Description = target ROI
    name) and Number of Fractions Planned; the fraction group references that dose reference. ``plan.extra["fraction_group_description"]``, when set,
    becomes the Fraction Group Description (e.g. which course a one-session plan belongs to).
    Raises DicomWriteError for inconsistent content (no beams, MLC/leaf count mismatch,
    empty Frame of Reference, invalid intent). Atomic write.
    """
    path = Path(path)
    intent = _checked_intent(plan, study, path)
    sop_uid = plan.sop_instance_uid or new_uid()
    date, tm = dicom_date_time()

    ds = new_dataset(RT_PLAN_STORAGE, sop_uid)
    set_patient_study(ds, study)
    new_series(ds, "RTPLAN", plan.name or plan.label, date, tm)
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = plan.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.RTPlanLabel = plan.label[:16]
    if plan.name:
        ds.RTPlanName = plan.name[:64]
    ds.RTPlanDescription = ""
    ds.RTPlanDate, ds.RTPlanTime = date, tm
    ds.PlanIntent = intent
    _set_plan_references(ds, plan)

    rx = plan.prescription
    if rx is not None:
        _set_prescription(ds, rx)

    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = "HFS"
    ds.PatientSetupSequence = Sequence([setup])

    ds.FractionGroupSequence = Sequence([_fraction_group(plan)])

    ds.BeamSequence = Sequence([_beam_dataset(b, path) for b in plan.beams])
    ds.ApprovalStatus = "UNAPPROVED"
    apply_provenance(ds, provenance)
    save_atomic(ds, path)
    plan.sop_instance_uid = sop_uid
    log.debug("rtplan_written", path=str(path), beams=len(plan.beams), sop_uid=sop_uid)
    return sop_uid


def _checked_intent(plan: Plan, study: StudyIdentity, path: Path) -> str:
    """The plan's intent (upper case); raises :class:`DicomWriteError` for a plan that cannot
    be written and :class:`StudyMismatchError` for one naming another patient or study."""
    if not plan.beams:
        raise DicomWriteError(f"plan {plan.label!r} has no beams [{path}]")
    if not plan.frame_of_reference_uid:
        raise DicomWriteError(f"plan {plan.label!r} has no Frame of Reference UID [{path}]")
    intent = (plan.plan_intent or "RESEARCH").upper()
    if intent not in PLAN_INTENTS:
        raise DicomWriteError(f"plan intent {plan.plan_intent!r} not one of {sorted(PLAN_INTENTS)} [{path}]")
    numbers = [b.number for b in plan.beams]
    if len(set(numbers)) != len(numbers):
        raise DicomWriteError(f"duplicate beam numbers {numbers} [{path}]")
    if (plan.patient_id and plan.patient_id != study.patient.patient_id) or \
            (plan.patient_name and plan.patient_name != study.patient.patient_name):
        raise StudyMismatchError(f"plan {plan.label!r} is for patient {plan.patient_id!r} "
                                 f"({plan.patient_name!r}), the study's patient is "
                                 f"{study.patient.patient_id!r} ({study.patient.patient_name!r}) "
                                 f"[{path}]")
    if plan.study_instance_uid and plan.study_instance_uid != study.study_instance_uid:
        raise StudyMismatchError(f"plan {plan.label!r} names study {plan.study_instance_uid}, "
                                 f"written into study {study.study_instance_uid} [{path}]")
    return intent


def _set_plan_references(ds: Dataset, plan: Plan) -> None:
    """RT Plan Geometry with the structure set it references (PATIENT) or none
    (TREATMENT_DEVICE), and the predecessor plan (RT Plan Relationship PREDECESSOR)."""
    if plan.referenced_structure_set_uid:
        ds.RTPlanGeometry = "PATIENT"
        r = Dataset()
        r.ReferencedSOPClassUID = RT_STRUCT_STORAGE
        r.ReferencedSOPInstanceUID = plan.referenced_structure_set_uid
        ds.ReferencedStructureSetSequence = Sequence([r])
    else:
        ds.RTPlanGeometry = "TREATMENT_DEVICE"
    if plan.predecessor_plan_uid:
        r = Dataset()
        r.ReferencedSOPClassUID = RT_PLAN_STORAGE
        r.ReferencedSOPInstanceUID = plan.predecessor_plan_uid
        r.RTPlanRelationship = "PREDECESSOR"
        ds.ReferencedRTPlanSequence = Sequence([r])


def _set_prescription(ds: Dataset, rx: Prescription) -> None:
    """Prescription Description and one TARGET dose reference (Target Prescription Dose = total
    Gy of the plan, Dose Reference Description = target ROI name)."""
    n = int(rx.number_of_fractions)
    ds.PrescriptionDescription = (f"{rx.target_roi_name}: {rx.total_dose_gy:g} Gy in "
                                  f"{n} fraction{'s' if n != 1 else ''}")
    dr = Dataset()
    dr.DoseReferenceNumber = 1
    dr.DoseReferenceUID = new_uid()
    dr.DoseReferenceStructureType = "SITE"
    dr.DoseReferenceDescription = rx.target_roi_name[:64]
    dr.DoseReferenceType = "TARGET"
    dr.TargetPrescriptionDose = ds_str(rx.total_dose_gy)
    ds.DoseReferenceSequence = Sequence([dr])


def _fraction_group(plan: Plan) -> Dataset:
    """The plan's one fraction group: fractions planned, the dose reference, each beam's
    meterset (MU)."""
    rx = plan.prescription
    fg = Dataset()
    fg.FractionGroupNumber = int(plan.fraction_group_number)
    if plan.extra.get("fraction_group_description"):
        fg.FractionGroupDescription = str(plan.extra["fraction_group_description"])[:64]
    if rx is not None:
        rdr = Dataset()
        rdr.ReferencedDoseReferenceNumber = 1
        fg.ReferencedDoseReferenceSequence = Sequence([rdr])
    fg.NumberOfFractionsPlanned = int(rx.number_of_fractions) if rx is not None else ""
    fg.NumberOfBeams = len(plan.beams)
    fg.NumberOfBrachyApplicationSetups = 0
    refs = []
    for b in plan.beams:
        rb = Dataset()
        rb.ReferencedBeamNumber = int(b.number)
        rb.BeamMeterset = ds_str(b.meterset_mu)
        refs.append(rb)
    fg.ReferencedBeamSequence = Sequence(refs)
    return fg


def _beam_dataset(b: Beam, path: Path) -> Dataset:
    """One Beam Sequence item: beam limiting devices (jaws, MLCX leaf boundaries in mm) and
    its control points; raises :class:`DicomWriteError` for fewer than 2 control points or
    leaf boundaries that do not increase."""
    if len(b.control_points) < 2:
        raise DicomWriteError(f"beam {b.number} ({b.name!r}) has {len(b.control_points)} control "
                              f"point(s); at least 2 are needed [{path}]")
    bi = Dataset()
    bi.BeamNumber = int(b.number)
    bi.BeamName = b.name[:64]
    if b.description:
        bi.BeamDescription = b.description
    bi.BeamType = b.beam_type
    bi.RadiationType = b.radiation_type
    bi.PrimaryDosimeterUnit = "MU"
    bi.TreatmentMachineName = b.treatment_machine_name[:16]
    bi.SourceAxisDistance = ds_str(b.sad_mm)
    devices = [_device("ASYMX", 1), _device("ASYMY", 1)]
    n_leaves = 0
    if b.leaf_boundaries_mm is not None:
        lb = np.asarray(b.leaf_boundaries_mm, dtype=np.float64).reshape(-1)
        if lb.size < 2 or np.any(np.diff(lb) <= 0):
            raise DicomWriteError(f"beam {b.number}: leaf boundaries must increase [{path}]")
        n_leaves = lb.size - 1
        devices.append(_device("MLCX", n_leaves, lb))
    bi.BeamLimitingDeviceSequence = Sequence(devices)
    bi.TreatmentDeliveryType = "TREATMENT"
    bi.NumberOfWedges = 0
    bi.NumberOfCompensators = 0
    bi.NumberOfBoli = 0
    bi.NumberOfBlocks = 0
    bi.FinalCumulativeMetersetWeight = ds_str(b.final_cumulative_meterset_weight)
    bi.NumberOfControlPoints = len(b.control_points)
    bi.ControlPointSequence = Sequence([_control_point(b, cp, i, n_leaves)
                                        for i, cp in enumerate(b.control_points)])
    bi.ReferencedPatientSetupNumber = 1
    return bi


def _floats(value) -> np.ndarray:
    if value is None or value == "":
        return np.zeros(0)
    if not isinstance(value, (list, tuple)) and not hasattr(value, "__iter__"):
        value = [value]
    return np.asarray([float(v) for v in value], dtype=np.float64)


def read_rtplan(path: str | Path) -> Plan:
    """Read an RT Plan (beams, control points, fraction-group MU, references, prescription).

    Control-point attributes absent from later control points carry over from earlier ones
    (as the standard specifies) for jaws and MLC; per-CP gantry/collimator/couch angles are
    set only where present (None = the beam's). Jaws default to X/ASYMX and Y/ASYMY; only
    MLCX leaves are read. The provenance record, if any, is put in ``plan.extra["provenance"]``.
    Raises MissingTagError (naming the file and beam) for missing required content.
    """
    path = Path(path)
    ds = read_dataset(path)
    if str(ds.get("SOPClassUID", "")) != RT_PLAN_STORAGE:
        raise UnsupportedObjectError(f"not an RT Plan (SOP class {ds.get('SOPClassUID', '?')})", path)
    label = str(require(ds, "RTPlanLabel", path))
    fgs = ds.get("FractionGroupSequence") or []
    fg = fgs[0] if fgs else None
    meterset, n_fx = _fraction_group_mu(fg)
    beams = [_read_beam(bi, meterset, path) for bi in require(ds, "BeamSequence", path)]
    ss_uid, pred = _read_plan_references(ds)
    extra = {}
    prov = read_provenance(ds)
    if prov is not None:
        extra["provenance"] = prov
    return Plan(
        label=label,
        beams=beams,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        prescription=_read_prescription(ds, n_fx),
        name=str(ds.get("RTPlanName", "") or ""),
        sop_instance_uid=str(require(ds, "SOPInstanceUID", path)),
        referenced_structure_set_uid=ss_uid,
        predecessor_plan_uid=pred,
        plan_intent=str(ds.get("PlanIntent", "") or ""),
        fraction_group_number=int(fg.get("FractionGroupNumber", 1)) if fg is not None else 1,
        patient_id=str(ds.get("PatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        extra=extra,
    )


def _fraction_group_mu(fg: Dataset | None) -> tuple[dict[int, float], int | None]:
    """(beam number -> Beam Meterset in MU, Number of Fractions Planned) of a fraction group."""
    meterset: dict[int, float] = {}
    n_fx = None
    if fg is not None:
        for rb in fg.get("ReferencedBeamSequence") or []:
            if "BeamMeterset" in rb and rb.BeamMeterset not in (None, ""):
                meterset[int(rb.ReferencedBeamNumber)] = float(rb.BeamMeterset)
        if fg.get("NumberOfFractionsPlanned") not in (None, ""):
            n_fx = int(fg.NumberOfFractionsPlanned)
    return meterset, n_fx


def _read_beam(bi: Dataset, meterset: dict[int, float], path: Path) -> Beam:
    """One Beam Sequence item: beam-level angles (deg) and isocenter (LPS mm) from its first
    control point, MLCX leaf boundaries (mm), control points and its meterset (MU)."""
    num = int(require(bi, "BeamNumber", path, "BeamSequence item"))
    ctx = f"beam {num}"
    leaf_bounds = None
    for dev in require(bi, "BeamLimitingDeviceSequence", path, ctx):
        if str(dev.get("RTBeamLimitingDeviceType", "")) == "MLCX":
            leaf_bounds = _floats(require(dev, "LeafPositionBoundaries", path, ctx + " MLCX"))
    n_leaves = 0 if leaf_bounds is None else leaf_bounds.size - 1
    cps_ds = require(bi, "ControlPointSequence", path, ctx)
    first = cps_ds[0]
    for kw in ("GantryAngle", "BeamLimitingDeviceAngle", "PatientSupportAngle", "IsocenterPosition"):
        if first.get(kw) in (None, ""):
            raise MissingTagError(kw, path, f"{ctx} first control point")
    cps = _read_control_points(cps_ds, n_leaves, ctx, path)
    energy = first.get("NominalBeamEnergy")
    final_w = bi.get("FinalCumulativeMetersetWeight")
    beam = Beam(
        number=num,
        name=str(bi.get("BeamName", "") or ""),
        gantry_deg=float(first.GantryAngle),
        collimator_deg=float(first.BeamLimitingDeviceAngle),
        couch_deg=float(first.PatientSupportAngle),
        isocenter_lps_mm=_floats(first.IsocenterPosition),
        control_points=cps,
        meterset_mu=meterset.get(num, 0.0),
        energy_mv=float(energy) if energy not in (None, "") else 6.0,
        sad_mm=float(bi.get("SourceAxisDistance", 1000.0) or 1000.0),
        leaf_boundaries_mm=leaf_bounds,
        radiation_type=str(bi.get("RadiationType", "") or "PHOTON"),
        beam_type=str(require(bi, "BeamType", path, ctx)),
        treatment_machine_name=str(bi.get("TreatmentMachineName", "") or ""),
        final_cumulative_meterset_weight=float(final_w) if final_w not in (None, "") else 1.0,
        description=str(bi.get("BeamDescription", "") or ""),
    )
    if num not in meterset:
        log.warning("beam_without_meterset", beam=num, path=str(path))
    return beam


def _read_control_points(cps_ds, n_leaves: int, ctx: str, path: Path) -> list[ControlPoint]:
    """Control points with jaws and MLCX positions (mm, IEC beam-limiting-device frame)
    carried over from earlier control points where absent; angles (deg) only where present
    after the first."""
    jx, jy = (-50.0, 50.0), (-50.0, 50.0)
    mlc1 = mlc2 = None
    cps = []
    for idx, c in enumerate(cps_ds):
        for pos in c.get("BeamLimitingDevicePositionSequence") or []:
            kind = str(pos.get("RTBeamLimitingDeviceType", ""))
            vals = ds_floats(pos, "LeafJawPositions", path, f"{ctx} CP {idx} {kind}")
            if kind in ("ASYMX", "X"):
                jx = (float(vals[0]), float(vals[1]))
            elif kind in ("ASYMY", "Y"):
                jy = (float(vals[0]), float(vals[1]))
            elif kind == "MLCX":
                if vals.size != 2 * n_leaves:
                    raise DicomInputError(f"{ctx} CP {idx}: {vals.size} MLCX positions for "
                                          f"{n_leaves} leaf pairs", path)
                mlc1, mlc2 = vals[:n_leaves].copy(), vals[n_leaves:].copy()
        if n_leaves and mlc1 is None:
            raise MissingTagError("LeafJawPositions", path, f"{ctx} CP {idx} MLCX")
        w = c.get("CumulativeMetersetWeight")
        cps.append(ControlPoint(
            index=int(c.get("ControlPointIndex", idx)),
            cumulative_meterset_weight=float(w) if w not in (None, "") else 0.0,
            jaw_x_mm=jx, jaw_y_mm=jy,
            mlc_x1_mm=None if mlc1 is None else mlc1.copy(),
            mlc_x2_mm=None if mlc2 is None else mlc2.copy(),
            gantry_deg=float(c.GantryAngle) if idx > 0 and c.get("GantryAngle") not in (None, "") else None,
            collimator_deg=(float(c.BeamLimitingDeviceAngle) if idx > 0 and
                            c.get("BeamLimitingDeviceAngle") not in (None, "") else None),
            couch_deg=(float(c.PatientSupportAngle) if idx > 0 and
                       c.get("PatientSupportAngle") not in (None, "") else None),
        ))
    return cps


def _read_prescription(ds: Dataset, n_fx: int | None) -> Prescription | None:
    """The first TARGET dose reference with a Target Prescription Dose (total Gy) as a
    prescription over ``n_fx`` fractions (1 when not planned)."""
    for dr in ds.get("DoseReferenceSequence") or []:
        if str(dr.get("DoseReferenceType", "")) == "TARGET" and dr.get("TargetPrescriptionDose") not in (None, ""):
            total = float(dr.TargetPrescriptionDose)
            n = n_fx or 1
            return Prescription(dose_per_fraction_gy=total / n, number_of_fractions=n,
                                target_roi_name=str(dr.get("DoseReferenceDescription", "") or "PTV"))
    return None


def _read_plan_references(ds: Dataset) -> tuple[str, str]:
    """(referenced structure set SOP Instance UID, PREDECESSOR plan SOP Instance UID); "" when
    absent."""
    ss_uid = ""
    for r in ds.get("ReferencedStructureSetSequence") or []:
        ss_uid = str(r.get("ReferencedSOPInstanceUID", "") or "")
    pred = ""
    for r in ds.get("ReferencedRTPlanSequence") or []:
        if str(r.get("RTPlanRelationship", "")) == "PREDECESSOR":
            pred = str(r.get("ReferencedSOPInstanceUID", "") or "")
    return ss_uid, pred
