"""MLC sequencing: optimised beamlet weights → step-and-shoot segments (apertures + MU).

Per beam:

1. **Fluence map** (:func:`beam_fluence_map`): beamlet weights (MU per fraction) on the
   beam's bixel grid (rows along IEC Y, columns along leaf travel IEC X), resampled to leaf
   pairs (:func:`leaf_fluence`): each leaf pair gets the overlap-weighted mean of the bixel
   rows it covers (leaf boundaries from the beam model, at the isocenter plane).
2. **Quantisation** into L intensity levels of size Δ = max / L MU: L is the largest number
   of levels (≤ ``levels``) whose decomposition meets the segment limits (step 4), so that
   the limits are met by a coarser quantisation rather than by dropping apertures.
3. **Decomposition** (:func:`decompose`, reducing levels after Xia & Verhey 1998): for unit
   u = 2^k, …, 2, 1, while some entry of the integer map Q is ≥ u, extract one aperture: per
   leaf pair one contiguous run of columns where Q ≥ u (the longest admissible one) and
   subtract u there. If the MLC forbids interdigitation, consecutive open leaf pairs (closed
   pairs in between are parked inside the overlap) must share at least one column, i.e.
   X1[i] < X2[i±1]; a leaf pair with no admissible run stays closed in this aperture and is
   served by a later one. The apertures' units sum **exactly** to Q.
4. **Deliverability**: identical apertures merged; then (only when no L ≥ 2 fits), while a
   segment is below the minimum MU or there are more than ``max_segments`` segments, the
   smallest segment (MU × area) is dropped and the segments' MU are refitted to the continuous fluence map by
   non-negative least squares (:func:`scipy.optimize.nnls`).
5. **Leaf positions**: open pairs at bixel edges; closed pairs with the minimum leaf gap,
   parked inside the neighbouring open pairs' overlap (no interdigitation) or under the X1
   jaw (interdigitation allowed) — closed pairs between open pairs then leak through the
   minimum gap, which the deliverable dose recalculation accounts for. Jaws: the aperture's
   bounding box. Leaf travel limits are checked (:class:`OptimizationError`).

All positions are mm at the isocenter plane in the beam limiting device frame; MU per
fraction.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import scipy.sparse as sp
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from scipy.optimize import minimize, nnls

from adaptive.config import CONFIG_MODEL, Float, Int, config_path, load_config
from adaptive.dose.influence import DoseInfluence
from adaptive.errors import OptimizationError
from adaptive.model.plan import Beam, ControlPoint
from adaptive.optimization.fluence import reweighting_loop


@dataclass(frozen=True)
class MlcGeometry:
    """Multi-leaf collimator limits (mm at the isocenter plane, IEC X = leaf travel).

    ``leaf_boundaries_mm``: (n_pairs + 1,) ascending positions along IEC Y.
    ``leaf_position_range_mm``: (min, max) reachable leaf-tip position along X.
    ``max_leaf_span_mm``: maximum spread between the tips of the leaves of one bank in a
    segment (carriage limit; inf if none). ``min_gap_mm``: minimum distance between opposed
    leaves. ``interdigitation``: whether a leaf may pass the opposing leaf of a neighbour pair.
    """

    leaf_boundaries_mm: np.ndarray
    leaf_position_range_mm: tuple[float, float] = (-200.0, 200.0)
    max_leaf_span_mm: float = math.inf
    min_gap_mm: float = 0.5
    interdigitation: bool = False
    mlc_transmission: float = 0.0
    jaw_transmission: float = 0.0

    @property
    def n_pairs(self) -> int:
        return len(self.leaf_boundaries_mm) - 1

    @classmethod
    def from_beam_model(cls, bm) -> MlcGeometry:
        """From :class:`adaptive.dose.beam_model.BeamModel` (its ``mlc``: MlcModel)."""
        m = bm.mlc
        return cls(leaf_boundaries_mm=np.asarray(m.leaf_boundaries_mm, dtype=np.float64),
                   leaf_position_range_mm=(float(m.leaf_position_range_mm[0]),
                                           float(m.leaf_position_range_mm[1])),
                   max_leaf_span_mm=float(m.max_leaf_span_mm),
                   min_gap_mm=float(m.min_leaf_gap_mm),
                   interdigitation=bool(m.interdigitation_allowed),
                   mlc_transmission=float(m.transmission),
                   jaw_transmission=float(bm.jaw_transmission))


@dataclass(frozen=True)
class SequencingSettings:
    """``levels``: intensity levels per beam; ``min_mu_per_segment`` (MU per fraction);
    ``max_segments_per_beam``."""

    levels: int = 10
    min_mu_per_segment: float = 2.0
    max_segments_per_beam: int = 15

    @classmethod
    def load(cls, path=None) -> SequencingSettings:
        """From ``config/machine.toml`` [sequencing] (:class:`MachineFile`: every key
        required, unknown keys and wrong types are errors naming the file and the key)."""
        s = load_config(MachineFile, path or config_path("machine.toml")).sequencing
        return cls(levels=s.intensity_levels, min_mu_per_segment=s.min_mu_per_segment,
                   max_segments_per_beam=s.max_segments_per_beam)


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class SequencingConfig:
    """``[sequencing]`` of ``config/machine.toml`` (see :class:`SequencingSettings`)."""

    intensity_levels: Annotated[Int, Field(ge=1)]
    min_mu_per_segment: Annotated[Float, Field(ge=0)]
    max_segments_per_beam: Annotated[Int, Field(ge=1)]


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class MachineFile:
    """``config/machine.toml``: the treatment machine's sequencing limits."""

    sequencing: SequencingConfig


