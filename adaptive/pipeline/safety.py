"""Hand-off safety checks beyond the plan's own (registration Jacobian, contour sanity).

The plan's own checks (dose recalculation, MU sanity, deliverability) are in
:mod:`adaptive.optimization.checks`; these add what the adapted plan rests on:

* ``registration_jacobian``: the registration's Jacobian determinant inside the CBCT's valid
  field of view is > ``min_jacobian`` everywhere (no folding, AAPM TG-132);
* ``registration_fallback``: a rigid fallback is flagged (blocking only when
  ``allow_rigid_fallback`` is false);
* ``contours_present``: every ROI the goals use exists on today's anatomy and is not empty;
* ``contour_volumes``: propagated/planning volume ratio within the configured range
  (targets near-rigid, organs may fill/empty);
* ``target_inside_image``: the target does not touch the CBCT grid boundary (not truncated).

Thresholds live in ``config/safety.toml`` (unknown keys are errors). Volumes in cm³.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptive.config import check_keys, config_path, load_toml
from adaptive.errors import ConfigError
from adaptive.model.structures import StructureSet
from adaptive.optimization.checks import CheckItem

TARGET_TYPES = {"PTV", "CTV", "GTV"}


@dataclass(frozen=True)
class SafetySettings:
    min_jacobian: float = 0.0
    max_fraction_folded: float = 0.0
    allow_rigid_fallback: bool = True
    target_volume_ratio: tuple[float, float] = (0.80, 1.25)
    organ_volume_ratio: tuple[float, float] = (0.20, 5.0)
    target_may_touch_grid_boundary: bool = False

    @classmethod
    def load(cls, path: str | Path | None = None) -> SafetySettings:
        path = Path(path) if path else config_path("safety.toml")
        cfg = load_toml(path)
        check_keys(cfg, {"registration", "contours"}, str(path), required={"registration",
                                                                            "contours"})
        reg, con = cfg["registration"], cfg["contours"]
        check_keys(reg, {"min_jacobian", "max_fraction_folded", "allow_rigid_fallback"},
                   f"{path}[registration]", required={"min_jacobian", "max_fraction_folded",
                                                      "allow_rigid_fallback"})
        check_keys(con, {"target_volume_ratio", "organ_volume_ratio",
                         "target_may_touch_grid_boundary"}, f"{path}[contours]",
                   required={"target_volume_ratio", "organ_volume_ratio",
                             "target_may_touch_grid_boundary"})

        def pair(key):
            v = con[key]
            if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, (int, float))
                                                                  for x in v) or v[0] >= v[1]):
                raise ConfigError(f"{path}[contours].{key}: expected [low, high], got {v!r}")
            return (float(v[0]), float(v[1]))

        return cls(min_jacobian=float(reg["min_jacobian"]),
                   max_fraction_folded=float(reg["max_fraction_folded"]),
                   allow_rigid_fallback=bool(reg["allow_rigid_fallback"]),
                   target_volume_ratio=pair("target_volume_ratio"),
                   organ_volume_ratio=pair("organ_volume_ratio"),
                   target_may_touch_grid_boundary=bool(con["target_may_touch_grid_boundary"]))


def roi_volumes_cc(ss: StructureSet, grid) -> dict[str, float]:
    """Volume (cm³) of every ROI of ``ss`` rasterised on ``grid``."""
    return {r.name: float(ss.mask(r.name, grid).sum()) * grid.voxel_volume_mm3 / 1000.0
            for r in ss.rois}


def touches_boundary(mask: np.ndarray) -> bool:
    """Whether a (z, y, x) mask has a voxel on any face of its grid."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())


def registration_checks(quality: dict, fallback: str | None,
                        s: SafetySettings) -> list[CheckItem]:
    jmin = quality.get("jacobian_min")
    folded = quality.get("jacobian_fraction_nonpositive")
    if jmin is None or folded is None:
        items = [CheckItem("registration_jacobian", False,
                           "registration quality has no Jacobian figures")]
    else:
        ok = jmin > s.min_jacobian and folded <= s.max_fraction_folded
        items = [CheckItem("registration_jacobian", bool(ok),
                           f"Jacobian determinant min {jmin:.3f} (must be > {s.min_jacobian:g}),"
                           f" folded fraction {100 * folded:.4f} % (allowed "
                           f"{100 * s.max_fraction_folded:.4f} %)", value=float(jmin))]
    if fallback:
        items.append(CheckItem("registration_fallback", s.allow_rigid_fallback,
                               f"registration fell back to its {fallback} result: contours and "
                               f"synthetic CT are rigidly mapped",
                               blocking=not s.allow_rigid_fallback))
    return items


def contour_checks(planning_volumes_cc: dict[str, float], today: StructureSet, grid,
                   required: list[str], target: str, interpreted_types: dict[str, str],
                   s: SafetySettings) -> list[CheckItem]:
    """Sanity of today's (propagated) contours on ``grid`` against the planning volumes."""
    items = []
    today_vol, missing = {}, []
    for name in required:
        if name not in today:
            missing.append(f"{name} (absent)")
            continue
        m = today.mask(name, grid)
        if not m.any():
            missing.append(f"{name} (empty)")
            continue
        today_vol[name] = float(m.sum()) * grid.voxel_volume_mm3 / 1000.0
        if name.lower() == target.lower():
            inside = s.target_may_touch_grid_boundary or not touches_boundary(m)
            items.append(CheckItem("target_inside_image", inside,
                                   f"target {name} " + ("lies inside the CBCT grid" if inside else
                                                        "touches the CBCT grid boundary "
                                                        "(truncated by the field of view)")))
    items.insert(0, CheckItem("contours_present", not missing,
                              "all ROIs of the goals present on today's anatomy" if not missing
                              else "missing on today's anatomy: " + ", ".join(missing)))
    bad, notes = [], []
    plan_lower = {k.lower(): v for k, v in planning_volumes_cc.items()}
    for name, v in today_vol.items():
        ref = plan_lower.get(name.lower())
        if not ref:
            bad.append(f"{name}: no planning volume")
            continue
        ratio = v / ref
        kind = interpreted_types.get(name, "").upper()
        lo, hi = s.target_volume_ratio if (kind in TARGET_TYPES or name.lower() == target.lower()) \
            else s.organ_volume_ratio
        notes.append(f"{name} {ratio:.2f}")
        if not (lo <= ratio <= hi):
            bad.append(f"{name}: {v:.1f} cc today vs {ref:.1f} cc planned (ratio {ratio:.2f}, "
                       f"allowed {lo:g}-{hi:g})")
    items.append(CheckItem("contour_volumes", not bad,
                           ("volume ratios today/planned: " + ", ".join(notes)) if not bad
                           else "; ".join(bad)))
    return items
