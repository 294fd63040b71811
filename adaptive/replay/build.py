"""Build replay cases (DICOM + ground truth + manifest) from the phantoms, deterministically.

For the pelvis case: ``planning/CT`` + ``planning/RS.dcm`` and, per fraction,
``fxNN/CBCT`` (own Frame of Reference, origin = treatment isocenter = planning PTV centroid),
``fxNN/truth/dvf.mha``, ``fxNN/truth/RS.dcm`` (truth structures on the CBCT) and
``fxNN/truth/truth.json``; then (``scheduled_plan=True``, the default for the pelvis case)
the scheduled plan ``planning/RP.dcm`` + ``planning/RD.dcm`` + ``plan_report.json``, planned
from scratch on the planning CT with ``config/goals/prostate.toml``
(:func:`adaptive.pipeline.planning.make_scheduled_plan`, ~1.5 min on 2 cores). TG-119 cases:
planning only (no plan; the manifest names where it would go).

Same seed → identical voxel arrays, masks, DVFs and UIDs (UIDs are derived from the case
name, seed and role; only DICOM creation dates/times differ between builds).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import tomllib
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydicom.uid import generate_uid

import adaptive
from adaptive.config import CONFIG_MODEL, Float, Int, config_path, load_config
from adaptive.dicom import Provenance, write_ct_series, write_rtstruct
from adaptive.dicom.provenance import UID_PREFIX
from adaptive.errors import ConfigError
from adaptive.geometry.dvf_io import write_dvf
from adaptive.geometry.volume import Volume
from adaptive.log import get_logger
from adaptive.model.identity import PatientInfo, SeriesInfo
from adaptive.model.plan import Prescription
from adaptive.model.structures import Roi, StructureSet
from adaptive.optimization.goals import load_goals
from adaptive.phantoms.cbct import CbctGeometry, simulate_fraction
from adaptive.phantoms.deformation import DailyVariation
from adaptive.phantoms.pelvis import (
    PelvisAnatomy,
    default_planning_grid,
    isocenter_from_ptv,
    pelvis_phantom,
)
from adaptive.phantoms.phantom import Phantom
from adaptive.phantoms.tg119 import tg119_cshape, tg119_prostate
from adaptive.pipeline.planning import make_scheduled_plan
from adaptive.replay.manifest import MANIFEST_NAME, SCHEMA_VERSION, write_manifest
from adaptive.replay.truth import TRUTH_QUANTUM_MM, write_truth_json

log = get_logger(__name__)

DEFAULT_SEED = 20250604
PLANNING_STUDY_DATE = "20250106"

#: CBCT frame conventions of the convention fractions (what imaging systems do):
#: ``planning_coordinates`` - the CBCT written in (nominally) planning coordinates with its own
#: Frame of Reference UID (the isocenter at its planning coordinates); ``setup_error`` - a
#: 3-8 cm setup error (isocenter-centred); ``couch_rotation`` - a 5-8 deg rotation about the
#: vertical (IEC 61217 patient support) axis (isocenter-centred). The regular fractions are
#: ``isocenter``: reconstructed around the treatment isocenter.
CONVENTIONS = {"planning_coordinates", "setup_error", "couch_rotation"}


def convention_variation(base: DailyVariation, convention: str, seed: int, fraction: int,
                         isocenter_lps_mm) -> tuple[DailyVariation, np.ndarray]:
    """The day's variation and the isocenter's CBCT-frame coordinates for a convention
    fraction (seeded; organ motion as sampled for the fraction)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0417, int(fraction)]))
    frame = np.zeros(3)
    if convention == "planning_coordinates":
        frame = np.asarray(isocenter_lps_mm, dtype=np.float64)
    elif convention == "setup_error":
        # 3-8 cm, mostly lateral/vertical: a longitudinal error that large would move the
        # target out of the CBCT's 13.5 cm scan length (then no plan may be adapted at all)
        d = rng.normal(size=3)
        d[2] *= 0.25
        d /= np.linalg.norm(d)
        base = dataclasses.replace(base, setup_translation_mm=tuple(
            float(v) for v in d * rng.uniform(30.0, 80.0)))
    elif convention == "couch_rotation":
        ang = float(rng.choice([-1.0, 1.0]) * rng.uniform(5.0, 8.0))
        r = base.setup_rotation_deg
        base = dataclasses.replace(base, setup_rotation_deg=(r[0], ang, r[2]))
    else:
        raise ConfigError(f"unknown CBCT convention {convention!r}")
    return base, frame