# --- fluence maps --------------------------------------------------------------------------


@dataclass
class BeamFluence:
    """Beamlet weights of one beam on its bixel grid.

    ``fluence_mu[r, c]`` at (``x_mm[c]``, ``y_mm[r]``); ``beamlet[r, c]`` = Dij column or -1.
    """

    beam: int
    x_mm: np.ndarray
    y_mm: np.ndarray
    bixel_mm: tuple[float, float]
    fluence_mu: np.ndarray
    beamlet: np.ndarray


def beam_fluence_map(dij: DoseInfluence, weights_mu: np.ndarray, beam: int) -> BeamFluence:
    idx = dij.beamlets_of(beam)
    if idx.size == 0:
        raise OptimizationError(f"beam {beam} has no beamlets")
    bx, by = float(dij.bixel_size_mm[0]), float(dij.bixel_size_mm[1])
    x = np.asarray(dij.bev_x_mm, dtype=np.float64)[idx]
    y = np.asarray(dij.bev_y_mm, dtype=np.float64)[idx]
    x0, y0 = x.min(), y.min()
    ci = np.rint((x - x0) / bx).astype(int)
    ri = np.rint((y - y0) / by).astype(int)
    if np.max(np.abs(ci * bx + x0 - x)) > 0.01 * bx or np.max(np.abs(ri * by + y0 - y)) > 0.01 * by:
        raise OptimizationError(f"beam {beam}: beamlets are not on a regular bixel grid")
    nr, nc = ri.max() + 1, ci.max() + 1
    f = np.zeros((nr, nc))
    bl = np.full((nr, nc), -1, dtype=np.int64)
    f[ri, ci] = np.asarray(weights_mu, dtype=np.float64)[idx]
    bl[ri, ci] = idx
    return BeamFluence(beam, x0 + bx * np.arange(nc), y0 + by * np.arange(nr), (bx, by), f, bl)


def leaf_fluence(bf: BeamFluence, mlc: MlcGeometry) -> np.ndarray:
    """(n_pairs, n_columns) fluence (MU) per leaf pair: overlap-weighted mean of bixel rows.

    A leaf pair covering less than half its width with bixels gets the overlap-weighted
    mean of what it covers times the covered fraction (so fluence is not invented).
    """
    lb = np.asarray(mlc.leaf_boundaries_mm, dtype=np.float64)
    by = bf.bixel_mm[1]
    lo = bf.y_mm - by / 2
    hi = bf.y_mm + by / 2
    ov = np.clip(np.minimum(lb[1:, None], hi[None, :]) - np.maximum(lb[:-1, None], lo[None, :]),
                 0.0, None)  # (n_pairs, n_rows) overlap in mm
    width = np.diff(lb)[:, None]
    return (ov / width) @ bf.fluence_mu


