"""Every configuration loader on its typed model: an unknown key and a wrong type are a
ConfigError naming the file and the dotted key; the shipped files load to the values written
in them (pinned here from the files' text; the loaders' whole output was also compared with
the hand-written loaders they replace, see the commit message)."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from adaptive.config import config_path
from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.density import load_density_calibration
from adaptive.errors import ConfigError
from adaptive.optimization.goals import load_goals
from adaptive.optimization.protocols import ProtocolTable
from adaptive.optimization.sequencing import SequencingSettings
from adaptive.registration.settings import load_registration_settings


@dataclass(frozen=True)
class Loader:
    name: str
    load: Callable[[Path], object]
    shipped: tuple[str, ...]        # path under config/
    unknown: tuple[str, ...]        # a key that does not exist (dotted path in the file)
    wrong: tuple[tuple[str, ...], object]  # an existing key and a value of the wrong type


LOADERS = [
    Loader("beam_model", load_beam_model, ("beam_model_6mv.toml",),
           ("kernel", "mu_per_cm"), (("mlc", "interdigitation_allowed"), "yes")),
    Loader("density", load_density_calibration, ("hu_to_density.toml",),
           ("curve", "slope"), (("curve", "hu"), "-1000, 0")),
    Loader("goals", load_goals, ("goals", "prostate.toml"),
           ("prescription", "wieght"), (("goal", 1, "priority"), "high")),
    Loader("protocols", ProtocolTable.load, ("protocols.toml",),
           ("plan_label",), (("plan_labels", "PROST_60_20"), 3)),
    Loader("machine", SequencingSettings.load, ("machine.toml",),
           ("sequencing", "levels"), (("sequencing", "intensity_levels"), 2.5)),
    Loader("registration", load_registration_settings, ("registration.toml",),
           ("quality", "max_fold"), (("registration", "random_seed"), "1")),
]


def _shipped(loader: Loader) -> dict:
    return tomllib.loads(config_path(*loader.shipped).read_text())


def _set(data: dict, key: tuple, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    return data


def _error(loader: Loader, data: dict, tmp_path: Path) -> str:
    p = tmp_path / f"bad_{loader.name}.toml"
    p.write_text(tomli_w.dumps(data))   # an independent TOML writer
    with pytest.raises(ConfigError) as e:
        loader.load(p)
    return str(e.value)


@pytest.mark.parametrize("loader", LOADERS, ids=lambda x: x.name)
def test_unknown_key_names_file_and_key(loader, tmp_path):
    msg = _error(loader, _set(_shipped(loader), loader.unknown, 1), tmp_path)
    assert str(tmp_path / f"bad_{loader.name}.toml") in msg
    assert f"{'.'.join(map(str, loader.unknown))}: unknown key" in msg


@pytest.mark.parametrize("loader", LOADERS, ids=lambda x: x.name)
def test_wrong_type_names_file_and_key(loader, tmp_path):
    key, value = loader.wrong
    msg = _error(loader, _set(_shipped(loader), key, value), tmp_path)
    assert str(tmp_path / f"bad_{loader.name}.toml") in msg
    assert f"{'.'.join(map(str, key))}: " in msg and repr(value) in msg


@pytest.mark.parametrize("loader", LOADERS, ids=lambda x: x.name)
def test_shipped_file_loads(loader):
    assert loader.load(config_path(*loader.shipped)) is not None


def test_out_of_bounds_values_are_errors(tmp_path):
    """The bounds of the hand-written loaders are kept (a few that matter)."""
    cases = [
        (LOADERS[0], ("mlc", "transmission"), 1.5, "mlc.transmission"),
        (LOADERS[0], ("kernel", "mu_per_mm"), 0.0, "kernel.mu_per_mm"),
        (LOADERS[0], ("jaws", "x_range_mm"), [200.0, -200.0], "jaws.x_range_mm"),
        (LOADERS[1], ("curve", "relative_electron_density", 0), -0.1,
         "curve.relative_electron_density.0"),
        (LOADERS[2], ("prescription", "fractions"), 0, "prescription.fractions"),
        (LOADERS[2], ("objective", 0, "volume_pct"), 50.0, "objective.0"),
        (LOADERS[4], ("sequencing", "max_segments_per_beam"), 0,
         "sequencing.max_segments_per_beam"),
        (LOADERS[5], ("registration", "threads"), 0, "registration.threads"),
        (LOADERS[5], ("registration", "intensity_window_hu"), [500.0, -500.0],
         "registration.intensity_window_hu"),
        (LOADERS[5], ("propagation", "threshold"), 1.0, "propagation.threshold"),
        (LOADERS[5], ("initial_alignment", "samples"), 99, "initial_alignment.samples"),
    ]
    for loader, key, value, where in cases:
        msg = _error(loader, _set(_shipped(loader), key, value), tmp_path)
        assert f": {where}" in msg, (where, msg)


def test_density_table_rules(tmp_path):
    cal = _shipped(LOADERS[1])
    assert "strictly increasing" in _error(
        LOADERS[1], _set(cal, ("curve", "hu", 1), -2000.0), tmp_path)
    short = _set(cal, ("curve", "relative_electron_density"), [1.0, 1.0])
    assert "same length" in _error(LOADERS[1], short, tmp_path)


def test_registration_elastix_pass_through(tmp_path):
    """elastix tables pass through any elastix parameter; values become elastix strings;
    the parameters the code sets per run are refused; nested tables are not parameters."""
    raw = _shipped(LOADERS[5])
    s = load_registration_settings(_set(raw, ("elastix", "bspline", "MadeUpParameter"),
                                        [1, 2.5, True, "x"]))
    assert s.parameter_map("bspline")["MadeUpParameter"] == ["1", "2.5", "true", "x"]
    msg = _error(LOADERS[5], _set(raw, ("elastix", "rigid", "RandomSeed"), 3), tmp_path)
    assert "elastix.rigid: ['RandomSeed'] are set by the code per run" in msg
    msg = _error(LOADERS[5], _set(raw, ("elastix", "bspline", "Nested"), {"a": 1}), tmp_path)
    assert "elastix.bspline.Nested: unsupported elastix parameter value" in msg
    del raw["elastix"]["rigid"]
    assert "elastix.rigid: missing required key" in _error(LOADERS[5], raw, tmp_path)
    with pytest.raises(ConfigError, match=r"<dict>: registration: missing required key"):
        load_registration_settings({"elastix": _shipped(LOADERS[5])["elastix"]})


# --- the shipped files' values --------------------------------------------------------------

def test_registration_values():
    s = load_registration_settings()
    assert s.random_seed == 20240611 and s.init.random_seed == 20240611
    assert s.threads == 2 and s.working_voxel_mm == 2.0
    assert s.intensity_window_hu == (-500.0, 500.0)
    b = s.parameter_map("bspline")
    assert b["RandomSeed"] == ["20240611"]
    assert b["FinalGridSpacingInPhysicalUnits"] == ["25.0"]
    assert b["NumberOfResolutions"] == ["3"] and b["NumberOfHistogramBins"] == ["64"]
    assert b["NumberOfSpatialSamples"] == ["2000", "2000", "4000"]
    assert b["AutomaticParameterEstimation"] == ["true"]
    assert s.parameter_map("rigid")["Transform"] == ["EulerTransform"]
    assert s.init.samples == 2000 and s.init.bins == 24 and s.init.search_range_mm == 100.0
    assert s.quality["mi_bins"] == 32 and type(s.quality["mi_bins"]) is int
    assert s.quality["max_fraction_folded"] == 0.0005
    assert s.synthetic_ct["gas_offset_hu"] == 550.0
    assert s.shading.sigma_mm == 20.0 and s.shading.iterations == 2
    assert s.propagation_threshold == 0.5 and s.mask_erode_mm == 4.0


def test_registration_defaults_of_missing_keys():
    """A file with only the required tables gets the documented defaults."""
    s = load_registration_settings({"registration": {},
                                    "elastix": _shipped(LOADERS[5])["elastix"]})
    assert (s.threads, s.random_seed, s.intensity_window_hu, s.working_voxel_mm) == (
        2, 1, None, 0.0)
    assert s.deformable_in_subprocess is True and s.moving_crop_margin_mm == 30.0
    assert s.quality == {"min_overlap_fraction": 0.3, "max_fraction_folded": 0.0005,
                         "max_deformation_mm": 40.0, "min_intensity_std": 1.0, "mi_bins": 32,
                         "subsample": 2}
    assert s.synthetic_ct["air_hu"] == -1000.0 and s.body_threshold_hu == -500.0
    assert s.shading.enabled and s.init.use_isocenter and s.init.random_seed == 1


def test_goals_values():
    g = load_goals(config_path("goals", "prostate.toml"))
    assert g.site == "prostate" and g.prescription.target_roi_name == "PTV"
    assert g.prescription.number_of_fractions == 20
    assert g.prescription.dose_per_fraction_gy == pytest.approx(3.0)
    d95 = g.goals[0]
    assert (d95.structure, d95.metric, d95.op, d95.value_total) == ("PTV", "D95", ">=", 57.0)
    assert d95.value == pytest.approx(57.0 / 20) and d95.priority == 1
    dvh = [o for o in g.objectives if o.type == "dvh_max"]
    assert dvh[0].volume_pct == 60.0 and dvh[0].dose_gy == pytest.approx(36.0 / 20)
    assert all(o.volume_pct is None for o in g.objectives if not o.type.startswith("dvh"))


def test_beam_model_values():
    bm = load_beam_model()
    assert bm.name == "ADAPTIVE_6MV" and bm.energy_mv == 6.0 and bm.sad_mm == 1000.0
    assert bm.jaw_x_range_mm == (-200.0, 200.0) and bm.jaw_transmission == 0.005
    assert bm.kernel.mu_per_mm == 0.00516378 and bm.kernel.sigma_scatter_slope == 0.160699
    assert bm.mlc.leaf_position_range_mm == (-200.0, 200.0) and bm.mlc.transmission == 0.015
    assert bm.mlc.min_leaf_gap_mm == 0.5 and bm.mlc.max_leaf_span_mm == 150.0
    assert bm.dij_cutoff_mm == 30.0 and bm.fluence_resolution_mm == 2.5
    assert bm.reference_dose_gy_per_mu == 0.01 and bm.reference_ssd_mm == 1000.0


def test_density_machine_protocol_values():
    cal = load_density_calibration()
    assert cal.hu[0] == -1000.0 and cal.hu[-1] == 3000.0 and len(cal.hu) == 12
    assert cal.density.dtype == np.float64 and cal.density[5] == 1.0 and cal.density[-1] == 2.5
    seq = SequencingSettings.load()
    assert (seq.levels, seq.min_mu_per_segment, seq.max_segments_per_beam) == (10, 2.0, 12)
    t = ProtocolTable.load()
    assert t.for_plan("CHHiP 60Gy/20fx", "")[0] == "prostate"
    assert t.for_plan("", "TG119_CSHAPE")[0] == "tg119_cshape"
