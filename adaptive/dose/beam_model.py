"""6 MV photon beam model: machine geometry (SAD, jaws, MLC) and the pencil-beam kernel.

The kernel (used identically by the dose-influence matrix and by plan dose) describes the
dose deposited in water by a broad parallel fluence of 1 MU through the isocenter plane,
split in three lateral components, each a normalised 2-D Gaussian in the plane
perpendicular to the beam axis::

    K(r, d) = C * [ P(d) g(r; s_p(d)) + h P(d) g(r; s_h(d)) + S(d) g(r; s_s(d)) ]

with ``d`` the radiological (water-equivalent) depth in mm and

* primary:        P(d) = (1 - exp(-beta d)) exp(-mu d),  s_p(d) = sqrt(s_p0^2 + (c_p d)^2)
* head scatter:   h P(d) (extra-focal fluence from flattening filter / primary collimator),
                  width s_h0 at the isocenter plane (depth independent in projected units)
* phantom scatter: S(d) = k_s d P(d),                     s_s(d) = s_s0 + c_s d

All widths are in mm *at the isocenter plane* (the engine projects a point at source
distance z to the isocenter plane, so a physical width w at z is w * SAD / z there;
see :mod:`adaptive.dose.kernel`). Inverse square is applied separately: fluence per unit
projected area falls as (SAD / z)^2 with z the distance from the source along the beam axis.

``C`` (Gy per MU) is not a free parameter: it is computed on loading so that the central-axis
dose at d_max of a 10 x 10 cm^2 field at SSD 100 cm is exactly ``reference_dose_gy_per_mu``
(0.01 Gy/MU = 1 cGy/MU) for the full (un-truncated) kernel.

The kernel parameters in ``config/beam_model_6mv.toml`` come from a least-squares fit to
published 6 MV water data (BJR Supplement 25 class): d_max 15 mm, PDD(10 cm) = 67 %,
PDD(20 cm) = 38.5 %, 80-20 % penumbra at 10 cm depth 6 mm (10 x 10 cm^2, SSD 100 cm), plus
representative 6 MV total-scatter (output) factors at d_max, S_cp(5 x 5) = 0.945 and
S_cp(20 x 20) = 1.05 (relative to 10 x 10). Reproduce it with
``python -m adaptive.dose.fit_beam_model`` (see that module for the procedure).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from scipy.special import erf

from adaptive.config import CONFIG_MODEL, Bool, Float, Interval, Str, config_path, load_config

NonNegative = Annotated[Float, Field(ge=0)]
Positive = Annotated[Float, Field(gt=0)]


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class KernelParams:
    """Pencil-beam kernel parameters (see module docstring). Lengths in mm, rates per mm.
    Also the ``[kernel]`` table of the beam model file (all keys required)."""

    mu_per_mm: Positive
    buildup_per_mm: Positive
    phantom_scatter_per_mm: NonNegative
    sigma_primary_0_mm: Positive
    sigma_primary_slope: NonNegative
    head_scatter_fraction: NonNegative
    sigma_head_mm: NonNegative
    sigma_scatter_0_mm: Positive
    sigma_scatter_slope: NonNegative

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, k) for k in KERNEL_KEYS], dtype=np.float64)

    @classmethod
    def from_array(cls, a) -> KernelParams:
        return cls(**{k: float(v) for k, v in zip(KERNEL_KEYS, a)})


#: the kernel parameters in the order of :meth:`KernelParams.as_array`
KERNEL_KEYS = tuple(f.name for f in dataclasses.fields(KernelParams))


@dataclass(frozen=True)
class MlcModel:
    """Multi-leaf collimator (leaves travel along IEC X; leaf pairs stacked along IEC Y).

    ``leaf_boundaries_mm``: (n_pairs + 1,) increasing positions along IEC Y at the isocenter plane.
    ``leaf_position_range_mm``: (min, max) reachable leaf-tip position along X at isocenter.
    ``max_leaf_span_mm``: max distance between the most extended and most retracted leaf of a bank
    (carriage limit). ``min_leaf_gap_mm``: min gap between opposing leaves of a pair.
    ``interdigitation_allowed``: whether a leaf may pass the opposing leaf of a neighbouring pair.
    ``transmission``: fraction of open-field fluence through a closed leaf (incl. interleaf).
    """

    leaf_boundaries_mm: np.ndarray
    leaf_position_range_mm: tuple[float, float]
    max_leaf_span_mm: float
    min_leaf_gap_mm: float
    interdigitation_allowed: bool
    transmission: float

    @property
    def n_leaf_pairs(self) -> int:
        return int(len(self.leaf_boundaries_mm) - 1)


@dataclass(frozen=True)
class BeamModel:
    """A photon beam model: machine geometry and dose kernel (see module docstring).

    Jaw ranges are (min, max) positions at the isocenter plane in mm along IEC X / Y.
    ``calibration_gy_per_mu`` = C (Gy/MU), derived on load from the reference condition.
    ``dij_cutoff_mm`` / ``plan_cutoff_mm``: default lateral cut-off radius (mm, isocenter plane)
    of a pencil beam in the dose-influence matrix / in plan dose. ``body_density_threshold``:
    relative electron density above which a voxel counts as patient (body) when no mask is given.
    """

    name: str
    energy_mv: float
    sad_mm: float
    jaw_x_range_mm: tuple[float, float]
    jaw_y_range_mm: tuple[float, float]
    jaw_transmission: float
    mlc: MlcModel
    kernel: KernelParams
    reference_dose_gy_per_mu: float
    reference_field_mm: float
    reference_ssd_mm: float
    dij_cutoff_mm: float
    plan_cutoff_mm: float
    fluence_resolution_mm: float
    body_density_threshold: float
    source: str = ""
    calibration_gy_per_mu: float = field(default=0.0)
    reference_depth_mm: float = field(default=0.0)

    def kernel_array(self) -> np.ndarray:
        """Kernel parameters + C + SAD as a float64 array for the numba kernels."""
        return np.concatenate([self.kernel.as_array(),
                               [self.calibration_gy_per_mu, self.sad_mm]]).astype(np.float64)


# --- reference (numpy) kernel: used for calibration and the fit --------------------------


def kernel_components(d_mm, k: KernelParams, sad_mm: float, z_mm=None):
    """(amplitudes, widths at isocenter plane) of the 3 components at radiological depth d.

    Amplitudes exclude C and inverse square. ``z_mm`` = distance from source along the axis
    (defaults to SAD + d, i.e. SSD = SAD) sets the projection of physical widths.
    """
    d = np.asarray(d_mm, dtype=np.float64)
    z = sad_mm + d if z_mm is None else np.asarray(z_mm, dtype=np.float64)
    proj = sad_mm / z
    p = (1.0 - np.exp(-k.buildup_per_mm * d)) * np.exp(-k.mu_per_mm * d)
    sp = np.sqrt(k.sigma_primary_0_mm ** 2 + (k.sigma_primary_slope * d) ** 2) * proj
    sh = np.sqrt(k.sigma_head_mm ** 2 + sp ** 2)
    ss = (k.sigma_scatter_0_mm + k.sigma_scatter_slope * d) * proj
    return ((p, sp), (k.head_scatter_fraction * p, sh),
            (k.phantom_scatter_per_mm * d * p, ss))


def _edge(a, b, x, s):
    """Integral over [a, b] of a unit 1-D Gaussian of width s centred at x."""
    r = np.sqrt(2.0) * s
    return 0.5 * (erf((b - x) / r) - erf((a - x) / r))


def water_dose_rect(d_mm, x_mm, y_mm, field_x_mm, field_y_mm, k: KernelParams, sad_mm: float,
                    ssd_mm: float, calibration: float = 1.0):
    """Reference dose (Gy/MU, or relative if calibration=1) in a water phantom at SSD ``ssd_mm``
    for an open rectangular field (sizes at the isocenter plane, centred on the axis), at depth
    ``d_mm`` and lateral offsets (x, y) mm measured in the plane at that depth.

    Depth is taken along the axis (the small obliquity of off-axis rays is ignored here; the
    engine ray-traces it exactly). Used to calibrate and fit, and by the tests as truth for
    the analytic model.
    """
    d = np.asarray(d_mm, dtype=np.float64)
    z = ssd_mm + d
    proj = sad_mm / z
    xi, yi = np.asarray(x_mm) * proj, np.asarray(y_mm) * proj
    ax, ay = field_x_mm / 2.0, field_y_mm / 2.0
    tot = 0.0
    for amp, s in kernel_components(d, k, sad_mm, z):
        tot = tot + amp * _edge(-ax, ax, xi, s) * _edge(-ay, ay, yi, s)
    return calibration * proj ** 2 * tot


def reference_calibration(k: KernelParams, sad_mm: float, field_mm: float, ssd_mm: float,
                          dose_gy_per_mu: float) -> tuple[float, float]:
    """(C in Gy/MU, d_max in mm) such that the CAX dose at d_max equals ``dose_gy_per_mu``."""
    d = np.arange(0.0, 60.0, 0.05)
    dd = water_dose_rect(d, 0.0, 0.0, field_mm, field_mm, k, sad_mm, ssd_mm)
    i = int(np.argmax(dd))
    return float(dose_gy_per_mu / dd[i]), float(d[i])


# --- loading -------------------------------------------------------------------------------


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class MachineConfig:
    """``[machine]``."""

    name: Str
    energy_mv: Annotated[Float, Field(ge=0.1)]
    sad_mm: Annotated[Float, Field(ge=1.0)]
    source: Str = ""


Fraction = Annotated[Float, Field(ge=0, le=1)]


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class JawsConfig:
    """``[jaws]``: reachable (min, max) positions in mm at the isocenter plane."""

    x_range_mm: Interval
    y_range_mm: Interval
    transmission: Fraction


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class MlcConfig:
    """``[mlc]`` (see :class:`MlcModel`); leaf widths listed from IEC Y min to max."""

    leaf_widths_mm: Annotated[list[Positive], Field(min_length=1)]
    leaf_position_range_mm: Interval
    max_leaf_span_mm: NonNegative
    min_leaf_gap_mm: NonNegative
    interdigitation_allowed: Bool
    transmission: Fraction


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class CalibrationConfig:
    """``[calibration]``: the reference condition that fixes C (Gy/MU)."""

    reference_dose_gy_per_mu: Annotated[Float, Field(ge=1e-9)]
    reference_field_mm: Annotated[Float, Field(ge=1.0)]
    reference_ssd_mm: Annotated[Float, Field(ge=1.0)]


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class EngineConfig:
    """``[engine]`` (see :class:`BeamModel`)."""

    dij_cutoff_mm: Annotated[Float, Field(ge=1.0)]
    plan_cutoff_mm: Annotated[Float, Field(ge=1.0)]
    fluence_resolution_mm: Annotated[Float, Field(ge=0.1, le=10.0)]
    body_density_threshold: NonNegative


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class BeamModelFile:
    """A beam model TOML file (``config/beam_model_6mv.toml``): every table and key required."""

    machine: MachineConfig
    jaws: JawsConfig
    mlc: MlcConfig
    kernel: KernelParams
    calibration: CalibrationConfig
    engine: EngineConfig


def load_beam_model(path: str | Path | None = None) -> BeamModel:
    """Load a beam model TOML (default ``config/beam_model_6mv.toml``).

    Raises :class:`ConfigError` naming the file and key on unknown, missing or invalid keys.
    """
    path = Path(path) if path is not None else config_path("beam_model_6mv.toml")
    f = load_config(BeamModelFile, path)
    m, ml, ca, en = f.machine, f.mlc, f.calibration, f.engine
    bounds = np.concatenate([[0.0], np.cumsum(np.asarray(ml.leaf_widths_mm, dtype=np.float64))])
    bounds -= bounds[-1] / 2.0
    mlc = MlcModel(
        leaf_boundaries_mm=bounds,
        leaf_position_range_mm=ml.leaf_position_range_mm,
        max_leaf_span_mm=ml.max_leaf_span_mm,
        min_leaf_gap_mm=ml.min_leaf_gap_mm,
        interdigitation_allowed=ml.interdigitation_allowed,
        transmission=ml.transmission,
    )
    cal, dmax = reference_calibration(f.kernel, m.sad_mm, ca.reference_field_mm,
                                      ca.reference_ssd_mm, ca.reference_dose_gy_per_mu)
    return BeamModel(
        name=m.name,
        energy_mv=m.energy_mv,
        sad_mm=m.sad_mm,
        jaw_x_range_mm=f.jaws.x_range_mm,
        jaw_y_range_mm=f.jaws.y_range_mm,
        jaw_transmission=f.jaws.transmission,
        mlc=mlc,
        kernel=f.kernel,
        reference_dose_gy_per_mu=ca.reference_dose_gy_per_mu,
        reference_field_mm=ca.reference_field_mm,
        reference_ssd_mm=ca.reference_ssd_mm,
        dij_cutoff_mm=en.dij_cutoff_mm,
        plan_cutoff_mm=en.plan_cutoff_mm,
        fluence_resolution_mm=en.fluence_resolution_mm,
        body_density_threshold=en.body_density_threshold,
        source=m.source,
        calibration_gy_per_mu=cal,
        reference_depth_mm=dmax,
    )