# --- decomposition -------------------------------------------------------------------------


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous True runs [a, b) of a boolean row."""
    d = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), ends.tolist()))


def decompose(q: np.ndarray, interdigitation: bool = False) -> list[tuple[np.ndarray, int]]:
    """Decompose a non-negative integer map ``q`` (leaf pairs × columns) into apertures.

    Returns [(intervals, units)], ``intervals`` an (n_pairs, 2) int array of column runs
    [a, b) per leaf pair (a == b: closed). Σ units × aperture == q exactly.
    """
    q = np.array(q, dtype=np.int64)
    if q.ndim != 2 or np.any(q < 0):
        raise OptimizationError("intensity map must be a non-negative 2-D integer array")
    out: list[tuple[np.ndarray, int]] = []
    if q.max(initial=0) == 0:
        return out
    u = 1 << math.floor(math.log2(q.max()))
    while u >= 1:
        while np.any(q >= u):
            a = q >= u
            iv = np.zeros((q.shape[0], 2), dtype=np.int64)
            prev = None  # last open interval in this aperture
            for i in range(q.shape[0]):
                runs = _runs(a[i])
                if not runs:
                    continue
                if not interdigitation and prev is not None:
                    runs = [r for r in runs if min(r[1], prev[1]) - max(r[0], prev[0]) >= 1]
                if not runs:
                    continue
                r = max(runs, key=lambda t: (t[1] - t[0], -t[0]))
                iv[i] = r
                q[i, r[0]:r[1]] -= u
                prev = r
            out.append((iv, u))
        u //= 2
    return out


def _merge_apertures(raw: list[tuple[np.ndarray, int]]) -> list[list]:
    """Identical apertures of a decomposition merged: [[intervals, units], …]."""
    merged: dict[bytes, list] = {}
    for iv, units in raw:
        key = iv.tobytes()
        if key in merged:
            merged[key][1] += units
        else:
            merged[key] = [iv, units]
    return list(merged.values())


def aperture_mask(intervals: np.ndarray, n_cols: int) -> np.ndarray:
    cols = np.arange(n_cols)
    return (cols[None, :] >= intervals[:, :1]) & (cols[None, :] < intervals[:, 1:2])


# --- segments ------------------------------------------------------------------------------


@dataclass
class Segment:
    """One step-and-shoot aperture: per-leaf-pair positions (mm), jaws (mm), MU per fraction."""

    mlc_x1_mm: np.ndarray
    mlc_x2_mm: np.ndarray
    jaw_x_mm: tuple[float, float]
    jaw_y_mm: tuple[float, float]
    mu: float
    open_pairs: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


@dataclass
class SequencedBeam:
    beam: int
    segments: list[Segment]
    quantised_leaf_fluence_mu: np.ndarray  # (n_pairs, n_cols): level map × Δ before limits
    leaf_fluence_mu: np.ndarray  # continuous (optimised) leaf-pair fluence
    delta_mu: float
    n_segments_raw: int  # apertures of the decomposition at the configured number of levels
    column_edges_mm: np.ndarray
    n_levels: int = 0  # intensity levels used (≤ SequencingSettings.levels)

    @property
    def total_mu(self) -> float:
        return float(sum(s.mu for s in self.segments))


def _positions(intervals: np.ndarray, edges: np.ndarray, mlc: MlcGeometry
               ) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[float, float], np.ndarray]:
    """Leaf positions and jaws for one aperture (intervals in column units)."""
    lb = np.asarray(mlc.leaf_boundaries_mm, dtype=np.float64)
    n = intervals.shape[0]
    open_ = intervals[:, 1] > intervals[:, 0]
    if not open_.any():
        raise OptimizationError("empty aperture")
    x1 = np.where(open_, edges[intervals[:, 0]], np.nan)
    x2 = np.where(open_, edges[np.maximum(intervals[:, 1], 0)], np.nan)
    jx = (float(np.nanmin(x1)), float(np.nanmax(x2)))
    rows = np.flatnonzero(open_)
    jy = (float(lb[rows[0]]), float(lb[rows[-1] + 1]))
    g = mlc.min_gap_mm
    for i in np.flatnonzero(~open_):
        if mlc.interdigitation:
            c = jx[0] - g / 2  # hidden under the X1 jaw
        else:
            above = rows[rows < i]
            below = rows[rows > i]
            nb = [j for j in (above[-1] if above.size else None, below[0] if below.size else None)
                  if j is not None]
            lo = max(x1[j] for j in nb)
            hi = min(x2[j] for j in nb)
            c = 0.5 * (lo + hi)
        x1[i] = c - g / 2
        x2[i] = c + g / 2
    lo_lim, hi_lim = mlc.leaf_position_range_mm
    if min(x1.min(), x2.min()) < lo_lim - 1e-6 or max(x1.max(), x2.max()) > hi_lim + 1e-6:
        raise OptimizationError(f"leaf position beyond the travel range {mlc.leaf_position_range_mm} mm")
    inside = np.zeros(n, bool)
    inside[rows[0]:rows[-1] + 1] = True
    for bank in (x1, x2):
        if np.ptp(bank[inside]) > mlc.max_leaf_span_mm + 1e-6:
            raise OptimizationError(f"leaf span {np.ptp(bank[inside]):.1f} mm exceeds the "
                                    f"limit {mlc.max_leaf_span_mm} mm")
    return x1, x2, jx, jy, open_


def sequence_beam(bf: BeamFluence, mlc: MlcGeometry, settings: SequencingSettings
                  ) -> SequencedBeam:
    """Sequence one beam's fluence map into deliverable segments (see module doc)."""
    lf = leaf_fluence(bf, mlc)
    bx = bf.bixel_mm[0]
    edges = np.concatenate((bf.x_mm - bx / 2, [bf.x_mm[-1] + bx / 2]))
    fmax = float(lf.max(initial=0.0))
    if not fmax > 0:
        return SequencedBeam(bf.beam, [], np.zeros_like(lf), lf, 0.0, 0, edges, 0)
    # Use the finest quantisation (most levels, at most ``settings.levels``) whose
    # decomposition already fits the machine limits (≤ ``max_segments`` merged apertures,
    # each ≥ min MU). Dropping whole apertures of a finer decomposition afterwards loses
    # fluence locally (e.g. the small apertures that shape the fall-off next to an organ at
    # risk); a coarser quantisation spreads the error over the map, and the MU are refitted
    # to the continuous map below.
    n_raw = 0
    for n_levels in range(settings.levels, 1, -1):
        delta = fmax / n_levels
        q = np.rint(lf / delta).astype(np.int64)
        raw = decompose(q, mlc.interdigitation)
        merged = _merge_apertures(raw)
        n_raw = n_raw or len(raw)
        if (len(merged) <= settings.max_segments_per_beam
                and min(v[1] for v in merged) * delta >= settings.min_mu_per_segment - 1e-9):
            break
    apert = [v[0] for v in merged]
    ncols = lf.shape[1]
    masks = np.array([aperture_mask(iv, ncols).ravel() for iv in apert], dtype=np.float64)
    area = masks.sum(axis=1)
    target = lf.ravel()
    mus = np.array([v[1] * delta for v in merged], dtype=np.float64)
    while len(apert) > 0 and (len(apert) > settings.max_segments_per_beam
                              or mus.min() < settings.min_mu_per_segment - 1e-9):
        k = int(np.argmin(mus * area))
        keep = np.arange(len(apert)) != k
        apert = [a for a, kk in zip(apert, keep) if kk]
        masks, area = masks[keep], area[keep]
        if not apert:
            mus = np.zeros(0)
            break
        mus, _ = nnls(masks.T, target)
        zero = mus <= 0
        if zero.any() and not zero.all():  # drop segments NNLS switched off
            nz = ~zero
            apert = [a for a, kk in zip(apert, nz) if kk]
            masks, area, mus = masks[nz], area[nz], mus[nz]
    segs = []
    for iv, mu in zip(apert, mus):
        x1, x2, jx, jy, op = _positions(iv, edges, mlc)
        segs.append(Segment(x1, x2, jx, jy, float(mu), op))
    return SequencedBeam(bf.beam, segs, q * delta, lf, delta, n_raw, edges, n_levels)


