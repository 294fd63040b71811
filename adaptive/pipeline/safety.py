"""Safety gate: what a registration and today's contours must show before anything computed
on them is offered (AAPM TG-132: every clinical registration gets a quantitative check).

A registration that converged to the wrong place looks smooth (its Jacobian is fine); only
the images, the body outline and the plausibility of the rigid shift give it away. The gate
has three levels, each a list of named checks with their numbers:

**The rigid match** (the scheduled plan on today's anatomy is positioned by it):

* ``registration_content``: the CBCT shows tissue in enough of its field of view (a CBCT that
  is mostly air cannot be registered);
* ``rigid_similarity``: normalised mutual information of CBCT and rigidly mapped planning CT
  on the CBCT body ∩ field of view;
* ``rigid_body_outline``: Dice of the CBCT body and the rigidly mapped planning body;
* ``rigid_converged``: the rigid result sits at the peak of its similarity (residual shift);
* ``setup_translation`` / ``setup_rotation``: the rigid match relative to the nearest frame
  convention (isocenter, identity, received Spatial Registration). Beyond ``review_*`` the
  console is asked to review it (not silent, not blocking); beyond ``max_*`` it is refused:
  no patient is treated that far off, the CBCT's header or convention is wrong.

**The deformable result** (the adapted plan, the synthetic CT and the propagated contours
rest on it): ``registration_similarity``, ``registration_body_outline``,
``registration_converged`` (whole body and the target region), ``registration_deformation``
(deformation beyond the rigid part bounded), ``registration_jacobian`` (no folding) and
``registration_fallback`` (a rigid result used because the deadline cut the deformable stage).

**Today's contours** (:func:`contour_checks`, on the planning stage's grid):
``contours_present``, ``contour_volumes`` (today's volume against the part of the planned
organ that maps into the CBCT's field of view) and ``target_inside_fov``.

Verdict: rigid checks fail → no valid registration (the scheduled plan as delivered with the
linac's own image guidance, no metrics); rigid passes but the deformable checks fail → the
rigid match is used for the scheduled plan's metrics and no adapted plan is offered; all
pass → an adapted plan may be offered. Thresholds and their rationale: ``config/safety.toml``
(unknown keys are errors). Volumes in cm³, lengths in mm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from adaptive.config import (
    CONFIG_MODEL,
    Bool,
    Float,
    Interval,
    config_path,
    load_toml,
    validate_config,
)
from adaptive.errors import ConfigError
from adaptive.model.structures import StructureSet
from adaptive.optimization.checks import CheckItem

TARGET_TYPES = {"PTV", "CTV", "GTV"}

#: which mapping a verdict allows
DEFORMABLE, RIGID, NONE = "deformable", "rigid", "none"


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class SafetySettings:
    """``config/safety.toml`` (see the file for the meaning and rationale of each value).
    The file groups the fields in the tables of :attr:`SECTIONS` and must set every one."""

    # deformable result
    min_jacobian: Float = 0.0
    max_fraction_folded: Float = 0.0
    allow_rigid_fallback: Bool = True
    min_nmi: Float = 1.23
    min_body_dice: Float = 0.98
    max_residual_mm: Float = 1.0
    max_target_residual_mm: Float = 1.5
    min_target_information: Float = 0.03
    max_deformation_mean_mm: Float = 3.5
    max_deformation_mm: Float = 25.0
    # rigid match
    min_tissue_fraction: Float = 0.25
    min_nmi_rigid: Float = 1.20
    min_body_dice_rigid: Float = 0.98
    max_residual_rigid_mm: Float = 0.75
    # setup correction relative to the nearest frame convention
    review_translation_mm: Float = 20.0
    max_translation_mm: Float = 90.0
    review_rotation_deg: Float = 3.0
    max_rotation_deg: Float = 10.0
    # contours
    target_volume_ratio: Interval = (0.80, 1.25)
    organ_volume_ratio: Interval = (0.20, 5.0)
    min_share_in_fov: Float = 0.10
    target_min_share_in_fov: Float = 0.995

    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "registration": ("min_jacobian", "max_fraction_folded", "allow_rigid_fallback",
                         "min_nmi", "min_body_dice", "max_residual_mm",
                         "max_target_residual_mm", "min_target_information",
                         "max_deformation_mean_mm",
                         "max_deformation_mm"),
        "rigid_match": ("min_tissue_fraction", "min_nmi_rigid", "min_body_dice_rigid",
                        "max_residual_rigid_mm"),
        "setup_correction": ("review_translation_mm", "max_translation_mm",
                             "review_rotation_deg", "max_rotation_deg"),
        "contours": ("target_volume_ratio", "organ_volume_ratio", "min_share_in_fov",
                     "target_min_share_in_fov"),
    }

    @model_validator(mode="after")
    def _review_below_max(self):
        if self.review_translation_mm > self.max_translation_mm or \
                self.review_rotation_deg > self.max_rotation_deg:
            raise ValueError("setup_correction: review limits must not exceed the maximum "
                             "limits")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> SafetySettings:
        path = Path(path) if path else config_path("safety.toml")
        cfg = load_toml(path)
        flat, problems = {}, []
        for sec, keys in cls.SECTIONS.items():
            table = cfg.get(sec)
            if not isinstance(table, dict):
                problems.append(f"[{sec}]: missing table")
                continue
            problems += [f"{sec}.{k}: unknown key" for k in table if k not in keys]
            problems += [f"{sec}.{k}: missing required key" for k in keys if k not in table]
            flat.update({k: table[k] for k in keys if k in table})
        problems += [f"[{sec}]: unknown table" for sec in cfg if sec not in cls.SECTIONS]
        if problems:
            raise ConfigError(f"{path}: " + "; ".join(problems))
        return validate_config(cls, flat, path, key_names={
            k: f"{sec}.{k}" for sec, keys in cls.SECTIONS.items() for k in keys})


@dataclass
class GateCheck:
    """One named check with its numbers. ``review``: passed, but the console must ask the
    clinician to look (a plausible-but-unusual value)."""

    name: str
    passed: bool
    message: str
    level: str  # "rigid" | "deformable" | "contours"
    values: dict = field(default_factory=dict)
    blocking: bool = True
    review: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def item(self) -> CheckItem:
        v = next((float(x) for x in self.values.values() if isinstance(x, (int, float))
                  and not isinstance(x, bool)), None)
        return CheckItem(self.name, bool(self.passed), self.message, blocking=self.blocking,
                         value=v)


@dataclass
class RegistrationVerdict:
    """The gate's result for one registration: which mapping may be used and why."""

    checks: list[GateCheck]

    def _ok(self, level: str) -> bool:
        return all(c.passed for c in self.checks if c.level == level and c.blocking)

    @property
    def rigid_valid(self) -> bool:
        return self._ok("rigid")

    @property
    def deformable_valid(self) -> bool:
        return self.rigid_valid and self._ok("deformable")

    @property
    def validity(self) -> str:
        return DEFORMABLE if self.deformable_valid else RIGID if self.rigid_valid else NONE

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if c.blocking and not c.passed]

    @property
    def reviews(self) -> list[GateCheck]:
        return [c for c in self.checks if c.review]

    def summary(self) -> str:
        if not self.failures:
            return "all registration checks passed"
        return "; ".join(f"{c.name}: {c.message}" for c in self.failures)

    def to_record(self) -> dict:
        return {"validity": self.validity, "checks": [c.to_dict() for c in self.checks],
                "failed": [c.name for c in self.failures],
                "reviews": [c.name for c in self.reviews], "summary": self.summary()}