def _known_conventions(v: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(v) - CONVENTIONS)
    if unknown:
        raise ValueError(f"unknown convention(s) {unknown}; expected some of {sorted(CONVENTIONS)}")
    return v


Size = Annotated[Int, Field(ge=2)]
PositiveMm = Annotated[Float, Field(gt=0)]


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class PelvisCaseConfig:
    """Generator parameters of one pelvis case (see ``config/replay.toml``)."""

    name: Annotated[str, Field(strict=True, min_length=1)] = "pelvis01"
    fractions: Annotated[Int, Field(ge=0)] = 3
    planning_spacing_mm: tuple[Float, Float, Float] = (3.0, 3.0, 3.0)
    planning_size_ijk: tuple[Size, Size, Size] = (160, 120, 70)
    planning_noise_hu: Float = 12.0
    ptv_margin_mm: Float = 6.0
    cbct_spacing_mm: tuple[Float, Float, Float] = (2.7, 2.7, 3.0)
    cbct_size_ijk: tuple[Size, Size, Size] = (100, 100, 45)
    cbct_fov_diameter_mm: Float = 264.0
    dose_per_fraction_gy: Float = 3.0
    number_of_fractions: Int = 20
    #: extra fractions after the regular ones, one per CBCT frame convention (see
    #: :data:`CONVENTIONS`); the regular fractions are isocenter-centred
    conventions: Annotated[tuple[str, ...], AfterValidator(_known_conventions)] = ()

    @property
    def cbct_geometry(self) -> CbctGeometry:
        return CbctGeometry(self.cbct_size_ijk, self.cbct_spacing_mm, self.cbct_fov_diameter_mm)


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class Tg119Config:
    spacing_mm: tuple[PositiveMm, PositiveMm, PositiveMm] = (3.0, 3.0, 3.0)


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class ReplayConfig:
    """``config/replay.toml``: the seed and the generator parameters of the committed cases."""

    seed: Annotated[Int, Field(ge=0)] = DEFAULT_SEED
    pelvis: PelvisCaseConfig = PelvisCaseConfig()
    pelvis_large: PelvisCaseConfig = PelvisCaseConfig(
        name="pelvis_large", planning_spacing_mm=(0.9375, 0.9375, 1.5),
        planning_size_ijk=(512, 384, 140), cbct_spacing_mm=(1.0, 1.0, 1.5),
        cbct_size_ijk=(264, 264, 100))
    tg119: Tg119Config = Tg119Config()

    @property
    def tg119_spacing_mm(self) -> tuple[float, float, float]:
        return self.tg119.spacing_mm


def load_replay_config(path: str | Path | None = None) -> ReplayConfig:
    """Read ``config/replay.toml`` (or ``path``); unknown keys and wrong types are errors."""
    path = Path(path) if path else config_path("replay.toml")
    if not path.is_file():
        return ReplayConfig()
    return load_config(ReplayConfig, path)


# --- helpers ---------------------------------------------------------------------------


def det_uid(*parts) -> str:
    """A deterministic DICOM UID from ``parts`` (pydicom root + hash of the parts)."""
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def _grid_entry(grid) -> dict:
    return {"shape_zyx": [int(v) for v in grid.shape], "spacing_mm": [float(v) for v in grid.spacing],
            "origin_lps_mm": [float(v) for v in grid.origin]}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _clean_case(case_dir: Path) -> None:
    """Remove what a previous build wrote (keeps planning/RP.dcm and any other file)."""
    for sub in [case_dir / "planning" / "CT", *case_dir.glob("fx[0-9][0-9]")]:
        if sub.is_dir():
            shutil.rmtree(sub)
    rs = case_dir / "planning" / "RS.dcm"
    if rs.exists():
        rs.unlink()


