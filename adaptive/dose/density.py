"""CT number (HU) to relative electron density (to water), piecewise linear calibration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from adaptive.config import CONFIG_MODEL, Float, config_path, load_config
from adaptive.geometry.volume import Volume
from adaptive.log import get_logger


@dataclass(frozen=True)
class DensityCalibration:
    """Piecewise-linear HU -> relative electron density table (HU strictly increasing)."""

    hu: np.ndarray
    density: np.ndarray
    source: str = ""


FiniteFloat = Annotated[Float, Field(allow_inf_nan=False)]


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class CurveConfig:
    """``[curve]``: calibration points, HU strictly increasing, densities finite and >= 0."""

    hu: Annotated[list[FiniteFloat], Field(min_length=2)]
    relative_electron_density: list[Annotated[FiniteFloat, Field(ge=0)]]

    @model_validator(mode="after")
    def _table(self):
        if len(self.hu) != len(self.relative_electron_density):
            raise ValueError(f"hu and relative_electron_density must be lists of the same "
                             f"length (got {len(self.hu)}, {len(self.relative_electron_density)})")
        if np.any(np.diff(self.hu) <= 0):
            raise ValueError("hu: must be strictly increasing")
        return self


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class DensityFile:
    """``config/hu_to_density.toml``."""

    curve: CurveConfig


def load_density_calibration(path: str | Path | None = None) -> DensityCalibration:
    """Load ``config/hu_to_density.toml`` (or ``path``); ConfigError naming the file and the
    key on unknown keys, wrong types or a table that is not a calibration."""
    path = Path(path) if path is not None else config_path("hu_to_density.toml")
    c = load_config(DensityFile, path).curve
    return DensityCalibration(np.asarray(c.hu, dtype=np.float64),
                              np.asarray(c.relative_electron_density, dtype=np.float64),
                              str(path))


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
