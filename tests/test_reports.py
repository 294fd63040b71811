"""Report building blocks against values worked out by hand: the cumulative DVH (same
semantics as the clinical goals), the summary CSV (read back with the csv module) and the
HTML escaping of identifiers."""

from __future__ import annotations

import csv
import io

import numpy as np

from adaptive.optimization.goals import dose_at_volume
from adaptive.reports.dvh import cumulative_dvh
from adaptive.reports.html import esc, fmt
from adaptive.reports.summary import CSV_COLUMNS, summary_csv


def test_dvh_of_a_uniform_ramp():
    # 100 voxels of 2 mm³ receiving 1, 2, ..., 100 Gy (shuffled)
    d = np.random.default_rng(3).permutation(np.arange(1.0, 101.0))
    h = cumulative_dvh("PTV", d, voxel_volume_mm3=2.0)
    assert h.volume_cc == 0.2
    # V(k Gy) = share of voxels receiving >= k Gy = (101 - k) %
    for k in (1, 5, 50, 100):
        i = int(np.searchsorted(h.dose_gy, k))
        assert h.volume_pct[i] == 101 - k
    # Dx read off the curve (lowest dose still received by >= x % of the volume) is the
    # goals' Dx: the minimum dose of the hottest x %
    for x in (2.0, 50.0, 95.0, 100.0):
        dx = h.dose_gy[h.volume_pct >= x].max()
        assert dx == dose_at_volume(d, x) == 101 - x


def test_dvh_thinned_keeps_ends_and_monotone():
    d = np.linspace(0.0, 60.0, 10001)
    h = cumulative_dvh("OAR", d, 1.0, max_points=50)
    assert h.dose_gy.size <= 50
    assert h.dose_gy[0] == 0.0 and h.dose_gy[-1] == 60.0 and h.volume_pct[0] == 100.0
    assert np.all(np.diff(h.dose_gy) >= 0) and np.all(np.diff(h.volume_pct) <= 0)
    assert cumulative_dvh("EMPTY", np.array([]), 1.0).empty


def test_summary_csv_one_row_per_fraction_with_fixed_columns():
    rows = [{"patient_id": "P,1", "fraction": "fx01", "status": "done",
             "target_d95_adapted_gy": 57.0, "goals": [{"ignored": True}]},
            {"patient_id": "P2", "fraction": "fx01", "status": "failed",
             "reason": 'MissingPixelDataError: "truncated"\nline 2'}]
    back = list(csv.DictReader(io.StringIO(summary_csv(rows))))
    assert list(back[0]) == list(CSV_COLUMNS)
    assert back[0]["patient_id"] == "P,1" and back[0]["target_d95_adapted_gy"] == "57.0"
    assert back[1]["reason"] == 'MissingPixelDataError: "truncated"\nline 2'
    assert back[1]["target_d95_adapted_gy"] == ""


def test_identifiers_are_escaped_and_numbers_formatted():
    assert esc("<PAT&1>") == "&lt;PAT&amp;1&gt;"
    assert fmt(None) == fmt(float("nan")) == "—"
    assert fmt(57.0049, 2, "Gy") == "57.00 Gy" and fmt(True) == "yes"
