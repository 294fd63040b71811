"""Cases for calibrating and confirming the registration safety gate (not the committed replay
cases: phantoms built here from other seeds, and another anatomy).

* correct registrations (:func:`normal_cases`): the pelvis phantom and the abdomen phantom,
  each seed in four CBCT frame conventions - (a) isocenter-centred, (b) planning
  coordinates with its own Frame of Reference, (c) a 3-8 cm setup error, (d) a 5-8 deg
  couch rotation - with their ground truth;
* faults (:func:`fault_cases`): a CBCT whose header is 10 cm off, two other patients'
  anatomies, another body site, a CBCT that is mostly air, registrations stopped after one
  iteration;
* adversarial results (``perturb``): a correct result shifted by 3-5 mm, or locally wrong
  by 4-7 mm around the target (the mean error against the truth says whether the gate had
  to catch them: > 3 mm must never pass).

:func:`evaluate` registers a case with :func:`adaptive.registration.core.register`, adds the
target region's residual shift, asks :func:`adaptive.pipeline.safety.registration_gate` for
the verdict and scores the result against the truth (mean/max TRE in PTV + 20 mm).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from adaptive.config import load_toml
from adaptive.errors import RegistrationError
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.identity import PatientInfo, SeriesInfo
from adaptive.phantoms.abdomen import (
    AbdomenAnatomy,
    AbdomenVariation,
    abdomen_phantom,
    simulate_abdomen_fraction,
)
from adaptive.phantoms.cbct import simulate_fraction
from adaptive.phantoms.deformation import DailyVariation
from adaptive.phantoms.pelvis import (
    PelvisAnatomy,
    default_planning_grid,
    isocenter_from_ptv,
    pelvis_phantom,
)
from adaptive.pipeline.registration_gate import target_residual
from adaptive.pipeline.safety import SafetySettings, registration_gate
from adaptive.registration.core import _validity, _validity_samples, register
from adaptive.registration.evaluate import dilate_mm, tre
from adaptive.registration.quality import deformation_beyond_rigid
from adaptive.registration.settings import DEFAULT_CONFIG
from adaptive.replay.build import load_replay_config

CONVENTION_NAMES = {"a": "isocenter", "b": "planning coordinates", "c": "setup error 3-8 cm",
                    "d": "couch rotation 5-8 deg"}


@dataclass
class GateCase:
    name: str
    kind: str  # "normal" | "fault" | "adversarial"
    cbct: Volume
    planning: object  # Phantom
    isocenter: np.ndarray
    truth_dvf: np.ndarray | None = None
    truth_ptv: np.ndarray | None = None
    config: dict | None = None
    perturb: Callable | None = None
    extra: dict = field(default_factory=dict)


@lru_cache(maxsize=8)
def pelvis(seed: int):
    cfg = load_replay_config().pelvis
    anat = PelvisAnatomy.sample(seed, ptv_margin_mm=cfg.ptv_margin_mm)
    ph = pelvis_phantom(default_planning_grid(anat, cfg.planning_spacing_mm,
                                              cfg.planning_size_ijk), seed, anatomy=anat,
                        noise_hu=cfg.planning_noise_hu)
    return anat, ph, isocenter_from_ptv(ph)


@lru_cache(maxsize=4)
def abdomen(seed: int):
    a = AbdomenAnatomy.sample(seed)
    ph = abdomen_phantom(seed, anatomy=a)
    return a, ph, ph.ct.grid.ijk_to_lps(np.argwhere(ph.masks["PTV"]).mean(0)[::-1])


def _convention(kind: str, rng, setup, rotation):
    """(setup translation, rotation (deg, Rz·Ry·Rx), frame flag) of a convention."""
    if kind == "c":
        d = rng.normal(size=3)
        d[2] *= 0.25
        d /= np.linalg.norm(d)
        setup = tuple(float(v) for v in d * rng.uniform(30.0, 80.0))
    if kind == "d":
        rotation = (rotation[0], float(rng.choice([-1.0, 1.0]) * rng.uniform(5.0, 8.0)),
                    rotation[2])
    return setup, rotation


def normal_cases(pelvis_seeds=(), abdomen_seeds=(), kinds="abcd") -> Iterator[GateCase]:
    geom = load_replay_config().pelvis.cbct_geometry
    for seed in pelvis_seeds:
        anat, ph, iso = pelvis(seed)
        rng = np.random.default_rng(seed + 7)
        for f, kind in enumerate(kinds, start=1):
            v = DailyVariation.sample(seed, f, anat)
            t, r = _convention(kind, rng, v.setup_translation_mm, v.setup_rotation_deg)
            v = dataclasses.replace(v, setup_translation_mm=t, setup_rotation_deg=r)
            sim = simulate_fraction(ph, anat, iso, f, seed, geometry=geom, variation=v,
                                    frame_origin_lps_mm=iso if kind == "b" else (0, 0, 0))
            yield GateCase(f"pelvis s{seed} ({kind}) {CONVENTION_NAMES[kind]}", "normal",
                           sim.cbct, ph, iso, sim.dvf, sim.truth_masks["PTV"] > 0.5)
    for seed in abdomen_seeds:
        a, ph, iso = abdomen(seed)
        rng = np.random.default_rng(seed + 7)
        for f, kind in enumerate(kinds, start=1):
            v = AbdomenVariation.sample(seed, f)
            t, r = _convention(kind, rng, v.setup_translation_mm, v.setup_rotation_deg)
            v = dataclasses.replace(v, setup_translation_mm=t, setup_rotation_deg=r)
            sim = simulate_abdomen_fraction(ph, a, iso, f, seed, geometry=geom, variation=v,
                                            frame_origin_lps_mm=iso if kind == "b" else (0, 0, 0))
            yield GateCase(f"abdomen s{seed} ({kind}) {CONVENTION_NAMES[kind]}", "normal",
                           sim.cbct, ph, iso, sim.dvf, sim.truth_masks["PTV"] > 0.5)


def one_iteration_config() -> dict:
    raw = load_toml(DEFAULT_CONFIG)
    raw["elastix"]["rigid"]["MaximumNumberOfIterations"] = 1
    raw["elastix"]["bspline"]["MaximumNumberOfIterations"] = 1
    return raw


def other_patient(seed: int):
    """A pelvis of another patient: other organs, a 10-12 % larger body, wider hips."""
    o = PelvisAnatomy.sample(seed, ptv_margin_mm=6.0)
    return dataclasses.replace(o, body_semi_lr_mm=o.body_semi_lr_mm * 1.12,
                               body_semi_ap_mm=o.body_semi_ap_mm * 1.1, femoral_head_x_mm=100.0,
                               prostate_center_mm=(3.0, 4.0, -15.0),
                               bladder_center_mm=(0.0, -20.0, 45.0))


def fault_cases(seed: int) -> Iterator[GateCase]:
    cfg = load_replay_config().pelvis
    geom = cfg.cbct_geometry
    anat, ph, iso = pelvis(seed)
    sim = simulate_fraction(ph, anat, iso, 1, seed, geometry=geom)
    ptv = sim.truth_masks["PTV"] > 0.5
    g = sim.cbct.grid
    yield GateCase("CBCT header shifted 10 cm", "fault",
                   Volume(sim.cbct.array, Grid(g.shape, g.origin + [0, 0, 100.0], g.spacing),
                          "HU"), ph, iso)
    for label, o in (("another patient (larger, other organs)", other_patient(seed + 500)),
                     ("another patient (same build)", PelvisAnatomy.sample(seed + 600,
                                                                           ptv_margin_mm=6.0))):
        pho = pelvis_phantom(default_planning_grid(o, cfg.planning_spacing_mm,
                                                   cfg.planning_size_ijk), seed + 500, anatomy=o)
        so = simulate_fraction(pho, o, isocenter_from_ptv(pho), 1, seed + 500, geometry=geom)
        yield GateCase(label, "fault", so.cbct, ph, iso)
    a, pha, isoa = abdomen(seed)
    yield GateCase("another body site (abdomen)", "fault",
                   simulate_abdomen_fraction(pha, a, isoa, 1, seed, geometry=geom).cbct, ph, iso)
    air = simulate_fraction(ph, anat, iso, 1, seed, geometry=geom, variation=dataclasses.replace(
        DailyVariation.sample(seed, 1, anat), setup_translation_mm=(0.0, 230.0, 0.0)))
    yield GateCase("mostly air (patient 23 cm off)", "fault", air.cbct, ph, iso)
    yield GateCase("stopped after one iteration", "fault", sim.cbct, ph, iso, sim.dvf, ptv,
                   config=one_iteration_config())
    v3 = dataclasses.replace(DailyVariation.sample(seed, 3, anat),
                             setup_translation_mm=(40.0, -25.0, 10.0))
    s3 = simulate_fraction(ph, anat, iso, 3, seed, geometry=geom, variation=v3)
    yield GateCase("stopped after one iteration (5 cm setup)", "fault", s3.cbct, ph, iso, s3.dvf,
                   s3.truth_masks["PTV"] > 0.5, config=one_iteration_config())
    for d in ((3.0, 0, 0), (0, 3.0, 0), (0, 0, 3.0), (2.0, 2.0, 2.0)):
        yield GateCase(f"result shifted {d} mm", "adversarial", sim.cbct, ph, iso, sim.dvf, ptv,
                       perturb=shift_field(d))
    centre = g.ijk_to_lps(np.argwhere(ptv).mean(0)[::-1])
    for d in ((4.0, 0, 0), (0, 0, 5.0), (0, 6.0, 0), (7.0, 0, 0), (0, 0, 9.0), (0, 11.0, 0)):
        yield GateCase(f"result locally wrong at the target {d} mm", "adversarial", sim.cbct, ph,
                       iso, sim.dvf, ptv, perturb=bump_field(d, centre))


def shift_field(d) -> Callable:
    def f(dvf, grid):
        return (dvf + np.asarray(d, np.float32)).astype(np.float32)
    return f


def bump_field(d, centre, sigma_mm: float = 20.0) -> Callable:
    """A Gaussian bump of displacement ``d`` (mm) at ``centre`` (CBCT LPS) added to a field."""
    def f(dvf, grid: Grid):
        x = grid.voxel_centers_lps()
        w = np.exp(-np.sum((x - np.asarray(centre)) ** 2, -1) / (2.0 * sigma_mm ** 2))
        return (dvf + w[..., None] * np.asarray(d, np.float32)).astype(np.float32)
    return f


def evaluate(case: GateCase) -> dict:
    """Register ``case`` (or perturb its result), run the gate, score against the truth."""
    ph = case.planning
    out = {"case": case.name, "kind": case.kind}
    t0 = time.perf_counter()
    try:
        r = register(case.cbct, ph.ct, isocenter_lps_mm=case.isocenter, config=case.config)
    except RegistrationError as e:
        out.update(verdict="none", failed=["registration_failed"], error=str(e), reviews=[])
        return out
    out["time_s"] = time.perf_counter() - t0
    out["init_s"] = r.timings_s.get("initial_alignment", 0.0)
    out["init"] = r.initial_alignment
    if case.perturb is not None:
        r.dvf_lps_mm = case.perturb(r.dvf_lps_mm, case.cbct.grid)
        vs = _validity_samples(case.cbct, r.fixed_mask, r.body_mask, ph.ct)
        r.quality["validity_final"] = _validity(vs, case.cbct, ph.ct, r.valid_mask, r.body_mask,
                                                dvf=r.dvf_lps_mm)
        r.quality.update(deformation_beyond_rigid(r.dvf_lps_mm, r.rigid_matrix, r.fixed_grid,
                                                  r.body_mask))
    ss = ph.structure_set(SeriesInfo(PatientInfo("GATE"), "1.2", "1.2.3", "1.2.4"))
    tr = target_residual(r, case.cbct, ph.ct, ss, "PTV")
    v = registration_gate(r.quality, r.fallback, SafetySettings.load(), tr)
    q = r.quality
    out.update(verdict=v.validity, failed=[c.name for c in v.failures],
               reviews=[c.name for c in v.reviews],
               nmi_rigid=q["validity_rigid"]["nmi"], nmi=q["validity_final"]["nmi"],
               dice_rigid=q["validity_rigid"]["body_dice"],
               dice=q["validity_final"]["body_dice"],
               residual_rigid=q["validity_rigid"]["residual"]["residual_norm_mm"],
               residual=q["validity_final"]["residual"]["residual_norm_mm"],
               residual_target=None if tr is None else tr["residual_norm_mm"],
               residual_target_lb=None if tr is None else tr["lower_bound_mm"],
               residual_target_u=None if tr is None else tr["uncertainty_mm"],
               target_nmi=None if tr is None else tr["nmi"],
               deformation_mean=q["deformation_mean_mm"], deformation_max=q["deformation_max_mm"],
               tissue=q["tissue_fraction_fov"],
               setup_mm=(q.get("setup_correction") or {}).get("translation_norm_mm"),
               setup_deg=(q.get("setup_correction") or {}).get("rotation_deg"))
    if case.truth_dvf is not None:
        m = dilate_mm(case.truth_ptv, case.cbct.grid, 20.0)
        e = tre(r.dvf_lps_mm, case.truth_dvf, m, case.cbct.grid)
        out.update(tre_mean=e["mean_mm"], tre_max=e["max_mm"])
    return out