def segment_fluence(sb: SequencedBeam) -> np.ndarray:
    """Leaf-pair × column fluence (MU) delivered by the segments (open bixels only)."""
    n, c = sb.leaf_fluence_mu.shape
    out = np.zeros((n, c))
    centres = 0.5 * (sb.column_edges_mm[:-1] + sb.column_edges_mm[1:])
    for s in sb.segments:
        m = (centres[None, :] > s.mlc_x1_mm[:, None]) & (centres[None, :] < s.mlc_x2_mm[:, None])
        m &= s.open_pairs[:, None]
        out += s.mu * m
    return out


def sequenced_beam_to_beam(sb: SequencedBeam, template: Beam, mlc: MlcGeometry) -> Beam:
    """A step-and-shoot :class:`Beam` (control point pairs per segment, cumulative meterset
    weights normalised to 1, Beam Meterset = total MU) with ``template``'s geometry."""
    total = sb.total_mu
    if not total > 0:
        raise OptimizationError(f"beam {template.name}: no MU after sequencing")
    cps = []
    cum = 0.0
    for s in sb.segments:
        for w in (cum, cum + s.mu / total):
            cps.append(ControlPoint(index=len(cps), cumulative_meterset_weight=min(w, 1.0),
                                    jaw_x_mm=s.jaw_x_mm, jaw_y_mm=s.jaw_y_mm,
                                    mlc_x1_mm=s.mlc_x1_mm.copy(), mlc_x2_mm=s.mlc_x2_mm.copy()))
        cum += s.mu / total
    cps[-1].cumulative_meterset_weight = 1.0
    return Beam(number=template.number, name=template.name, gantry_deg=template.gantry_deg,
                collimator_deg=template.collimator_deg, couch_deg=template.couch_deg,
                isocenter_lps_mm=template.isocenter_lps_mm, control_points=cps,
                meterset_mu=total, energy_mv=template.energy_mv, sad_mm=template.sad_mm,
                leaf_boundaries_mm=np.asarray(mlc.leaf_boundaries_mm, dtype=np.float64),
                radiation_type=template.radiation_type, beam_type="DYNAMIC",
                treatment_machine_name=template.treatment_machine_name,
                final_cumulative_meterset_weight=1.0, description=template.description)