def _min_check(name, level, value, limit, what, unit="") -> GateCheck:
    if value is None or not np.isfinite(value):
        return GateCheck(name, False, f"{what} could not be measured", level,
                         {"value": None, "min": limit})
    ok = value >= limit
    return GateCheck(name, bool(ok), f"{what} {value:.4g}{unit} ({'≥' if ok else '<'} "
                     f"minimum {limit:g}{unit})", level, {"value": float(value), "min": limit})


def _max_check(name, level, value, limit, what, unit="") -> GateCheck:
    if value is None or not np.isfinite(value):
        return GateCheck(name, False, f"{what} could not be measured", level,
                         {"value": None, "max": limit})
    ok = value <= limit
    return GateCheck(name, bool(ok), f"{what} {value:.3g}{unit} ({'≤' if ok else '>'} "
                     f"maximum {limit:g}{unit})", level, {"value": float(value), "max": limit})


def _review_limit(name, value, review, limit, what, unit, convention) -> GateCheck:
    vals = {"value": float(value), "review": review, "max": limit, "convention": convention}
    if value > limit:
        return GateCheck(name, False, f"{what} {value:.1f}{unit} relative to the {convention} "
                         f"convention exceeds {limit:g}{unit}: the CBCT's position or frame "
                         f"convention is wrong", "rigid", vals)
    if value > review:
        return GateCheck(name, True, f"REVIEW: {what} {value:.1f}{unit} relative to the "
                         f"{convention} convention (beyond {review:g}{unit}): confirm the setup "
                         f"before choosing the adapted plan", "rigid", vals, review=True)
    return GateCheck(name, True, f"{what} {value:.1f}{unit} relative to the {convention} "
                     f"convention (≤ {review:g}{unit})", "rigid", vals)


def _residual(v: dict | None) -> float | None:
    return None if not v else v.get("residual", {}).get("residual_norm_mm")