def _planning_series(phantom: Phantom, case: str, seed: int, patient: PatientInfo, out: Path,
                     description: str):
    grid = phantom.grid
    info = SeriesInfo(
        patient=patient, study_instance_uid=det_uid(case, seed, "planning-study"),
        series_instance_uid=det_uid(case, seed, "planning-ct"),
        frame_of_reference_uid=det_uid(case, seed, "planning-for"),
        sop_instance_uids=[det_uid(case, seed, "planning-ct", k) for k in range(grid.shape[0])],
        study_id="PLAN", study_date=PLANNING_STUDY_DATE, series_number=1,
        series_description="Planning CT")
    prov = Provenance(parameters={"generator": "adaptive.replay.build", "case": case, "seed": seed,
                                  "phantom": phantom.meta},
                      description=description)
    info = write_ct_series(phantom.ct, info, out / "CT", study=info.study, provenance=prov,
                           description="Planning CT", derivation=f"Simulated CT: {description}")
    ss = phantom.structure_set(info, label="PLANNING", name=f"{case} planning structures")
    ss.sop_instance_uid = det_uid(case, seed, "planning-rs")
    rs_prov = Provenance(input_uids={"planning_ct_series": info.series_instance_uid},
                         parameters={"generator": "adaptive.replay.build", "case": case, "seed": seed},
                         description=f"Phantom structures ({description})")
    write_rtstruct(ss, out / "RS.dcm", study=info.study, provenance=rs_prov, grid=grid)
    return info, ss


def build_pelvis_case(root: str | Path, cfg: PelvisCaseConfig | None = None,
                      seed: int = DEFAULT_SEED) -> dict:
    """Build the pelvis case ``cfg.name`` under ``root``; returns its manifest entry."""

    cfg = cfg or PelvisCaseConfig()
    root = Path(root)
    case_dir = root / cfg.name
    _clean_case(case_dir)
    t0 = time.perf_counter()
    anat = PelvisAnatomy.sample(seed, ptv_margin_mm=cfg.ptv_margin_mm)
    grid = default_planning_grid(anat, cfg.planning_spacing_mm, cfg.planning_size_ijk)
    phantom = pelvis_phantom(grid, seed, anatomy=anat, noise_hu=cfg.planning_noise_hu)
    phantom.prescription = Prescription(cfg.dose_per_fraction_gy, cfg.number_of_fractions, "PTV")
    iso = isocenter_from_ptv(phantom)
    patient = PatientInfo(patient_id=f"ADAPTIVE-{cfg.name.upper()}",
                          patient_name=f"PHANTOM^{cfg.name.upper()}", sex="M")
    plan_info, _ = _planning_series(phantom, cfg.name, seed, patient, case_dir / "planning",
                                    f"analytic male pelvis phantom, seed {seed}")
    log.info("replay_planning_written", case=cfg.name, shape=list(grid.shape),
             seconds=round(time.perf_counter() - t0, 2))
    geom = cfg.cbct_geometry
    fractions = []
    plan_conv = ["isocenter"] * cfg.fractions + list(cfg.conventions)
    for f, convention in enumerate(plan_conv, start=1):
        t1 = time.perf_counter()
        fractions.append(_write_pelvis_fraction(case_dir, cfg, seed, f, convention, phantom,
                                                anat, iso, patient, plan_info))
        log.info("replay_fraction_written", case=cfg.name, fraction=f,
                 seconds=round(time.perf_counter() - t1, 2))
    entry = _case_entry(cfg.name, "male_pelvis", seed, phantom, plan_info, patient, case_dir,
                        "Analytic male pelvis phantom (prostate) with simulated daily CBCTs and "
                        "ground-truth deformations", iso=iso)
    entry["cbct_grid"] = _grid_entry(geom.grid())
    entry["cbct_fov_diameter_mm"] = geom.fov_diameter_mm
    entry["n_fractions"] = len(fractions)
    entry["fractions"] = fractions
    entry["size_bytes"] = _dir_size(case_dir)
    return entry