def check_deliverable(beam: Beam, mlc: MlcGeometry, settings: SequencingSettings) -> list[str]:
    """Violations of the machine limits by a sequenced beam (empty list = deliverable)."""
    problems = []
    segs = beam.segments()
    if len(segs) > settings.max_segments_per_beam:
        problems.append(f"{beam.name}: {len(segs)} segments > {settings.max_segments_per_beam}")
    for k, (cp, mu) in enumerate(segs):
        if mu < settings.min_mu_per_segment - 1e-6:
            problems.append(f"{beam.name} segment {k}: {mu:.2f} MU < {settings.min_mu_per_segment}")
        x1, x2 = np.asarray(cp.mlc_x1_mm), np.asarray(cp.mlc_x2_mm)
        if np.any(x2 - x1 < mlc.min_gap_mm - 1e-6):
            problems.append(f"{beam.name} segment {k}: leaf gap below {mlc.min_gap_mm} mm")
        lo_lim, hi_lim = mlc.leaf_position_range_mm
        if min(x1.min(), x2.min()) < lo_lim - 1e-6 or max(x1.max(), x2.max()) > hi_lim + 1e-6:
            problems.append(f"{beam.name} segment {k}: leaf beyond travel range")
        if not mlc.interdigitation:
            lb = np.asarray(mlc.leaf_boundaries_mm)
            # pairs inside the Y jaws must not interdigitate with their neighbours
            centre = 0.5 * (lb[:-1] + lb[1:])
            ins = np.flatnonzero((centre > cp.jaw_y_mm[0]) & (centre < cp.jaw_y_mm[1]))
            for i in ins[:-1]:
                if not (x1[i] < x2[i + 1] and x1[i + 1] < x2[i]):
                    problems.append(f"{beam.name} segment {k}: leaf pairs {i}/{i + 1} interdigitate")
    return problems


