"""MLC sequencing: exact decomposition and machine limits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from adaptive.model.plan import Beam, Plan
from adaptive.optimization.fluence import fluence_from_plan
from adaptive.optimization.sequencing import (
    MlcGeometry,
    SequencingSettings,
    aperture_mask,
    beam_fluence_map,
    check_deliverable,
    decompose,
    segment_fluence,
    sequence_beam,
    sequenced_beam_to_beam,
)


@pytest.mark.parametrize("interdigitation", [False, True])
def test_decomposition_reproduces_integer_map_exactly(interdigitation):
    rng = np.random.default_rng(3)
    for _ in range(20):
        q = rng.integers(0, 11, size=(8, 12))
        q[rng.random(q.shape) < 0.3] = 0
        segs = decompose(q, interdigitation)
        total = sum(u * aperture_mask(iv, q.shape[1]) for iv, u in segs)
        assert np.array_equal(total, q)
        if not interdigitation:
            for iv, _ in segs:
                open_rows = [i for i in range(q.shape[0]) if iv[i, 1] > iv[i, 0]]
                for a, b in itertools.pairwise(open_rows):
                    # consecutive open pairs share a column: X1[i] < X2[j] and X1[j] < X2[i]
                    assert iv[a, 0] < iv[b, 1] and iv[b, 0] < iv[a, 1]


def _toy_beam_fluence():
    from adaptive.optimization.fluence import optimize_fluence
    from adaptive.optimization.objective import Objective
    from test_optim_toy import make_toy_case

    dij, masks, goals = make_toy_case(n_xy=30, n_z=4, n_beams=5)
    r = optimize_fluence(dij, Objective(dij, masks, goals), max_iter=60)
    return dij, r.weights_mu


@pytest.mark.parametrize("interdigitation", [False, True])
def test_sequenced_segments_sum_to_quantised_map_and_respect_mlc(interdigitation):
    dij, w = _toy_beam_fluence()
    # 5 mm leaves aligned with the bixels (z rows of the toy at multiples of 5 mm)
    mlc = MlcGeometry(leaf_boundaries_mm=np.arange(-60.0, 60.1, 5.0), min_gap_mm=0.5,
                      interdigitation=interdigitation, leaf_position_range_mm=(-150, 150))
    unlimited = SequencingSettings(levels=7, min_mu_per_segment=0.0, max_segments_per_beam=1000)
    for b in range(5):
        bf = beam_fluence_map(dij, w, b)
        sb = sequence_beam(bf, mlc, unlimited)
        np.testing.assert_allclose(segment_fluence(sb), sb.quantised_leaf_fluence_mu, atol=1e-9)
        # quantisation error at most half a level
        assert np.max(np.abs(sb.quantised_leaf_fluence_mu - sb.leaf_fluence_mu)) <= sb.delta_mu / 2 + 1e-9
        tpl = Beam(b + 1, f"B{b}", 0.0, 0.0, 0.0, np.zeros(3), [], 0.0)
        beam = sequenced_beam_to_beam(sb, tpl, mlc)
        assert check_deliverable(beam, mlc, unlimited) == []
        for cp, _mu in beam.segments():
            gap = cp.mlc_x2_mm - cp.mlc_x1_mm
            assert np.all(gap >= mlc.min_gap_mm - 1e-9)
            # jaws = bounding box of the open leaves
            op = gap > mlc.min_gap_mm + 1e-9
            assert cp.jaw_x_mm[0] == pytest.approx(cp.mlc_x1_mm[op].min())
            assert cp.jaw_x_mm[1] == pytest.approx(cp.mlc_x2_mm[op].max())
        assert beam.meterset_mu == pytest.approx(sum(mu for _, mu in beam.segments()))
        # projecting the segments back onto the beamlets reproduces the quantised map
        plan = Plan("t", [beam], "1.2.3")
        wb = fluence_from_plan(plan, _single_beam(dij, b))
        q_rows = sb.quantised_leaf_fluence_mu
        lb = mlc.leaf_boundaries_mm
        pair = np.searchsorted(lb, bf.y_mm, side="right") - 1
        expect = q_rows[pair][:, :]
        got = np.zeros_like(expect)
        for r in range(bf.beamlet.shape[0]):
            for c in range(bf.beamlet.shape[1]):
                if bf.beamlet[r, c] >= 0:
                    got[r, c] = wb[np.flatnonzero(_single_beam(dij, b).orig == bf.beamlet[r, c])[0]]
        mask = bf.beamlet >= 0
        # exact except the leakage of closed pairs' minimum gaps (gap/bixel × segment MU)
        leak = sum(s.mu for s in sb.segments) * mlc.min_gap_mm / bf.bixel_mm[0]
        assert np.all(np.abs(got[mask] - expect[mask]) <= leak + 1e-9)
        assert np.mean(np.abs(got[mask] - expect[mask]) < 1e-9) > 0.8


class _Sub:
    pass


def _single_beam(dij, b):
    """A view of ``dij`` restricted to beam b's beamlets (renumbered as beam 0)."""
    idx = dij.beamlets_of(b)
    s = _Sub()
    s.bixel_size_mm = dij.bixel_size_mm
    s.n_beamlets = idx.size
    s.beam_index = np.zeros(idx.size, int)
    s.bev_x_mm = np.asarray(dij.bev_x_mm)[idx]
    s.bev_y_mm = np.asarray(dij.bev_y_mm)[idx]
    s.orig = idx
    s.beamlets_of = lambda k: np.arange(idx.size)
    return s


