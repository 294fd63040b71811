"""Planning and re-planning of one CT + structure set: the stages and :func:`plan_case`.

Stages (each a function; times in seconds recorded in ``timings_s``):

``stage_masks`` → ``stage_beams`` → ``stage_dij`` → ``stage_optimize`` → ``stage_sequence``
→ ``stage_deliverable_dose`` → ``stage_checks`` → ``write_plan_outputs``; :func:`plan_case`
runs them for one CT + structure set (from scratch or warm-started from a reference plan);
:mod:`adaptive.pipeline.fraction` adds registration, synthetic CT, contour propagation and
the scheduled-vs-adapted comparison for one fraction (``run_fraction``, service stages).

Doses per fraction in Gy, MU per fraction, LPS mm.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import adaptive.optimization.kernels  # noqa: F401  (sets OMP_WAIT_POLICY before numba runs)
from adaptive.dicom.ct_series import read_ct_series
from adaptive.dicom.enums import DoseSummationType
from adaptive.dicom.provenance import Provenance
from adaptive.dicom.rtdose import write_rtdose
from adaptive.dicom.rtplan import read_rtplan, write_rtplan
from adaptive.dicom.rtstruct import read_rtstruct
from adaptive.dicom.study import new_study
from adaptive.dose import depth_cache as dc
from adaptive.dose.beam_model import BeamModel, load_beam_model
from adaptive.dose.dij import compute_dij
from adaptive.dose.dose_grid import make_dose_grid, mask_on_grid
from adaptive.dose.influence import DoseInfluence
from adaptive.dose.plan_dose import plan_dose
from adaptive.errors import OptimizationError
from adaptive.geometry.volume import Grid, Volume
from adaptive.log import get_logger
from adaptive.model.identity import PatientInfo, SeriesInfo, StudyIdentity
from adaptive.model.plan import Beam, Plan
from adaptive.model.structures import StructureSet
from adaptive.optimization.checks import PlanCheckReport, check_plan, require_passed
from adaptive.optimization.fluence import (
    FluenceResult,
    fluence_from_plan,
    optimize_fluence_goals,
)
from adaptive.optimization.goals import ClinicalGoals, GoalResult, evaluate_goals, load_goals
from adaptive.optimization.normalize import normalization_factor
from adaptive.optimization.objective import Objective
from adaptive.optimization.plan_builder import build_plan, equispaced_beams, templates_from_plan
from adaptive.optimization.sequencing import (
    MinimumMuReport,
    MlcGeometry,
    SequencingSettings,
    enforce_minimum_mu,
    optimize_segment_weights,
    segment_beamlet_matrix,
    sequence_plan_beams,
)

log = get_logger("adaptive.pipeline")


@dataclass
class PlanSettings:
    """``deadline_s``: fluence optimisation budget (s); ``smoothness``: fluence regulariser λ;
    ``dose_grid_spacing_mm``, ``bixel_size_mm``: Dij resolution; ``n_beams``: beams of a
    plan from scratch; ``correction_rounds``: segment-weight re-optimisations with the
    plan-dose correction (each costs one more plan-dose calculation); ``ftol``: relative
    objective decrease at which L-BFGS-B stops, in every (warm-started) round of the goal
    re-weighting loop — the loop is the outer iteration, so solving each round's weighted
    problem tightly is wasted work (C-shape, measured: ftol 1e-3 6 s and core D10 14 Gy,
    1e-5 27 s and 21 Gy; segment weights, a small dense problem, keep their own tighter
    ftol); ``goal_rounds``: maximum rounds of the
    automatic goal re-weighting loop (fluence, and segment weights after the dose correction;
    1 = no re-weighting); ``normalize``: scale the optimised fluence and
    the deliverable plan's MU so that the target's prescription goal (e.g. PTV D95 = Rx) is
    met exactly (:mod:`adaptive.optimization.normalize`), as clinical TPSs do."""

    deadline_s: float | None = None
    max_iter: int = 400
    smoothness: float = 0.2
    dose_grid_spacing_mm: float = 3.0
    bixel_size_mm: float = 5.0
    n_beams: int = 9
    correction_rounds: int = 1
    ftol: float = 1e-3
    goal_rounds: int = 6
    normalize: bool = True


@dataclass
class PlanResult:
    plan: Plan
    dose: Volume  # deliverable dose (plan-dose engine), Gy per fraction
    fluence_dose: Volume  # Dij dose of the optimised fluence, Gy per fraction
    fluence: FluenceResult
    goals_fluence: list[GoalResult]
    goals_deliverable: list[GoalResult]
    checks: PlanCheckReport
    masks: dict
    dij: DoseInfluence
    timings_s: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def report(self) -> dict:
        return {"timings_s": self.timings_s, "info": self.info,
                "fluence": {"iterations": self.fluence.iterations,
                            "reweighting_rounds": self.fluence.rounds,
                            "objective": self.fluence.objective_value,
                            "stopped_early": self.fluence.stopped_early,
                            "reason": self.fluence.reason, "time_s": self.fluence.time_s},
                "goals_fluence": [g.to_dict() for g in self.goals_fluence],
                "goals_deliverable": [g.to_dict() for g in self.goals_deliverable],
                "degradation_total_gy": {f"{a.structure} {a.metric}": b.value_total - a.value_total
                                         for a, b in zip(self.goals_fluence, self.goals_deliverable)},
                "checks": self.checks.to_dict(),
                "plan": {"label": self.plan.label, "sop_instance_uid": self.plan.sop_instance_uid,
                         "predecessor_plan_uid": self.plan.predecessor_plan_uid,
                         "total_mu": self.plan.total_mu,
                         "beams": [{"name": b.name, "gantry_deg": b.gantry_deg,
                                    "mu": b.meterset_mu, "segments": len(b.segments())}
                                   for b in self.plan.beams]}}


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.t, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.t[self.name] = round(time.perf_counter() - self.t0, 3)
        log.info("stage_done", stage=self.name, seconds=self.t[self.name])


def stage_masks(ct: Volume, ss: StructureSet, goals: ClinicalGoals, spacing_mm: float
                ) -> tuple[dict, dict]:
    """ROI masks needed by the goals on the CT grid and on the dose grid."""
    density_grid = ct.grid
    dgrid = make_dose_grid(ct, spacing_mm)
    ct_masks, dose_masks = {}, {}
    for name in goals.structures:
        if name not in ss:
            raise OptimizationError(f"structure set has no ROI {name!r} required by the goals "
                                    f"{goals.source} (has {ss.names()})")
        m = ss.mask(name, density_grid)
        ct_masks[name] = m
        dose_masks[name] = mask_on_grid(m, density_grid, dgrid, name)
    return ct_masks, dose_masks


def stage_beams(ct_masks: dict, ct: Volume, goals: ClinicalGoals, n_beams: int,
                reference: Plan | None, bm: BeamModel) -> list[Beam]:
    if reference is not None:
        return templates_from_plan(reference)
    t = ct_masks[goals.prescription.target_roi_name]
    if not t.any():
        raise OptimizationError("target mask is empty")
    iso = ct.grid.voxel_centers_lps()[t].mean(axis=0)
    return equispaced_beams(np.round(iso, 1), n_beams, sad_mm=bm.sad_mm, machine=bm.name)


def stage_dij(density: Volume, beams: list[Beam], ct_masks: dict, goals: ClinicalGoals,
              bm: BeamModel, s: PlanSettings, depth_cache: dict | None = None
              ) -> DoseInfluence:
    """The Dij of ``beams`` on ``density``; its exact radiological depths go into
    ``depth_cache`` for the plan-dose calculations on the same CT."""
    body = ct_masks.get("BODY")
    return compute_dij(density, beams, ct_masks[goals.prescription.target_roi_name], body,
                       beam_model=bm, bixel_size_mm=s.bixel_size_mm,
                       dose_grid_spacing_mm=s.dose_grid_spacing_mm, depth_cache=depth_cache)


def plan_case(ct: Volume, series: SeriesInfo, ss: StructureSet, goals: ClinicalGoals, *,
              reference: Plan | None = None, settings: PlanSettings | None = None,
              beam_model: BeamModel | None = None, label: str = "ADAPTIVE",
              dij: DoseInfluence | None = None, depth_cache: dict | None = None
              ) -> PlanResult:
    """Optimise, sequence, recalculate and check a plan on ``ct`` (HU) with ``ss``.

    ``dij``: a dose-influence matrix already computed for this CT, these beams and settings
    (benchmarks re-use one); default: computed here.

    ``reference``: the scheduled plan — its beam geometry is kept, its segments give the
    warm-start fluence, and the new plan references it as PREDECESSOR.

    ``depth_cache``: a dict shared by every plan-dose calculation on this CT (radiological
    depths per beam direction are traced once; see :func:`adaptive.dose.plan_dose.plan_dose`);
    pass the same dict to later calculations on the same CT (e.g. the scheduled plan's
    recalculation) to reuse it. Default: a cache local to this call.
    """
    if depth_cache is None:
        depth_cache = {}
    s = settings or PlanSettings()
    bm = beam_model or load_beam_model()
    mlc = MlcGeometry.from_beam_model(bm)
    seq_settings = SequencingSettings.load()
    T: dict[str, float] = {}
    info: dict = {}
    with _Timer(T, "density_masks"):
        density = dc.density_of(depth_cache, ct)   # the plan-dose calls below reuse it
        ct_masks, masks = stage_masks(ct, ss, goals, s.dose_grid_spacing_mm)
    with _Timer(T, "dij"):
        templates = stage_beams(ct_masks, ct, goals, s.n_beams, reference, bm)
        if dij is None:
            dij = stage_dij(density, templates, ct_masks, goals, bm, s, depth_cache)
    info["dij"] = {"voxels": dij.n_voxels, "beamlets": dij.n_beamlets, "nnz": dij.nnz,
                   "mbytes": round(dij.nbytes / 2**20, 1)}
    with _Timer(T, "objective_setup"):
        obj = Objective(dij, masks, goals, smoothness=s.smoothness)
        w0 = fluence_from_plan(reference, dij) if reference is not None else None
    info["objective_rows"] = int(obj.rows_used.size)
    info["subsampled"] = obj.subsampled
    with _Timer(T, "fluence_optimization"):
        fr = optimize_fluence_goals(dij, obj, w0=w0, deadline_s=s.deadline_s,
                                    max_iter=s.max_iter, ftol=s.ftol, max_rounds=s.goal_rounds)
    info["reweighting_fluence"] = fr.rounds
    fluence_dose = dij.dose_volume(fr.weights_mu)
    target = goals.prescription.target_roi_name
    if s.normalize:
        nf = normalization_factor(fluence_dose, masks[target], goals)
        fr.weights_mu = fr.weights_mu * nf.factor
        fluence_dose = Volume(fluence_dose.array * np.float32(nf.factor), fluence_dose.grid, "Gy")
        info["normalization_fluence"] = nf.to_dict()
    goals_fluence = evaluate_goals(fluence_dose, masks, goals)
    with _Timer(T, "sequencing"):
        seq = sequence_plan_beams(dij, fr.weights_mu, templates, mlc, seq_settings)
        info["segments_raw"] = [sb.n_segments_raw for sb in seq]
        info["intensity_levels"] = [sb.n_levels for sb in seq]
        seq = optimize_segment_weights(dij, obj, seq, mlc, seq_settings)
    common = {"prescription": goals.prescription,
              "frame_of_reference_uid": series.frame_of_reference_uid, "label": label,
              "referenced_structure_set_uid": ss.sop_instance_uid,
              "predecessor_plan_uid": reference.sop_instance_uid if reference else "",
              "patient_id": series.patient.patient_id,
              "patient_name": series.patient.patient_name,
              "study_instance_uid": series.study_instance_uid}
    plan = build_plan(seq, templates, mlc, **common)
    with _Timer(T, "deliverable_dose"):
        dose = plan_dose(ct, plan, beam_model=bm, dose_grid_spacing_mm=s.dose_grid_spacing_mm,
                         depth_cache=depth_cache)
    for k in range(s.correction_rounds):
        with _Timer(T, f"dose_correction_{k + 1}"):
            seq = _corrected_segments(dij, obj, seq, dose, mlc, seq_settings, s.goal_rounds,
                                      info, k + 1)
            plan = build_plan(seq, templates, mlc, **common)
            dose = plan_dose(ct, plan, beam_model=bm, dose_grid_spacing_mm=s.dose_grid_spacing_mm,
                             depth_cache=depth_cache)
    if s.normalize:
        with _Timer(T, "normalization"):
            dose, mm = _normalized_segments(seq, dose, masks[target], goals, seq_settings, info)
            plan = build_plan(seq, templates, mlc, **common)
        if mm.changed:
            with _Timer(T, "minimum_mu_dose"):
                dose = plan_dose(ct, plan, beam_model=bm,
                                 dose_grid_spacing_mm=s.dose_grid_spacing_mm,
                                 depth_cache=depth_cache)
    with _Timer(T, "checks"):
        # independent recalculation: the plan as read back from DICOM, finer fluence raster
        indep = _independent_dose(ct, plan, bm, s, depth_cache)
        checks = check_plan(plan, dose, indep, masks, goals, mlc, seq_settings)
    return PlanResult(plan=plan, dose=dose, fluence_dose=fluence_dose, fluence=fr,
                      goals_fluence=goals_fluence, goals_deliverable=checks.goal_results,
                      checks=checks, masks=masks, dij=dij, timings_s=T, info=info)


def _corrected_segments(dij: DoseInfluence, obj: Objective, seq: list, dose: Volume,
                        mlc: MlcGeometry, seq_settings: SequencingSettings, goal_rounds: int,
                        info: dict, k: int) -> list:
    """Correction round ``k``: the objective corrected by the difference between the
    deliverable dose (Gy) and the Dij's estimate of it, the segment weights re-optimised on
    it; records the correction and the re-weighting rounds in ``info``."""
    a = segment_beamlet_matrix(dij, seq, mlc)
    m = np.array([sg.mu for sb in seq for sg in sb.segments])
    dij_d = np.asarray(dij.matrix @ (a @ m).astype(np.float32), dtype=np.float64)
    true_d = dose.array.ravel()[dij.voxel_indices]
    info[f"correction_{k}"] = obj.set_dose_correction(dij_d, true_d)
    rw: list = []
    seq = optimize_segment_weights(dij, obj, seq, mlc, seq_settings,
                                   goal_rounds=goal_rounds, rounds_out=rw)
    info[f"reweighting_segments_{k}"] = [r.to_dict() for r in rw]
    obj.clear_dose_correction()
    return seq


def _normalized_segments(seq: list, dose: Volume, target_mask, goals: ClinicalGoals,
                         seq_settings: SequencingSettings, info: dict
                         ) -> tuple[Volume, MinimumMuReport]:
    """Scale every segment's MU (in place) so the deliverable dose meets the prescription;
    returns (the scaled dose (Gy), the minimum-MU enforcement result)."""
    nf = normalization_factor(dose, target_mask, goals)
    for sb in seq:
        for sg in sb.segments:
            sg.mu *= nf.factor
    dose = Volume(dose.array * np.float32(nf.factor), dose.grid, dose.units)  # dose ∝ MU
    info["normalization_deliverable"] = nf.to_dict()
    # a factor < 1 can push a segment below the machine's minimum MU: raise it to the
    # minimum (or drop a tiny one) and recompute the dose of the plan as delivered
    mm = enforce_minimum_mu(seq, seq_settings.min_mu_per_segment)
    info["minimum_mu_after_normalization"] = mm.to_dict(seq_settings.min_mu_per_segment)
    return dose, mm


def _independent_dose(ct: Volume, plan: Plan, bm: BeamModel, s: PlanSettings,
                      depth_cache: dict | None = None) -> Volume:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "RP.dcm"
        write_rtplan(_copy_plan(plan), p, study=_plan_study(plan))
        back = read_rtplan(p)
    return plan_dose(ct, back, beam_model=bm, dose_grid_spacing_mm=s.dose_grid_spacing_mm,
                     depth_cache=depth_cache,
                     fluence_resolution_mm=0.5 * bm.fluence_resolution_mm)


def _plan_study(plan: Plan) -> StudyIdentity:
    """The study a plan names (a new one when it names none)."""
    patient = PatientInfo(plan.patient_id, plan.patient_name)
    if plan.study_instance_uid:
        return StudyIdentity(patient, plan.study_instance_uid)
    return new_study(patient)


def _copy_plan(plan: Plan) -> Plan:
    c = copy.copy(plan)
    c.sop_instance_uid = ""
    return c


def write_plan_outputs(result: PlanResult, series: SeriesInfo, out_dir: str | Path, *,
                       study: StudyIdentity, image_grid: Grid, summation: DoseSummationType,
                       input_uids: dict, parameters: dict, extra_report: dict | None = None
                       ) -> dict:
    """Write OUT/RP.dcm, OUT/RD.dcm and OUT/plan_report.json (only when the checks passed:
    raises :class:`PlanCheckError` otherwise, after writing the report).

    ``series`` / ``image_grid``: the image the dose was computed on; ``study``: the study the
    objects belong to; ``summation``: what ``result.dose`` holds for ``result.plan`` (e.g.
    FRACTION_SESSION for one session of a multi-fraction plan, PLAN for a one-session plan)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = result.report()
    report.update(extra_report or {})
    report["input_uids"] = input_uids
    report["parameters"] = parameters
    if not result.checks.passed:
        report["written"] = []
        (out / "plan_report.json").write_text(json.dumps(report, indent=2, default=float))
        require_passed(result.checks)
    prov = Provenance(input_uids=input_uids, parameters=parameters, timings_s=result.timings_s,
                      description="adaptive plan optimisation")
    rp = write_rtplan(result.plan, out / "RP.dcm", study=study, provenance=prov)
    rd = write_rtdose(result.dose, out / "RD.dcm", summation=summation, plan=result.plan,
                      series=series, image_grid=image_grid, study=study, provenance=prov)
    report["rtdose_summation"] = summation.value
    report["plan"]["sop_instance_uid"] = rp
    report["rtdose_uid"] = rd
    report["written"] = ["RP.dcm", "RD.dcm", "plan_report.json"]
    (out / "plan_report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


# --- the replay chain for one archived fraction ---------------------------------------------


def make_scheduled_plan(case_dir: str | Path, goals_path: str | Path, *,
                        settings: PlanSettings | None = None) -> dict:
    """Plan a replay case from scratch on its planning CT (``planning/CT``,
    ``planning/RS.dcm``) and write the scheduled plan ``planning/RP.dcm`` + ``planning/RD.dcm``
    (+ plan_report.json). Meant to be called at the end of the replay-data build."""
    case = Path(case_dir)
    goals = load_goals(goals_path)
    ct, series = read_ct_series(case / "planning" / "CT")
    ss = read_rtstruct(case / "planning" / "RS.dcm", series=series, grid=ct.grid)
    res = plan_case(ct, series, ss, goals, settings=settings, label="SCHEDULED")
    # the scheduled plan has the course's fractions; its dose is one session's
    return write_plan_outputs(res, series, case / "planning", study=series.study,
                              image_grid=ct.grid, summation=DoseSummationType.FRACTION_SESSION,
                              input_uids={"ct_series": series.series_instance_uid,
                                          "rtstruct": ss.sop_instance_uid},
                              parameters={"goals_file": str(goals_path)})


def moved_plan(plan: Plan, m: np.ndarray, frame_uid: str) -> Plan:
    """Copy of ``plan`` with isocenters mapped by the 4×4 ``m`` (LPS mm) into another frame;
    keeps the SOP Instance UID so the adapted plan references it as PREDECESSOR."""
    p = copy.deepcopy(plan)
    for b in p.beams:
        b.isocenter_lps_mm = (m @ np.append(b.isocenter_lps_mm, 1.0))[:3]
    p.frame_of_reference_uid = frame_uid
    return p