def sequence_plan_beams(dij: DoseInfluence, weights_mu: np.ndarray, templates: list[Beam],
                        mlc: MlcGeometry, settings: SequencingSettings) -> list[SequencedBeam]:
    """Sequence every beam of ``dij`` (beam ``b`` ↔ ``templates[b]``)."""
    out = []
    for b in range(len(templates)):
        out.append(sequence_beam(beam_fluence_map(dij, weights_mu, b), mlc, settings))
    return out


# --- segment weight optimisation (dose space) ----------------------------------------------


def segment_beamlet_matrix(dij: DoseInfluence, sequenced: list[SequencedBeam], mlc: MlcGeometry):
    """Sparse (n_beamlets × n_segments) matrix A (relative fluence of segment s at beamlet b):
    inside the jaws, the fraction c of the beamlet's width between the X1/X2 leaves of the
    leaf pair covering its centre plus ``mlc.mlc_transmission`` × (1 − c) (so a closed
    pair's minimum gap counts gap/bixel width); ``mlc.jaw_transmission`` × ``mlc_transmission`` outside the jaws (the
    leaves are behind the jaws there too). So D·(A·m) includes the leakage of every
    segment's MU at bixel resolution."""
    lb = np.asarray(mlc.leaf_boundaries_mm, dtype=np.float64)
    hx = 0.5 * float(dij.bixel_size_mm[0])
    rows, cols, vals = [], [], []
    s_idx = 0
    for sb in sequenced:
        idx = dij.beamlets_of(sb.beam)
        x = np.asarray(dij.bev_x_mm, dtype=np.float64)[idx]
        y = np.asarray(dij.bev_y_mm, dtype=np.float64)[idx]
        pair = np.clip(np.searchsorted(lb, y, side="right") - 1, 0, len(lb) - 2)
        for s in sb.segments:
            in_jaw = ((x > s.jaw_x_mm[0]) & (x < s.jaw_x_mm[1]) & (y > s.jaw_y_mm[0])
                      & (y < s.jaw_y_mm[1]))
            lo = np.maximum(s.mlc_x1_mm[pair], s.jaw_x_mm[0])
            hi = np.minimum(s.mlc_x2_mm[pair], s.jaw_x_mm[1])
            cover = np.clip(np.minimum(hi, x + hx) - np.maximum(lo, x - hx), 0.0, None) / (2 * hx)
            v = np.where(in_jaw, cover + mlc.mlc_transmission * (1.0 - cover),
                         mlc.mlc_transmission * mlc.jaw_transmission)
            nz = v > 0
            rows.append(idx[nz])
            cols.append(np.full(int(nz.sum()), s_idx))
            vals.append(v[nz])
            s_idx += 1
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    v = np.concatenate(vals) if vals else np.zeros(0)
    return sp.csr_matrix((v, (r, c)), shape=(dij.n_beamlets, s_idx))