def test_min_mu_and_max_segments_are_honoured():
    dij, w = _toy_beam_fluence()
    mlc = MlcGeometry(leaf_boundaries_mm=np.arange(-60.0, 60.1, 5.0), interdigitation=False)
    settings = SequencingSettings(levels=10, min_mu_per_segment=3.0, max_segments_per_beam=6)
    n_exact = 0
    for b in range(5):
        sb = sequence_beam(beam_fluence_map(dij, w, b), mlc, settings)
        assert sb.n_segments_raw > 6  # the limits actually had work to do
        assert 1 <= len(sb.segments) <= 6
        assert all(s.mu >= 3.0 for s in sb.segments)
        # the limits are met by a coarser quantisation, not by dropping apertures: the
        # segments still reproduce the (coarser) quantised map exactly — unless even 2
        # levels do not fit (then apertures are dropped and MU refitted)
        assert 2 <= sb.n_levels < 10
        exact = np.allclose(segment_fluence(sb), sb.quantised_leaf_fluence_mu, atol=1e-9)
        assert exact or sb.n_levels == 2
        n_exact += exact
        beam = sequenced_beam_to_beam(sb, Beam(1, "B", 0.0, 0.0, 0.0, np.zeros(3), [], 0.0), mlc)
        assert check_deliverable(beam, mlc, settings) == []
        # the refit keeps the delivered fluence close to the continuous map (relative L2)
        err = np.linalg.norm(segment_fluence(sb) - sb.leaf_fluence_mu) / np.linalg.norm(sb.leaf_fluence_mu)
        assert err < 0.5
    assert n_exact >= 1


def test_leaf_travel_limit_is_enforced():
    from adaptive.errors import OptimizationError

    dij, w = _toy_beam_fluence()
    mlc = MlcGeometry(leaf_boundaries_mm=np.arange(-60.0, 60.1, 5.0), leaf_position_range_mm=(-20, 20))
    with pytest.raises(OptimizationError, match="travel range"):
        sequence_beam(beam_fluence_map(dij, w, 0), mlc, SequencingSettings(5, 0.0, 100))


def test_enforce_minimum_mu_raises_near_minimum_and_drops_tiny_segments():
    """After a plan normalisation factor < 1 (e.g. 0.97 turning 2.0 MU into 1.94 MU, measured
    on replay fractions), every segment must again be deliverable: near-minimum segments are
    raised to the minimum, tiny ones dropped, the others untouched."""
    import numpy as np

    from adaptive.optimization.sequencing import Segment, SequencedBeam, enforce_minimum_mu

    def seg(mu):
        return Segment(np.zeros(2), np.ones(2), (-5.0, 5.0), (-5.0, 5.0), mu)

    beams = [SequencedBeam(0, [seg(1.94), seg(30.0), seg(0.4)], np.zeros((1, 1)),
                           np.zeros((1, 1)), 1.0, 3, np.zeros(2)),
             SequencedBeam(1, [seg(2.0), seg(0.99)], np.zeros((1, 1)), np.zeros((1, 1)), 1.0,
                           2, np.zeros(2))]
    rep = enforce_minimum_mu(beams, 2.0)
    assert [s.mu for s in beams[0].segments] == [2.0, 30.0]
    assert [s.mu for s in beams[1].segments] == [2.0]
    assert rep.raised_mu == (1.94,) and rep.dropped_mu == (0.4, 0.99)
    assert rep.changed
    d = rep.to_dict(2.0)
    assert d["net_mu_change"] == round(0.06 - 0.4 - 0.99, 4)
    assert all(s.mu >= 2.0 for b in beams for s in b.segments)
    assert not enforce_minimum_mu(beams, 2.0).changed
