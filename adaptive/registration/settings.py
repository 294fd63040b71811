"""Registration configuration: ``config/registration.toml`` → typed settings + elastix maps.

Every table is a typed model (:class:`RegistrationFile`): unknown keys, wrong types and values
out of bounds are a :class:`~adaptive.errors.ConfigError` naming the file and the key, never a
silent default. The ``[elastix.<stage>]`` tables are elastix parameter maps; their
values are converted to the lists of strings elastix expects.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from adaptive.config import (
    CONFIG_MODEL,
    Bool,
    Float,
    Int,
    Str,
    config_path,
    load_toml,
    validate_config,
)
from adaptive.errors import ConfigError
from adaptive.registration.initialization import InitSettings
from adaptive.registration.shading import ShadingSettings

DEFAULT_CONFIG = config_path("registration.toml")

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


def _elastix_parameter(v: Any) -> list[str]:
    try:
        return elastix_value(v, "value")
    except ConfigError:
        raise ValueError("unsupported elastix parameter value: expected a string, number, "
                         "true/false or a non-empty array of those") from None


def _not_reserved(m: dict[str, list[str]]) -> dict[str, list[str]]:
    bad = sorted(set(m) & _RESERVED)
    if bad:
        raise ValueError(f"{bad} are set by the code per run")
    return m


#: an ``[elastix.<stage>]`` table: elastix parameter name → its list-of-strings value
ParameterMap = Annotated[dict[Str, Annotated[Any, AfterValidator(_elastix_parameter)]],
                         AfterValidator(_not_reserved)]


def _intensity_window(v: list[float]) -> tuple[float, float] | None:
    if len(v) not in (0, 2) or (len(v) == 2 and v[0] >= v[1]):
        raise ValueError(f"expected [] or [low, high] HU with low < high, got {v!r}")
    return (v[0], v[1]) if v else None


NonNegative = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]
_INIT = InitSettings()      # the initial alignment's and the shading's defaults live in their
_SHADING = ShadingSettings()  # own modules' settings


# --- the file's tables (the field defaults are the defaults of a missing key) ----------------

@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class RegistrationTable:
    """``[registration]``."""

    threads: Annotated[Int, Field(ge=1, le=256)] = 2
    random_seed: Annotated[Int, Field(ge=0)] = 1
    moving_crop_margin_mm: NonNegative = 30.0
    deformable_in_subprocess: Bool = True
    default_budget_s: NonNegative = 0.0
    finish_reserve_s: NonNegative = 1.0
    min_deformable_s: NonNegative = 0.5
    #: ``[]`` (off) or ``[low, high]`` HU; read as ``None`` or ``(low, high)``
    intensity_window_hu: Annotated[list[Float], AfterValidator(_intensity_window)] = Field(
        default_factory=list, validate_default=True)
    working_voxel_mm: Annotated[Float, Field(ge=0, le=10)] = 0.0


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class InitialAlignmentTable:
    """``[initial_alignment]`` (:class:`InitSettings`)."""

    use_isocenter: Bool = _INIT.use_isocenter
    use_image_centres: Bool = _INIT.use_image_centres
    use_identity: Bool = _INIT.use_identity
    use_body_centroids: Bool = _INIT.use_body_centroids
    search: Bool = _INIT.search
    search_range_mm: Annotated[Float, Field(ge=0, le=500)] = _INIT.search_range_mm
    search_step_mm: Annotated[Float, Field(ge=1, le=200)] = _INIT.search_step_mm
    final_step_mm: Annotated[Float, Field(ge=0.5, le=200)] = _INIT.final_step_mm
    refine_best: Annotated[Int, Field(ge=1, le=20)] = _INIT.refine_best
    coarse_voxel_mm: Annotated[Float, Field(ge=1, le=30)] = _INIT.coarse_voxel_mm
    samples: Annotated[Int, Field(ge=100, le=100000)] = _INIT.samples
    bins: Annotated[Int, Field(ge=8, le=256)] = _INIT.bins
    dedupe_mm: NonNegative = _INIT.dedupe_mm


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class FixedMaskTable:
    """``[fixed_mask]``."""

    erode_mm: NonNegative = 4.0
    min_valid_fraction: Fraction = 0.02


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class BodyTable:
    """``[body]``."""

    threshold_hu: Float = -500.0
    smoothing_mm: NonNegative = 2.0


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class QualityTable:
    """``[quality]``."""

    min_overlap_fraction: Fraction = 0.3
    max_fraction_folded: Fraction = 0.0005
    max_deformation_mm: NonNegative = 40.0
    min_intensity_std: NonNegative = 1.0
    mi_bins: Annotated[Int, Field(ge=4, le=512)] = 32
    subsample: Annotated[Int, Field(ge=1, le=8)] = 2


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class SyntheticCtTable:
    """``[synthetic_ct]`` (HU, mm, mm³)."""

    air_hu: Float = -1000.0
    smoothing_mm: NonNegative = 2.0
    gas_offset_hu: Annotated[Float, Field(ge=50)] = 550.0
    min_gas_volume_mm3: NonNegative = 50.0
    body_offset_hu: Annotated[Float, Field(ge=50)] = 500.0
    planned_gas_hu: Float = -400.0
    tissue_fill_hu: Float = 0.0


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class PropagationTable:
    """``[propagation]``."""

    threshold: Annotated[Float, Field(ge=0.01, le=0.99)] = 0.5


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class ShadingTable:
    """``[shading]`` (:class:`ShadingSettings`)."""

    enabled: Bool = _SHADING.enabled
    sigma_mm: Annotated[Float, Field(ge=1.0)] = _SHADING.sigma_mm
    tissue_window_hu: Annotated[Float, Field(ge=10.0)] = _SHADING.tissue_window_hu
    max_gradient_hu_per_mm: Annotated[Float, Field(ge=0.1)] = _SHADING.max_gradient_hu_per_mm
    outlier_hu: Annotated[Float, Field(ge=1.0)] = _SHADING.outlier_hu
    iterations: Annotated[Int, Field(ge=0, le=10)] = _SHADING.iterations
    min_support_fraction: Fraction = _SHADING.min_support_fraction


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class ElastixTables:
    """``[elastix.rigid]`` and ``[elastix.bspline]``: elastix parameter maps passed through
    (values converted to elastix's strings; the parameters the code sets per run,
    :data:`_RESERVED`, are refused)."""

    rigid: ParameterMap
    bspline: ParameterMap


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class RegistrationFile:
    """``config/registration.toml``: ``[registration]`` and ``[elastix]`` required, the
    other tables optional (their defaults)."""

    registration: RegistrationTable
    elastix: ElastixTables
    initial_alignment: InitialAlignmentTable = InitialAlignmentTable()
    fixed_mask: FixedMaskTable = FixedMaskTable()
    body: BodyTable = BodyTable()
    quality: QualityTable = QualityTable()
    synthetic_ct: SyntheticCtTable = SyntheticCtTable()
    propagation: PropagationTable = PropagationTable()
    shading: ShadingTable = ShadingTable()


@dataclass
class RegistrationSettings:
    """Typed view of ``registration.toml`` (see the file for units and meanings); built by
    :func:`load_registration_settings` (the defaults are those of :class:`RegistrationFile`)."""

    raw: dict
    source: str
    threads: int
    random_seed: int
    moving_crop_margin_mm: float
    deformable_in_subprocess: bool
    default_budget_s: float
    finish_reserve_s: float
    min_deformable_s: float
    intensity_window_hu: tuple[float, float] | None
    working_voxel_mm: float
    init: InitSettings
    mask_erode_mm: float
    min_valid_fraction: float
    body_threshold_hu: float
    body_smoothing_mm: float
    quality: dict
    synthetic_ct: dict
    propagation_threshold: float
    shading: ShadingSettings
    elastix: dict[str, dict[str, list[str]]]

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


def load_registration_settings(path: str | Path | dict | RegistrationSettings | None = None
                               ) -> RegistrationSettings:
    """Load settings from a TOML path, a dict (same structure), or the repository default.
    Unknown keys, wrong types and values out of bounds are :class:`ConfigError` naming the
    file (``<dict>`` for a dict) and the key."""
    if isinstance(path, RegistrationSettings):
        return path
    if isinstance(path, dict):
        raw, src = copy.deepcopy(path), "<dict>"
    else:
        p = Path(path) if path is not None else DEFAULT_CONFIG
        raw, src = load_toml(p), str(p)
    f = validate_config(RegistrationFile, raw, src)
    r = f.registration
    return RegistrationSettings(
        raw=raw, source=src,
        threads=r.threads, random_seed=r.random_seed,
        moving_crop_margin_mm=r.moving_crop_margin_mm,
        deformable_in_subprocess=r.deformable_in_subprocess,
        default_budget_s=r.default_budget_s, finish_reserve_s=r.finish_reserve_s,
        min_deformable_s=r.min_deformable_s, intensity_window_hu=r.intensity_window_hu,
        working_voxel_mm=r.working_voxel_mm,
        init=InitSettings(**asdict(f.initial_alignment), random_seed=r.random_seed),
        mask_erode_mm=f.fixed_mask.erode_mm, min_valid_fraction=f.fixed_mask.min_valid_fraction,
        body_threshold_hu=f.body.threshold_hu, body_smoothing_mm=f.body.smoothing_mm,
        quality=asdict(f.quality), synthetic_ct=asdict(f.synthetic_ct),
        propagation_threshold=f.propagation.threshold,
        shading=ShadingSettings(**asdict(f.shading)),
        elastix={"rigid": f.elastix.rigid, "bspline": f.elastix.bspline})
