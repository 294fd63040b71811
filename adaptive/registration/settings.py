"""Registration configuration: ``config/registration.toml`` → typed settings + elastix maps.

Every table is checked for unknown keys (a typo is a :class:`~adaptive.errors.ConfigError`,
never a silent default). The ``[elastix.<stage>]`` tables are elastix parameter maps; their
values are converted to the lists of strings elastix expects.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive.config import check_keys, config_path, get_number, load_toml
from adaptive.errors import ConfigError
from adaptive.registration.initialization import InitSettings
from adaptive.registration.shading import ShadingSettings

DEFAULT_CONFIG = config_path("registration.toml")

_SECTIONS = {
    "registration": {"threads", "random_seed", "moving_crop_margin_mm", "deformable_in_subprocess",
                     "default_budget_s", "finish_reserve_s", "min_deformable_s",
                     "intensity_window_hu", "working_voxel_mm"},
    "initial_alignment": {"use_isocenter", "use_image_centres", "use_identity",
                          "use_body_centroids", "search", "search_range_mm", "search_step_mm",
                          "final_step_mm", "refine_best", "coarse_voxel_mm", "samples", "bins",
                          "dedupe_mm"},
    "fixed_mask": {"erode_mm", "min_valid_fraction"},
    "body": {"threshold_hu", "smoothing_mm"},
    "quality": {"min_overlap_fraction", "max_fraction_folded", "max_deformation_mm",
                "min_intensity_std", "mi_bins", "subsample"},
    "synthetic_ct": {"air_hu", "smoothing_mm", "gas_offset_hu", "min_gas_volume_mm3",
                     "body_offset_hu", "planned_gas_hu", "tissue_fill_hu"},
    "propagation": {"threshold"},
    "shading": {"enabled", "sigma_mm", "tissue_window_hu", "max_gradient_hu_per_mm", "outlier_hu",
                "iterations", "min_support_fraction"},
    "elastix": {"rigid", "bspline"},
}
# elastix parameters we set ourselves (per run); a config must not set them.
_RESERVED = {"RandomSeed", "Size", "Spacing", "Origin", "Direction", "Index",
             "TransformParameters", "InitialTransformParametersFileName"}


def elastix_value(v: Any, where: str) -> list[str]:
    """One TOML value → elastix's list-of-strings form."""
    if isinstance(v, bool):
        return ["true" if v else "false"]
    if isinstance(v, (int, float)):
        return [repr(v) if isinstance(v, float) else str(v)]
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(not isinstance(x, (list, dict)) for x in v):
        return [s for x in v for s in elastix_value(x, where)]
    raise ConfigError(f"{where}: unsupported elastix parameter value {v!r}")


@dataclass
class RegistrationSettings:
    """Typed view of ``registration.toml`` (see the file for units and meanings)."""

    raw: dict
    source: str
    threads: int = 2
    random_seed: int = 1
    moving_crop_margin_mm: float = 30.0
    deformable_in_subprocess: bool = True
    default_budget_s: float = 0.0
    finish_reserve_s: float = 1.0
    min_deformable_s: float = 0.5
    intensity_window_hu: tuple[float, float] | None = None
    working_voxel_mm: float = 0.0
    init: InitSettings = field(default_factory=InitSettings)
    mask_erode_mm: float = 4.0
    min_valid_fraction: float = 0.02
    body_threshold_hu: float = -500.0
    body_smoothing_mm: float = 2.0
    quality: dict = field(default_factory=dict)
    synthetic_ct: dict = field(default_factory=dict)
    propagation_threshold: float = 0.5
    shading: ShadingSettings = field(default_factory=ShadingSettings)
    elastix: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def parameter_map(self, stage: str) -> dict[str, list[str]]:
        """A fresh copy of the elastix parameter map of ``stage`` ("rigid" or "bspline")."""
        if stage not in self.elastix:
            raise ConfigError(f"{self.source}: no [elastix.{stage}] table")
        m = copy.deepcopy(self.elastix[stage])
        m["RandomSeed"] = [str(int(self.random_seed))]
        return m

    def to_dict(self) -> dict:
        """Everything that determines the result (for provenance / registration.json)."""
        d = copy.deepcopy(self.raw)
        d["source"] = self.source
        return d