def registration_gate(quality: dict, fallback: str | None, s: SafetySettings,
                      target: dict | None = None) -> RegistrationVerdict:
    """The rigid and deformable checks of one registration from its quality record
    (:func:`adaptive.registration.core.register`) and, when known, the target region's
    residual shift (``target``: ``{"name", "residual_norm_mm", ...}``)."""
    vr = quality.get("validity_rigid") or {}
    vf = quality.get("validity_final") or {}
    ch = [_min_check("registration_content", "rigid", quality.get("tissue_fraction_fov"),
                     s.min_tissue_fraction, "share of the CBCT field of view showing tissue"),
          _min_check("rigid_similarity", "rigid", vr.get("nmi"), s.min_nmi_rigid,
                     "normalised mutual information after the rigid match"),
          _min_check("rigid_body_outline", "rigid", vr.get("body_dice"), s.min_body_dice_rigid,
                     "body-outline Dice after the rigid match"),
          _max_check("rigid_converged", "rigid", _residual(vr), s.max_residual_rigid_mm,
                     "residual shift of the rigid match", " mm")]
    sc = quality.get("setup_correction")
    if sc:
        ch.append(_review_limit("setup_translation", sc["translation_norm_mm"],
                                s.review_translation_mm, s.max_translation_mm,
                                "setup correction", " mm", sc["convention"]))
        ch.append(_review_limit("setup_rotation", sc["rotation_deg"], s.review_rotation_deg,
                                s.max_rotation_deg, "setup rotation", "°", sc["convention"]))
    # deformable result
    ch.append(_min_check("registration_similarity", "deformable", vf.get("nmi"), s.min_nmi,
                         "normalised mutual information after registration"))
    ch.append(_min_check("registration_body_outline", "deformable", vf.get("body_dice"),
                         s.min_body_dice, "body-outline Dice after registration"))
    ch.append(_max_check("registration_converged", "deformable", _residual(vf),
                         s.max_residual_mm, "residual shift of the result (body)", " mm"))
    if target is not None and target.get("nmi", 2.0) - 1.0 < s.min_target_information:
        # too little shared image information around the target to measure an offset there
        # (a low-contrast lesion): not verifiable from the images - the clinician must look
        ch.append(GateCheck(
            "registration_converged_target", True,
            f"REVIEW: the region around {target.get('name', 'the target')} shows too little "
            f"image information to verify the registration there (NMI "
            f"{target.get('nmi', float('nan')):.3f} < {1.0 + s.min_target_information:.3f}): "
            f"check the review images", "deformable",
            {"nmi": target.get("nmi"), "min_information": s.min_target_information,
             "residual_mm": target.get("residual_norm_mm")}, review=True))
    elif target is not None:
        lb = target.get("lower_bound_mm", target.get("residual_norm_mm"))
        c = _max_check("registration_converged_target", "deformable", lb,
                       s.max_target_residual_mm,
                       f"residual shift of the result around {target.get('name', 'the target')} "
                       f"(lower bound: {target.get('residual_norm_mm', float('nan')):.2f} mm "
                       f"measured, uncertainty {target.get('uncertainty_mm', 0.0):.2f} mm)",
                       " mm")
        c.values.update(residual_mm=target.get("residual_norm_mm"),
                        uncertainty_mm=target.get("uncertainty_mm"))
        ch.append(c)
    dm, dx = quality.get("deformation_mean_mm"), quality.get("deformation_max_mm")
    if dm is None or dx is None:
        ch.append(GateCheck("registration_deformation", False,
                            "no deformation figures in the registration record", "deformable"))
    else:
        ok = dm <= s.max_deformation_mean_mm and dx <= s.max_deformation_mm
        ch.append(GateCheck("registration_deformation", bool(ok),
                            f"deformation beyond the rigid part: mean {dm:.1f} mm (maximum "
                            f"{s.max_deformation_mean_mm:g}), largest {dx:.1f} mm (maximum "
                            f"{s.max_deformation_mm:g})", "deformable",
                            {"mean_mm": dm, "max_mm": dx, "max_mean_mm": s.max_deformation_mean_mm,
                             "max_max_mm": s.max_deformation_mm}))
    ch += [_jacobian_check(quality, s)]
    if fallback:
        ch.append(GateCheck("registration_fallback", s.allow_rigid_fallback,
                            f"registration fell back to its {fallback} result "
                            f"({quality.get('fallback_reason', 'no reason recorded')}): "
                            f"contours and synthetic CT are rigidly mapped", "deformable",
                            blocking=not s.allow_rigid_fallback))
    return RegistrationVerdict(ch)