def _write_pelvis_fraction(case_dir: Path, cfg: PelvisCaseConfig, seed: int, f: int,
                           convention: str, phantom: Phantom, anat: PelvisAnatomy, iso: np.ndarray,
                           patient: PatientInfo, plan_info: SeriesInfo) -> dict:
    """Simulate fraction ``f`` (CBCT frame ``convention``) and write its CBCT series, truth
    DVF (LPS mm, CBCT grid), truth structures and truth.json under ``case_dir/fxNN``;
    returns its manifest entry."""
    geom = cfg.cbct_geometry
    if convention == "isocenter":
        fx = simulate_fraction(phantom, anat, iso, f, seed, geometry=geom)
    else:
        var, frame = convention_variation(DailyVariation.sample(seed, f, anat), convention,
                                          seed, f, iso)
        fx = simulate_fraction(phantom, anat, iso, f, seed, geometry=geom, variation=var,
                               frame_origin_lps_mm=frame)
    label = f"fx{f:02d}"
    fx_dir = case_dir / label
    cgrid = fx.cbct.grid
    info = SeriesInfo(
        patient=patient, study_instance_uid=det_uid(cfg.name, seed, label, "study"),
        series_instance_uid=det_uid(cfg.name, seed, label, "cbct"),
        frame_of_reference_uid=det_uid(cfg.name, seed, label, "for"),
        sop_instance_uids=[det_uid(cfg.name, seed, label, "cbct", k) for k in range(cgrid.shape[0])],
        study_id=label.upper(), study_date=f"202502{f % 28 + 1:02d}", series_number=100 + f,
        series_description="CBCT")
    params = {"generator": "adaptive.replay.build", "case": cfg.name, "seed": seed, "fraction": f,
              "convention": convention,
              "variation": fx.variation.to_dict(), "degradation": fx.degradation.to_dict()}
    info = write_ct_series(fx.cbct, info, fx_dir / "CBCT", study=info.study,
                           provenance=Provenance(input_uids={"planning_ct_series": plan_info.series_instance_uid},
                                                 parameters=params,
                                                 description="Simulated CBCT (phantom)"),
                           description="CBCT",
                           derivation="Simulated cone-beam CT of a deformed analytic pelvis phantom")
    write_dvf(fx_dir / "truth" / "dvf.mha", fx.dvf, cgrid, quantum_mm=TRUTH_QUANTUM_MM)
    rois = [Roi(number=i, name=spec.name, color=spec.color, interpreted_type=spec.interpreted_type,
                mask=Volume(fx.truth_masks[spec.name], cgrid, "mask"), generation_algorithm="AUTOMATIC")
            for i, spec in enumerate(phantom.rois, start=1)]
    tss = StructureSet(rois=rois, referenced_series=info, label="TRUTH",
                       name=f"{cfg.name} {label} truth structures",
                       sop_instance_uid=det_uid(cfg.name, seed, label, "truth-rs"))
    write_rtstruct(tss, fx_dir / "truth" / "RS.dcm", study=info.study,
                   provenance=Provenance(input_uids={"cbct_series": info.series_instance_uid,
                                                     "planning_ct_series": plan_info.series_instance_uid},
                                         parameters={"method": "planning masks pulled back through "
                                                     "truth/dvf.mha (trilinear, threshold 0.5)"},
                                         description="Ground-truth structures (phantom)"),
                   grid=cgrid)
    record = fx.truth_dict(phantom)
    record.update({"case": cfg.name, "convention": convention,
                   "cbct_series_uid": info.series_instance_uid,
                   "cbct_frame_of_reference_uid": info.frame_of_reference_uid,
                   "planning_series_uid": plan_info.series_instance_uid,
                   "planning_frame_of_reference_uid": plan_info.frame_of_reference_uid,
                   "cbct_grid": _grid_entry(cgrid), "software_version": adaptive.__version__})
    write_truth_json(fx_dir / "truth" / "truth.json", record)
    rel = f"{cfg.name}/{label}"
    return {
        "number": f, "path": rel, "cbct": f"{rel}/CBCT", "truth_dvf": f"{rel}/truth/dvf.mha",
        "truth_rtstruct": f"{rel}/truth/RS.dcm", "truth_json": f"{rel}/truth/truth.json",
        "cbct_series_uid": info.series_instance_uid,
        "cbct_frame_of_reference_uid": info.frame_of_reference_uid,
        "convention": convention,
        "isocenter_cbct_lps_mm": [round(float(v), 4) for v in fx.frame_origin_lps_mm],
        "setup_rotation_deg": [round(v, 3) for v in fx.variation.setup_rotation_deg],
        "rectal_gas": bool(fx.variation.gas_pockets),
        "setup_translation_mm": [round(v, 3) for v in fx.variation.setup_translation_mm],
        "bladder_scale": round(fx.variation.bladder_scale, 4),
    }



