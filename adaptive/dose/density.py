"""CT number (HU) to relative electron density (to water), piecewise linear calibration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptive.config import check_keys, config_path, load_toml
from adaptive.errors import ConfigError
from adaptive.geometry.volume import Volume
from adaptive.log import get_logger


@dataclass(frozen=True)
class DensityCalibration:
    """Piecewise-linear HU -> relative electron density table (HU strictly increasing)."""

    hu: np.ndarray
    density: np.ndarray
    source: str = ""


def load_density_calibration(path: str | Path | None = None) -> DensityCalibration:
    """Load ``config/hu_to_density.toml`` (or ``path``); ConfigError on bad/unknown keys."""
    path = Path(path) if path is not None else config_path("hu_to_density.toml")
    data = load_toml(path)
    check_keys(data, {"curve"}, str(path), required={"curve"})
    c = data["curve"]
    if not isinstance(c, dict):
        raise ConfigError(f"{path}: [curve] must be a table")
    check_keys(c, {"hu", "relative_electron_density"}, f"{path} [curve]",
               required={"hu", "relative_electron_density"})
    try:
        hu = np.asarray(c["hu"], dtype=np.float64)
        rho = np.asarray(c["relative_electron_density"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path} [curve]: hu / relative_electron_density must be numbers") from e
    if hu.ndim != 1 or hu.shape != rho.shape or len(hu) < 2:
        raise ConfigError(f"{path} [curve]: hu and relative_electron_density must be lists of the "
                          f"same length >= 2 (got {hu.shape}, {rho.shape})")
    if np.any(np.diff(hu) <= 0):
        raise ConfigError(f"{path} [curve].hu: must be strictly increasing")
    if np.any(rho < 0) or not np.all(np.isfinite(rho)):
        raise ConfigError(f"{path} [curve].relative_electron_density: must be finite and >= 0")
    return DensityCalibration(hu, rho, str(path))


def hu_to_density(ct: Volume, calibration: DensityCalibration | None = None) -> Volume:
    """Relative electron density Volume (float32, same grid) from a CT in HU.

    Linear interpolation in the calibration table; HU outside the table are clamped to the
    end values and a structlog warning reports how many voxels were clamped.
    """
    cal = calibration or load_density_calibration()
    a = np.asarray(ct.array, dtype=np.float32)
    lo, hi = cal.hu[0], cal.hu[-1]
    n_lo = int(np.count_nonzero(a < lo))
    n_hi = int(np.count_nonzero(a > hi))
    if n_lo or n_hi:
        get_logger("adaptive.dose.density").warning(
            "hu_outside_calibration", voxels_below=n_lo, voxels_above=n_hi,
            hu_range=[float(lo), float(hi)], calibration=cal.source)
    rho = np.interp(a.ravel(), cal.hu, cal.density).astype(np.float32).reshape(a.shape)
    return Volume(rho, ct.grid, "relative electron density")