def optimize_segment_weights(dij: DoseInfluence, objective, sequenced: list[SequencedBeam],
                             mlc: MlcGeometry, settings: SequencingSettings, *,
                             max_iter: int = 100, rounds: int = 4,
                             deadline_s: float | None = None, goal_rounds: int = 1,
                             rounds_out: list | None = None, ftol: float = 1e-5
                             ) -> list[SequencedBeam]:
    """Re-optimise the segments' MU in dose space (the same objective as the fluence
    optimisation, through the apertures' beamlets), L-BFGS-B with m ≥ 0. The dose of each
    segment per MU on the objective's rows (:meth:`Objective.columns_dose`) is computed once
    per drop round, so an evaluation costs a dense (rows × segments) product, not two Dij
    products. Segments that end
    below ``min_mu_per_segment`` are dropped and the rest re-optimised (up to ``rounds``).
    ``goal_rounds`` > 1: each optimisation runs inside the goal re-weighting loop
    (:func:`adaptive.optimization.fluence.reweighting_loop`; rounds appended to
    ``rounds_out``); ``ftol``: L-BFGS-B relative decrease at which each solve stops. Returns new :class:`SequencedBeam` objects (beams left without segments
    keep none)."""
    t0 = time.perf_counter()
    seq = [SequencedBeam(sb.beam, list(sb.segments), sb.quantised_leaf_fluence_mu,
                         sb.leaf_fluence_mu, sb.delta_mu, sb.n_segments_raw, sb.column_edges_mm,
                         sb.n_levels)
           for sb in sequenced]
    for _ in range(max(1, rounds)):
        a = segment_beamlet_matrix(dij, seq, mlc)
        m0 = np.array([s.mu for sb in seq for s in sb.segments], dtype=np.float64)
        if m0.size == 0:
            break
        scale = max(float(m0.mean()), 1e-6)
        at = a.T.tocsr()
        # dose of every segment per MU on the objective's rows, computed once: an evaluation
        # is then a small dense product instead of two products with the Dij
        ds = objective.columns_dose(a)
        dst = np.ascontiguousarray(ds.T)

        # the closures below are called only within this iteration of the loop
        def fun(x):
            m = x * scale  # noqa: B023
            f, gd, gw = objective.value_and_grads(ds @ m, a @ m)  # noqa: B023
            return f, (dst @ gd + at @ gw) * scale  # noqa: B023

        budget = None if deadline_s is None else max(0.0, deadline_s - (time.perf_counter() - t0))
        if budget is not None and budget <= 0:
            break

        def solve(x, _budget):
            res = minimize(fun, x, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * x.size,
                           options={"maxiter": max_iter, "ftol": ftol})
            xn = res.x if res.fun <= fun(x)[0] else x
            return np.maximum(xn, 0.0), int(res.nit), str(res.message), False

        if goal_rounds > 1:
            x, _st, _hit = reweighting_loop(
                objective, solve, m0 / scale,
                lambda x: objective.apply_correction(ds @ (x * scale)),  # noqa: B023
                deadline_s=budget, max_rounds=goal_rounds, rounds_out=rounds_out)
        else:
            x = solve(m0 / scale, budget)[0]
        m = np.maximum(x * scale, 0.0)
        k = 0
        low = False
        for sb in seq:
            keep = []
            for s in sb.segments:
                s.mu = float(m[k])
                k += 1
                if s.mu >= settings.min_mu_per_segment:
                    keep.append(s)
                else:
                    low = True
            sb.segments = keep
        if not low:
            break
    return seq


@dataclass(frozen=True)
class MinimumMuReport:
    """What :func:`enforce_minimum_mu` changed: segments raised to the minimum (their MU before,
    per fraction) and dropped (their MU), and the net MU change (MU per fraction)."""

    raised_mu: tuple[float, ...]
    dropped_mu: tuple[float, ...]

    @property
    def changed(self) -> bool:
        return bool(self.raised_mu or self.dropped_mu)

    def to_dict(self, min_mu: float) -> dict:
        return {"min_mu_per_segment": min_mu,
                "raised_from_mu": [round(m, 4) for m in self.raised_mu],
                "dropped_mu": [round(m, 4) for m in self.dropped_mu],
                "net_mu_change": round(len(self.raised_mu) * min_mu - sum(self.raised_mu)
                                       - sum(self.dropped_mu), 4)}


def enforce_minimum_mu(sequenced: list[SequencedBeam], min_mu: float, *,
                       raise_from: float = 0.5) -> MinimumMuReport:
    """Make every segment deliverable after a global MU scaling (plan normalisation) pushed
    some below the machine's minimum ``min_mu`` (MU per fraction): a segment with at least
    ``raise_from`` × ``min_mu`` is raised to ``min_mu`` (its dose grows by < a factor 2 of a
    segment already near the minimum: a negligible change of the plan's dose), a smaller one is
    dropped. In place; the caller recomputes the plan's dose when anything changed (the dose
    must be the dose of the plan as delivered)."""
    if not 0.0 < raise_from <= 1.0:
        raise ValueError(f"raise_from must be in (0, 1], got {raise_from}")
    raised, dropped = [], []
    for sb in sequenced:
        keep = []
        for sg in sb.segments:
            if sg.mu >= min_mu:
                keep.append(sg)
            elif sg.mu >= raise_from * min_mu:
                raised.append(float(sg.mu))
                sg.mu = float(min_mu)
                keep.append(sg)
            else:
                dropped.append(float(sg.mu))
        sb.segments = keep
    return MinimumMuReport(tuple(raised), tuple(dropped))