def _jacobian_check(quality: dict, s: SafetySettings) -> GateCheck:
    jmin = quality.get("jacobian_min")
    folded = quality.get("jacobian_fraction_nonpositive")
    if jmin is None or folded is None:
        return GateCheck("registration_jacobian", False,
                         "registration quality has no Jacobian figures", "deformable")
    ok = jmin > s.min_jacobian and folded <= s.max_fraction_folded
    return GateCheck("registration_jacobian", bool(ok),
                     f"Jacobian determinant min {jmin:.3f} (must be > {s.min_jacobian:g}), "
                     f"folded fraction {100 * folded:.4f} % (allowed "
                     f"{100 * s.max_fraction_folded:.4f} %)", "deformable",
                     {"min": float(jmin), "folded_fraction": float(folded)})


def registration_checks(quality: dict, fallback: str | None,
                        s: SafetySettings) -> list[CheckItem]:
    """The deformable-level checks as plan check items (for a record without a verdict)."""
    v = registration_gate(quality, fallback, s)
    return [c.item() for c in v.checks if c.level == "deformable"]


# --- contours ---------------------------------------------------------------------------------


def roi_volumes_cc(ss: StructureSet, grid) -> dict[str, float]:
    """Volume (cm³) of every ROI of ``ss`` rasterised on ``grid``."""
    return {r.name: float(ss.mask(r.name, grid).sum()) * grid.voxel_volume_mm3 / 1000.0
            for r in ss.rois}


def touches_boundary(mask: np.ndarray) -> bool:
    """Whether a (z, y, x) mask has a voxel on any face of its grid."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())


def contour_checks(roi_fov: dict[str, dict], today: StructureSet, grid,
                   required: list[str], target: str, interpreted_types: dict[str, str],
                   s: SafetySettings) -> list[CheckItem]:
    """Sanity of today's (propagated) contours on ``grid``, field-of-view aware.

    ``roi_fov``: per planning ROI ``{"planned_cc", "planned_in_fov_cc", "share_in_fov",
    "touches_fov_edge"}`` from the registration stage (:func:`adaptive.registration.validity.
    roi_field_of_view`). Today's volume is compared with the part of the planned organ that
    maps into the CBCT's field of view, so an organ that extends beyond the CBCT is not
    mistaken for one that shrank; an organ with less than ``min_share_in_fov`` of its volume
    inside is reported, not compared. The target must lie wholly inside the field of view."""
    items = []
    today_vol, missing = {}, []
    fov = {k.lower(): v for k, v in roi_fov.items()}
    for name in required:
        if name not in today:
            missing.append(f"{name} (absent)")
            continue
        m = today.mask(name, grid)
        if not m.any():
            missing.append(f"{name} (empty)")
            continue
        today_vol[name] = float(m.sum()) * grid.voxel_volume_mm3 / 1000.0
    items.append(CheckItem("contours_present", not missing,
                           "all ROIs of the goals present on today's anatomy" if not missing
                           else "missing on today's anatomy: " + ", ".join(missing)))
    t = fov.get(target.lower())
    if t is None:
        items.append(CheckItem("target_inside_fov", False,
                               f"no field-of-view figures for the target {target}"))
    else:
        inside = t["share_in_fov"] >= s.target_min_share_in_fov and not t["touches_fov_edge"]
        items.append(CheckItem(
            "target_inside_fov", bool(inside),
            f"target {target}: {100 * t['share_in_fov']:.1f} % of the planned volume maps into "
            f"the CBCT field of view (minimum {100 * s.target_min_share_in_fov:g} %)"
            + ("; today's target touches the edge of the field of view"
               if t["touches_fov_edge"] else ""), value=float(t["share_in_fov"])))
    bad, notes = [], []
    for name, v in today_vol.items():
        ref = fov.get(name.lower())
        if not ref or not ref.get("planned_in_fov_cc"):
            bad.append(f"{name}: no planned volume inside the field of view")
            continue
        if ref["share_in_fov"] < s.min_share_in_fov and name.lower() != target.lower():
            notes.append(f"{name} only {100 * ref['share_in_fov']:.0f} % in the field of view "
                         f"(not compared)")
            continue
        ratio = v / ref["planned_in_fov_cc"]
        kind = interpreted_types.get(name, "").upper()
        lo, hi = s.target_volume_ratio if (kind in TARGET_TYPES or name.lower() == target.lower()) \
            else s.organ_volume_ratio
        notes.append(f"{name} {ratio:.2f}")
        if not (lo <= ratio <= hi):
            bad.append(f"{name}: {v:.1f} cc today vs {ref['planned_in_fov_cc']:.1f} cc of the "
                       f"planned organ inside the field of view (ratio {ratio:.2f}, allowed "
                       f"{lo:g}-{hi:g})")
    items.append(CheckItem("contour_volumes", not bad,
                           ("volume ratios today / planned inside the field of view: "
                            + ", ".join(notes)) if not bad else "; ".join(bad)))
    return items