def _case_entry(name, anatomy, seed, phantom: Phantom, info: SeriesInfo, patient: PatientInfo,
                case_dir: Path, description: str, iso=None) -> dict:
    rx = phantom.prescription
    e = {
        "name": name, "anatomy": anatomy, "description": description, "seed": int(seed),
        "path": name, "planning_ct": f"{name}/planning/CT", "planning_rtstruct": f"{name}/planning/RS.dcm",
        "planning_rtplan": f"{name}/planning/RP.dcm",
        "planning_rtplan_note": "optional: the scheduled plan, written by the planning stage (not by this build)",
        "patient_id": patient.patient_id,
        "planning_series_uid": info.series_instance_uid,
        "planning_frame_of_reference_uid": info.frame_of_reference_uid,
        "roi_names": [r.name for r in phantom.rois],
        "roi_types": [r.interpreted_type for r in phantom.rois],
        "n_fractions": 0,
        "size_bytes": _dir_size(case_dir),
        "software_version": adaptive.__version__,
        "prescription": {"dose_per_fraction_gy": rx.dose_per_fraction_gy,
                         "number_of_fractions": rx.number_of_fractions,
                         "total_dose_gy": rx.total_dose_gy, "target_roi_name": rx.target_roi_name},
        "planning_grid": _grid_entry(phantom.grid),
        "roi_volumes_cc": {r.name: round(phantom.volume_cc(r.name), 3) for r in phantom.rois},
    }
    if iso is not None:
        e["isocenter_lps_mm"] = [round(float(v), 4) for v in iso]
    return e


def build_tg119_case(root: str | Path, kind: str, spacing_mm=(3.0, 3.0, 3.0), seed: int = DEFAULT_SEED) -> dict:
    """Build ``tg119_cshape`` or ``tg119_prostate`` (planning only); returns its manifest entry."""
    root = Path(root)
    maker = {"tg119_cshape": tg119_cshape, "tg119_prostate": tg119_prostate}.get(kind)
    if maker is None:
        raise ConfigError(f"unknown TG-119 case {kind!r}")
    case_dir = root / kind
    _clean_case(case_dir)
    phantom = maker(spacing_mm=spacing_mm)
    patient = PatientInfo(patient_id=f"ADAPTIVE-{kind.upper()}", patient_name=f"PHANTOM^{kind.upper()}")
    info, _ = _planning_series(phantom, kind, seed, patient, case_dir / "planning",
                               f"TG-119-style {kind.split('_')[1]} phantom")
    desc = {"tg119_cshape": "TG-119 C-shape: C-shaped PTV around a central core (water phantom)",
            "tg119_prostate": "TG-119 prostate: prostate, PTV, rectum, bladder (water phantom)"}[kind]
    return _case_entry(kind, kind, seed, phantom, info, patient, case_dir, desc)


ALL_CASES = ("pelvis", "tg119_cshape", "tg119_prostate")


#: goals used for the pelvis cases' scheduled plan (must match the case prescription)
PELVIS_GOALS = ("goals", "prostate.toml")


