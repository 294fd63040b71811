"""Beam model and HU calibration loading."""

from __future__ import annotations

import numpy as np
import pytest
from structlog.testing import capture_logs

from adaptive.config import config_path
from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.density import hu_to_density, load_density_calibration
from adaptive.errors import ConfigError
from adaptive.geometry.volume import Grid, Volume
from adaptive.log import get_logger


def test_default_beam_model():
    bm = load_beam_model()
    assert bm.sad_mm == 1000.0
    assert bm.mlc.n_leaf_pairs == 60
    lb = bm.mlc.leaf_boundaries_mm
    assert lb[0] == -200.0 and lb[-1] == 200.0
    assert np.allclose(np.diff(lb)[10:50], 5.0) and np.allclose(np.diff(lb)[:10], 10.0)
    assert bm.mlc.interdigitation_allowed is True
    assert 10.0 < bm.reference_depth_mm < 17.0
    assert bm.calibration_gy_per_mu > 0


def test_unknown_key_is_an_error(tmp_path):
    text = config_path("beam_model_6mv.toml").read_text()
    bad = tmp_path / "bm.toml"
    bad.write_text(text.replace("[kernel]\n", "[kernel]\nmu_per_cm = 0.05\n"))
    with pytest.raises(ConfigError, match="mu_per_cm"):
        load_beam_model(bad)
    bad.write_text(text.replace("transmission = 0.015", "transmission = 1.5"))
    with pytest.raises(ConfigError, match="transmission"):
        load_beam_model(bad)


def test_hu_to_density_values_and_clamping():
    g = Grid((1, 1, 6), origin=[0, 0, 0], spacing=[1, 1, 1])
    ct = Volume(np.array([[[-1000.0, 0.0, 20.0, 1000.0, -1200.0, 4000.0]]]), g, "HU")
    get_logger()  # configure logging first, so that capture_logs is not overridden
    with capture_logs() as logs:
        rho = hu_to_density(ct)
    a = rho.array.ravel()
    assert a[0] == pytest.approx(0.001) and a[1] == pytest.approx(1.0)
    assert a[2] == pytest.approx(1.02, abs=1e-6)  # halfway between 0 HU (1.0) and 40 HU (1.04)
    assert 1.5 <= a[3] <= 1.7
    assert a[4] == pytest.approx(0.001) and a[5] == pytest.approx(2.5)
    warn = [e for e in logs if e["event"] == "hu_outside_calibration"]
    assert warn and warn[0]["voxels_below"] == 1 and warn[0]["voxels_above"] == 1


def test_bad_density_calibration(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[curve]\nhu = [0.0, -100.0]\nrelative_electron_density = [1.0, 0.9]\n")
    with pytest.raises(ConfigError, match="increasing"):
        load_density_calibration(p)