def _bool(section: dict, key: str, where: str, default: bool) -> bool:
    v = section.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key}: expected true/false, got {v!r}")
    return v


def load_registration_settings(path: str | Path | dict | RegistrationSettings | None = None
                               ) -> RegistrationSettings:
    """Load settings from a TOML path, a dict (same structure), or the repository default."""
    if isinstance(path, RegistrationSettings):
        return path
    if isinstance(path, dict):
        raw, src = copy.deepcopy(path), "<dict>"
    else:
        p = Path(path) if path is not None else DEFAULT_CONFIG
        raw, src = load_toml(p), str(p)
    check_keys(raw, set(_SECTIONS), src, required={"registration", "elastix"})
    for name, allowed in _SECTIONS.items():
        sec = raw.get(name, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{src}: [{name}] must be a table")
        check_keys(sec, allowed, f"{src} [{name}]")
    r = raw["registration"]
    w = f"{src} [registration]"
    s = RegistrationSettings(raw=raw, source=src)
    s.threads = int(get_number(r, "threads", w, minimum=1, maximum=256, default=2))
    s.random_seed = int(get_number(r, "random_seed", w, minimum=0, default=1))
    s.moving_crop_margin_mm = get_number(r, "moving_crop_margin_mm", w, minimum=0, default=30.0)
    s.deformable_in_subprocess = _bool(r, "deformable_in_subprocess", w, True)
    s.default_budget_s = get_number(r, "default_budget_s", w, minimum=0, default=0.0)
    s.finish_reserve_s = get_number(r, "finish_reserve_s", w, minimum=0, default=1.0)
    s.min_deformable_s = get_number(r, "min_deformable_s", w, minimum=0, default=0.5)
    s.working_voxel_mm = get_number(r, "working_voxel_mm", w, minimum=0, maximum=10,
                                    default=0.0)
    win = r.get("intensity_window_hu", [])
    if not isinstance(win, list) or len(win) not in (0, 2) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in win) or (
            len(win) == 2 and win[0] >= win[1]):
        raise ConfigError(f"{w}.intensity_window_hu: expected [] or [low, high] HU with "
                          f"low < high, got {win!r}")
    s.intensity_window_hu = (float(win[0]), float(win[1])) if win else None
    ia = raw.get("initial_alignment", {})
    wi = f"{src} [initial_alignment]"
    di = InitSettings()
    s.init = InitSettings(
        use_isocenter=_bool(ia, "use_isocenter", wi, di.use_isocenter),
        use_image_centres=_bool(ia, "use_image_centres", wi, di.use_image_centres),
        use_identity=_bool(ia, "use_identity", wi, di.use_identity),
        use_body_centroids=_bool(ia, "use_body_centroids", wi, di.use_body_centroids),
        search=_bool(ia, "search", wi, di.search),
        search_range_mm=get_number(ia, "search_range_mm", wi, minimum=0, maximum=500,
                                   default=di.search_range_mm),
        search_step_mm=get_number(ia, "search_step_mm", wi, minimum=1, maximum=200,
                                  default=di.search_step_mm),
        final_step_mm=get_number(ia, "final_step_mm", wi, minimum=0.5, maximum=200,
                                 default=di.final_step_mm),
        refine_best=int(get_number(ia, "refine_best", wi, minimum=1, maximum=20,
                                   default=di.refine_best)),
        coarse_voxel_mm=get_number(ia, "coarse_voxel_mm", wi, minimum=1, maximum=30,
                                   default=di.coarse_voxel_mm),
        samples=int(get_number(ia, "samples", wi, minimum=100, maximum=100000,
                               default=di.samples)),
        bins=int(get_number(ia, "bins", wi, minimum=8, maximum=256, default=di.bins)),
        dedupe_mm=get_number(ia, "dedupe_mm", wi, minimum=0, default=di.dedupe_mm),
        random_seed=s.random_seed)
    fm = raw.get("fixed_mask", {})
    s.mask_erode_mm = get_number(fm, "erode_mm", f"{src} [fixed_mask]", minimum=0, default=4.0)
    s.min_valid_fraction = get_number(fm, "min_valid_fraction", f"{src} [fixed_mask]",
                                      minimum=0, maximum=1, default=0.02)
    b = raw.get("body", {})
    s.body_threshold_hu = get_number(b, "threshold_hu", f"{src} [body]", default=-500.0)
    s.body_smoothing_mm = get_number(b, "smoothing_mm", f"{src} [body]", minimum=0, default=2.0)
    q = raw.get("quality", {})
    wq = f"{src} [quality]"
    s.quality = {
        "min_overlap_fraction": get_number(q, "min_overlap_fraction", wq, minimum=0, maximum=1,
                                           default=0.3),
        "max_fraction_folded": get_number(q, "max_fraction_folded", wq, minimum=0, maximum=1,
                                          default=0.0005),
        "max_deformation_mm": get_number(q, "max_deformation_mm", wq, minimum=0, default=40.0),
        "min_intensity_std": get_number(q, "min_intensity_std", wq, minimum=0, default=1.0),
        "mi_bins": int(get_number(q, "mi_bins", wq, minimum=4, maximum=512, default=32)),
        "subsample": int(get_number(q, "subsample", wq, minimum=1, maximum=8, default=2)),
    }
    sc = raw.get("synthetic_ct", {})
    ws = f"{src} [synthetic_ct]"
    s.synthetic_ct = {
        "air_hu": get_number(sc, "air_hu", ws, default=-1000.0),
        "smoothing_mm": get_number(sc, "smoothing_mm", ws, minimum=0, default=2.0),
        "gas_offset_hu": get_number(sc, "gas_offset_hu", ws, minimum=50, default=550.0),
        "min_gas_volume_mm3": get_number(sc, "min_gas_volume_mm3", ws, minimum=0, default=50.0),
        "body_offset_hu": get_number(sc, "body_offset_hu", ws, minimum=50, default=500.0),
        "planned_gas_hu": get_number(sc, "planned_gas_hu", ws, default=-400.0),
        "tissue_fill_hu": get_number(sc, "tissue_fill_hu", ws, default=0.0),
    }
    s.propagation_threshold = get_number(raw.get("propagation", {}), "threshold",
                                         f"{src} [propagation]", minimum=0.01, maximum=0.99,
                                         default=0.5)
    sh = raw.get("shading", {})
    wsh = f"{src} [shading]"
    d = ShadingSettings()  # the defaults live in one place
    s.shading = ShadingSettings(
        enabled=_bool(sh, "enabled", wsh, d.enabled),
        sigma_mm=get_number(sh, "sigma_mm", wsh, minimum=1.0, default=d.sigma_mm),
        tissue_window_hu=get_number(sh, "tissue_window_hu", wsh, minimum=10.0,
                                    default=d.tissue_window_hu),
        max_gradient_hu_per_mm=get_number(sh, "max_gradient_hu_per_mm", wsh, minimum=0.1,
                                          default=d.max_gradient_hu_per_mm),
        outlier_hu=get_number(sh, "outlier_hu", wsh, minimum=1.0, default=d.outlier_hu),
        iterations=int(get_number(sh, "iterations", wsh, minimum=0, maximum=10,
                                  default=d.iterations)),
        min_support_fraction=get_number(sh, "min_support_fraction", wsh, minimum=0.0,
                                        maximum=1.0, default=d.min_support_fraction))
    el = raw["elastix"]
    for stage in ("rigid", "bspline"):
        if stage not in el:
            raise ConfigError(f"{src}: missing [elastix.{stage}] table")
        table = el[stage]
        if not isinstance(table, dict):
            raise ConfigError(f"{src}: [elastix.{stage}] must be a table")
        bad = sorted(set(table) & _RESERVED)
        if bad:
            raise ConfigError(f"{src} [elastix.{stage}]: {bad} are set by the code per run")
        s.elastix[stage] = {k: elastix_value(v, f"{src} [elastix.{stage}].{k}")
                            for k, v in table.items()}
    return s