def add_scheduled_plan(root: str | Path, entry: dict, goals_path: str | Path | None = None) -> dict:
    """Plan the case of manifest ``entry`` under ``root`` from scratch (its scheduled plan:
    ``planning/RP.dcm``, ``RD.dcm``, ``plan_report.json``) and update the entry. Raises
    :class:`ConfigError` when the goals' prescription differs from the case's."""

    gp = Path(goals_path) if goals_path else config_path(*PELVIS_GOALS)
    g = load_goals(gp).prescription
    rx = entry["prescription"]
    if (int(rx["number_of_fractions"]) != g.number_of_fractions or
            abs(float(rx["dose_per_fraction_gy"]) - g.dose_per_fraction_gy) > 1e-6):
        raise ConfigError(f"{gp}: prescription {g.dose_per_fraction_gy:g} Gy x "
                          f"{g.number_of_fractions} does not match case {entry['name']!r} "
                          f"({rx['dose_per_fraction_gy']:g} Gy x {rx['number_of_fractions']})")
    case_dir = Path(root) / entry["path"]
    t0 = time.perf_counter()
    rep = make_scheduled_plan(case_dir, gp)
    log.info("scheduled_plan_built", case=entry["name"], seconds=round(time.perf_counter() - t0, 1),
             checks_passed=rep["checks"]["passed"])
    entry["planning_rtplan_note"] = (f"the scheduled plan, planned from scratch by this build "
                                     f"with {gp.name} (planning/RD.dcm, plan_report.json)")
    entry["planning_rtplan_uid"] = rep["plan"]["sop_instance_uid"]
    entry["size_bytes"] = _dir_size(case_dir)
    return entry


def build_replay_data(out: str | Path = "replay_data", *, seed: int | None = None,
                      cases: list[str] | None = None, large: bool = False,
                      config: ReplayConfig | None = None,
                      scheduled_plan: bool = True) -> Path:
    """Build replay cases into ``out`` and write/merge ``out/manifest.toml``; returns its path.

    ``cases``: names among the configured pelvis case name (or "pelvis"), "tg119_cshape",
    "tg119_prostate" (default all). ``large``: build only the large pelvis case (finer grid,
    not committed; a ``.gitignore`` is written into ``out``). ``scheduled_plan``: also plan
    the pelvis case (:func:`add_scheduled_plan`; slow — tests building small cases pass
    False).
    """

    cfg = config or load_replay_config()
    seed = cfg.seed if seed is None else int(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if large:
        (out / ".gitignore").write_text("# built by `adaptive replay-data build --large`; not committed\n*\n")
        wanted = [cfg.pelvis_large.name]
        builders = {cfg.pelvis_large.name: lambda: build_pelvis_case(out, cfg.pelvis_large, seed)}
    else:
        builders = {
            cfg.pelvis.name: lambda: build_pelvis_case(out, cfg.pelvis, seed),
            "tg119_cshape": lambda: build_tg119_case(out, "tg119_cshape", cfg.tg119_spacing_mm, seed),
            "tg119_prostate": lambda: build_tg119_case(out, "tg119_prostate", cfg.tg119_spacing_mm, seed),
        }
        wanted = list(builders)
        if cases:
            wanted = [cfg.pelvis.name if c == "pelvis" else c for c in cases]
            unknown = [c for c in wanted if c not in builders]
            if unknown:
                raise ConfigError(f"unknown replay case(s) {unknown}; known: {list(builders)}")
    existing: list[dict] = []
    mpath = out / MANIFEST_NAME
    if mpath.is_file():
        try:
            existing = tomllib.loads(mpath.read_text()).get("cases", [])
        except tomllib.TOMLDecodeError:
            existing = []
    built = {}
    for name in wanted:
        t0 = time.perf_counter()
        built[name] = builders[name]()
        if scheduled_plan and built[name].get("anatomy") == "male_pelvis":
            add_scheduled_plan(out, built[name])
        log.info("replay_case_built", case=name, seconds=round(time.perf_counter() - t0, 2),
                 size_mb=round(built[name]["size_bytes"] / 1e6, 2))
    merged = [built.pop(c["name"]) if c.get("name") in built else c for c in existing
              if (out / str(c.get("path", ""))).is_dir()]
    merged += [built[n] for n in wanted if n in built]
    data = {"schema_version": SCHEMA_VERSION, "software": adaptive.SOFTWARE_NAME,
            "software_version": adaptive.__version__, "research_use": adaptive.RESEARCH_USE_STATEMENT,
            "seed": seed, "cases": merged}
    return write_manifest(mpath, data)
