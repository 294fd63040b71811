"""The fluence-map optimisation objective: smooth penalties built from a site's clinical goals.

Every clinical goal gets its own penalty term at the goal's dose level, weighted by its
priority (:meth:`ClinicalGoals.goal_terms`); the optional hand-written ``[[objective]]``
entries of the goals file are added as extra terms. :meth:`Objective.goal_status` evaluates
the goals on the objective's dose model (normalised to the prescription goal) and
:meth:`Objective.reweight` multiplies the weights of failing goals' terms — the automatic
re-weighting loop of :func:`adaptive.optimization.fluence.optimize_fluence_goals`.

All doses are **per fraction, in Gy**; beamlet weights are in **MU per fraction**. Each term
is normalised by the number of voxels in its structure and by the prescribed dose per
fraction ``d_rx``, so weights in the goals file are comparable between structures:

* ``min_dose``  (underdose):  w/N Σ max(0, (D − d_v)/d_rx)²
* ``max_dose``  (overdose):   w/N Σ max(0, (d_v − D)/d_rx)²
* ``uniform``:                w/N Σ ((d_v − D)/d_rx)²
* ``mean_max`` (mean dose):   w · max(0, (mean(d) − D)/d_rx)²   (``mean_min``: min(0, …)²)
* ``dvh_max`` ("Dx ≤ D", Wu & Mohan dose–volume penalty): w/N Σ_{v: D < d_v ≤ Dx(d)} ((d_v − D)/d_rx)²,
  i.e. only the voxels between the constraint dose and the current Dx are pushed down;
* ``dvh_min`` ("Dx ≥ D"):     w/N Σ_{v: Dx(d) ≤ d_v < D} ((D − d_v)/d_rx)².

``Dx(d)`` uses the same percentile semantics as :func:`adaptive.optimization.goals.dose_at_volume`.
The DVH terms are piecewise quadratic; their gradient treats the active set as fixed (the
standard approach). An optional smoothness regulariser ``λ/P Σ_{neighbour pairs} ((w_i −
w_j)/w_s)²`` over adjacent beamlets of the same beam (``w_s``: the uniform weight that gives
the prescription on average in the target) eases MLC sequencing.

Only the Dij rows that belong to a structure with a term are kept (a row sub-matrix, sliced
once), and products go through :class:`adaptive.optimization.kernels.SparseOperator`.
Target and OAR voxels are all kept. Large structures (more than ``max_rows_per_structure``
voxels, typically BODY) are sampled in tiers, as commercial TPSs do: every voxel within
``keep_near_target_mm`` of the target, every 2nd voxel per axis (weight 8) out to
``half_resolution_mm``, every k-th voxel per axis (weight k³) beyond. Each term is a
sampling-weighted per-voxel mean, so the sample estimates the full-resolution objective at a
fraction of the cost. Clinical goals are always evaluated on all voxels.
Terms on the external contour (ROI named BODY or EXTERNAL) apply to BODY minus the target.

**Dose correction** (:meth:`Objective.set_dose_correction`): the Dij is a truncated pencil-
beam model of the beamlets; the deliverable dose of a sequenced plan comes from the plan-dose
engine (full kernel, transmission, leaf gaps). Given both doses for the same plan, the
objective can model the deliverable dose as ``d = r ⊙ (D·w) + c`` (per-voxel ratio ``r``
where the Dij dose is significant, additive residual ``c`` elsewhere), the dose-correction
approach of e.g. Siebers et al. 2002, used for segment-weight re-optimisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from adaptive.dose.influence import DoseInfluence
from adaptive.errors import OptimizationError
from adaptive.geometry.volume import Volume
from adaptive.optimization.goals import PRIORITY_WEIGHT, ClinicalGoals, ObjectiveTerm
from adaptive.optimization.kernels import SparseOperator
from adaptive.optimization.normalize import prescription_goal


@dataclass
class _Term:
    term: ObjectiveTerm
    rows: np.ndarray  # indices into the sub-dose vector
    weights: np.ndarray | None = None  # per-row sampling weights (None: all 1)
    scale: float = 1.0  # multiplier of term.weight set by the goal re-weighting
    shift: float = 0.0  # aim moved inside the goal by the re-weighting (Gy per fraction, ≥ 0)


@dataclass
class GoalStatus:
    """A clinical goal evaluated on the objective's dose model (used rows, after scaling the
    dose so that the prescription goal is exact). ``miss``: relative shortfall (> 0: fails)
    = −margin / prescription dose; ``value`` per fraction (Gy, or % for V metrics)."""

    index: int
    priority: int
    value: float
    passed: bool
    miss: float


def masks_to_rows(dij: DoseInfluence, masks: dict) -> dict[str, np.ndarray]:
    """ROI name → Dij row indices of the selected voxels inside the ROI's mask.

    ``masks`` values: boolean arrays/Volumes on ``dij.dose_grid``.
    """
    out = {}
    for name, m in masks.items():
        arr = m.array if isinstance(m, Volume) else np.asarray(m)
        if arr.shape != dij.dose_grid.shape:
            raise OptimizationError(f"mask {name!r} has shape {arr.shape}, dose grid is "
                                    f"{dij.dose_grid.shape}")
        out[name] = np.flatnonzero(arr.ravel().astype(bool)[dij.voxel_indices])
    return out


def _target_distance_rows(dij: DoseInfluence, target_mask) -> np.ndarray:
    """Per Dij row: Euclidean distance (mm) to the nearest target voxel (0 inside)."""
    t = (target_mask.array if isinstance(target_mask, Volume) else np.asarray(target_mask)).astype(bool)
    dist = ndimage.distance_transform_edt(~t, sampling=dij.dose_grid.spacing[::-1])
    return dist.ravel()[dij.voxel_indices]


def _near_target_rows(dij: DoseInfluence, target_mask, margin_mm: float) -> np.ndarray:
    """Boolean per Dij row: within ``margin_mm`` of the target (Euclidean, dose grid)."""
    return _target_distance_rows(dij, target_mask) <= margin_mm


def _lattice(dij: DoseInfluence, rows: np.ndarray, k: int) -> np.ndarray:
    """Boolean per row of ``rows``: on the regular lattice of every k-th voxel per axis."""
    if k <= 1:
        return np.ones(rows.size, bool)
    z, y, x = np.unravel_index(dij.voxel_indices[rows], dij.dose_grid.shape)
    return (z % k == 0) & (y % k == 0) & (x % k == 0)


def _subsample_rows(dij: DoseInfluence, rows: np.ndarray, dist_mm: np.ndarray, cap: int,
                    ring_mm: float, mid_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Tiered voxel sampling of a large structure (as commercial TPSs do).

    Rows within ``ring_mm`` of the target are all kept (weight 1); rows up to ``mid_mm`` on
    the lattice of every 2nd voxel per axis (weight 8); farther rows on the lattice of every
    k-th voxel (weight k³), k the smallest integer ≥ 2 that brings the total to about ``cap``.
    The weights are the sampling factors, so weighted per-voxel means over the sample
    estimate the means over the whole structure. Returns (rows, weights), rows sorted.
    """
    d = dist_mm[rows]
    t0 = rows[d <= ring_mm]
    m = rows[(d > ring_mm) & (d <= mid_mm)]
    m = m[_lattice(dij, m, 2)]
    far = rows[d > mid_mm]
    room = max(cap - t0.size - m.size, cap // 4)
    k = max(2, int(np.ceil((far.size / room) ** (1.0 / 3.0)))) if far.size else 2
    far = far[_lattice(dij, far, k)]
    r = np.concatenate([t0, m, far])
    w = np.concatenate([np.ones(t0.size), np.full(m.size, 8.0), np.full(far.size, float(k) ** 3)])
    o = np.argsort(r, kind="stable")
    return r[o], w[o]


def neighbour_pairs(dij: DoseInfluence) -> np.ndarray:
    """(P, 2) beamlet index pairs adjacent in X or Y within the same beam."""
    bx, by = (float(dij.bixel_size_mm[0]), float(dij.bixel_size_mm[1]))
    ix = np.rint(np.asarray(dij.bev_x_mm) / bx * 2).astype(np.int64)  # half-bixel units
    iy = np.rint(np.asarray(dij.bev_y_mm) / by * 2).astype(np.int64)
    key = {(int(b), int(x), int(y)): n for n, (b, x, y) in enumerate(zip(dij.beam_index, ix, iy))}
    pairs = []
    for (b, x, y), n in key.items():
        for dx, dy in ((2, 0), (0, 2)):
            m = key.get((b, x + dx, y + dy))
            if m is not None:
                pairs.append((n, m))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def _weighted_dx(dv: np.ndarray, om: np.ndarray | None, volume_pct: float) -> float:
    """Dx of voxel doses ``dv`` with sampling weights ``om`` (None: equal), same semantics as
    :func:`adaptive.optimization.goals.dose_at_volume` (weights count as voxel numbers)."""
    if om is None:
        n = dv.size
        k = min(max(1, math.ceil(volume_pct / 100.0 * n - 1e-9)), n)
        return float(np.partition(dv, n - k)[n - k])
    o = np.argsort(-dv, kind="stable")
    cw = np.cumsum(om[o])
    j = int(np.searchsorted(cw, max(volume_pct / 100.0 * cw[-1] - 1e-9, cw[0] * 0.5)))
    return float(dv[o[min(j, dv.size - 1)]])


class Objective:
    """Objective f(w) and gradient for beamlet weights ``w`` (MU per fraction).

    Parameters
    ----------
    dij: the dose-influence matrix (Gy per MU).
    masks: ROI name → boolean mask on ``dij.dose_grid`` (names matched case-insensitively).
    goals: the site's :class:`ClinicalGoals` (its ``objectives`` are the terms).
    smoothness: λ of the fluence smoothness regulariser (0 = off).
    dtype: float32 (production) or float64 (gradient checks).
    """

    def __init__(self, dij: DoseInfluence, masks: dict, goals: ClinicalGoals, *,
                 smoothness: float = 0.0, dtype=np.float32,
                 max_rows_per_structure: int | None = 20000, keep_near_target_mm: float = 6.0,
                 half_resolution_mm: float = 20.0, goal_terms: bool = True):
        self.dij = dij
        self.goals = goals
        self.d_rx = float(goals.prescription.dose_per_fraction_gy)
        self.fractions = int(goals.prescription.number_of_fractions)
        lower = {k.lower(): v for k, v in masks.items()}
        term_list = (goals.goal_terms() if goal_terms else []) + list(goals.objectives)
        if not term_list:
            raise OptimizationError("no objective terms: the goals file has no goals and no "
                                    "[[objective]] entries")
        needed = {t.structure.lower() for t in term_list}
        needed |= {g.structure.lower() for g in goals.goals if g.structure.lower() in lower}
        missing = sorted(n for n in needed if n not in lower)
        if missing:
            raise OptimizationError(f"objectives reference ROI(s) {missing} that are not in the "
                                    f"structure set (have {sorted(masks)})")
        rows_of = masks_to_rows(dij, {n: lower[n] for n in needed})
        for n, r in rows_of.items():
            if r.size == 0:
                raise OptimizationError(f"ROI {n!r} has no voxel in the dose-influence matrix "
                                        "(empty, or outside the computed voxels)")
        target = goals.prescription.target_roi_name.lower()
        # normal-tissue terms on the external contour act on BODY minus the target
        for n in list(rows_of):
            if n in ("body", "external") and target in rows_of and n != target:
                rows_of[n] = np.setdiff1d(rows_of[n], rows_of[target], assume_unique=True)
        self.subsampled: dict[str, tuple[int, int]] = {}
        weights_of: dict[str, np.ndarray] = {}
        if max_rows_per_structure and target in lower:
            dist = None
            for n, r in list(rows_of.items()):
                if n != target and r.size > max_rows_per_structure:
                    if dist is None:
                        dist = _target_distance_rows(dij, lower[target])
                    rows_of[n], weights_of[n] = _subsample_rows(
                        dij, r, dist, max_rows_per_structure, keep_near_target_mm,
                        max(half_resolution_mm, keep_near_target_mm))
                    self.subsampled[n] = (int(r.size), int(rows_of[n].size))
        used = np.unique(np.concatenate(list(rows_of.values())))
        remap = np.full(dij.n_voxels, -1, dtype=np.int64)
        remap[used] = np.arange(used.size)
        self.rows_used = used
        self.op = SparseOperator(dij.matrix[used], dtype=dtype)
        self.terms = [_Term(t, remap[rows_of[t.structure.lower()]],
                            weights_of.get(t.structure.lower())) for t in term_list]
        # rows (and sampling weights) of each goal's structure, for goal_status()
        self._goal_rows = [(remap[rows_of[g.structure.lower()]], weights_of.get(g.structure.lower()))
                           if g.structure.lower() in rows_of else None for g in goals.goals]
        self._target_rows = remap[rows_of[target]] if target in rows_of else None
        trows = (masks_to_rows(dij, {target: lower[target]})[target] if target in lower
                 else rows_of[next(iter(rows_of))])
        # uniform weight that delivers d_rx on average in the target
        rowsum = np.asarray(dij.matrix[trows].sum(axis=1)).ravel() if trows.size else np.ones(1)
        mean_rs = float(rowsum.mean()) if rowsum.size else 0.0
        if not mean_rs > 0:
            raise OptimizationError("no beamlet delivers dose to the target")
        self.w_scale = self.d_rx / mean_rs
        self.smoothness = float(smoothness)
        self.pairs = neighbour_pairs(dij) if smoothness > 0 else np.zeros((0, 2), np.int64)
        self.n_evaluations = 0
        self.ratio: np.ndarray | None = None
        self.offset: np.ndarray | None = None

    def set_dose_correction(self, dij_dose_gy: np.ndarray, true_dose_gy: np.ndarray,
                            min_fraction_of_rx: float = 0.05) -> dict:
        """Model the deliverable dose as r ⊙ (D·w) + c on the used rows.

        ``dij_dose_gy``/``true_dose_gy``: per-fraction doses of the same plan on all Dij rows
        (D·w of its segments' beamlet weights, and the plan-dose engine's dose). Where the
        Dij dose exceeds ``min_fraction_of_rx`` × d_rx, r = true/Dij (clipped to 0.5..2),
        c = 0; elsewhere r = 1 and c = true − Dij. Returns summary figures."""
        a = np.asarray(dij_dose_gy, dtype=np.float64)[self.rows_used]
        b = np.asarray(true_dose_gy, dtype=np.float64)[self.rows_used]
        sig = a > min_fraction_of_rx * self.d_rx
        r = np.ones_like(a)
        r[sig] = np.clip(b[sig] / a[sig], 0.5, 2.0)
        c = np.where(sig, 0.0, b - a)
        self.ratio, self.offset = r, c
        return {"median_ratio": float(np.median(r[sig])) if sig.any() else 1.0,
                "n_ratio_voxels": int(sig.sum()), "max_abs_offset_gy": float(np.abs(c).max())}

    def clear_dose_correction(self) -> None:
        self.ratio = self.offset = None

    @property
    def n_beamlets(self) -> int:
        return self.dij.n_beamlets

    def uniform_start(self) -> np.ndarray:
        """Uniform beamlet weights (MU) giving the prescription on average in the target."""
        return np.full(self.n_beamlets, self.w_scale, dtype=np.float64)

    def dose(self, w: np.ndarray) -> np.ndarray:
        """Per-fraction dose (Gy) on the used rows for weights ``w`` (MU)."""
        return self.op.dot(w)

    def value_and_grad_dose(self, d: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective value and its gradient with respect to the used-row doses ``d`` (Gy)."""
        d64 = d.astype(np.float64, copy=False)
        g = np.zeros_like(d64)
        f = 0.0
        s = 1.0 / self.d_rx
        for t in self.terms:
            dv = d64[t.rows]
            om = t.weights  # sampling weights (None: every voxel of the structure)
            n = dv.size if om is None else float(om.sum())
            typ = t.term.type
            # aim: the term's dose level, moved inside the goal by the re-weighting
            ref = t.term.dose_gy + (t.shift if typ in ("min_dose", "dvh_min", "mean_min")
                                    else -t.shift)
            wgt = t.term.weight * t.scale
            if typ in ("mean_max", "mean_min"):
                mean = dv.mean() if om is None else float(om @ dv) / n
                ex = (mean - ref) * s
                if (ex > 0) == (typ == "mean_max") and ex != 0:
                    f += wgt * ex * ex
                    g[t.rows] += 2.0 * wgt * ex * s / n * (1.0 if om is None else om)
                continue
            if typ == "min_dose":
                diff = np.minimum(dv - ref, 0.0)
            elif typ == "max_dose":
                diff = np.maximum(dv - ref, 0.0)
            elif typ == "uniform":
                diff = dv - ref
            elif typ in ("dvh_max", "dvh_min"):
                dx = _weighted_dx(dv, om, t.term.volume_pct)
                if typ == "dvh_max":
                    act = (dv > ref) & (dv <= dx)
                else:
                    act = (dv < ref) & (dv >= dx)
                diff = np.where(act, dv - ref, 0.0)
            else:  # pragma: no cover - validated by the loader
                raise OptimizationError(f"unknown objective type {typ!r}")
            c = wgt / n * s * s
            wd = diff if om is None else om * diff
            f += c * float(wd @ diff)
            g[t.rows] += 2.0 * c * wd
        return f, g

    # --- goal evaluation on the dose model and automatic re-weighting ---------------------

    def model_dose(self, w: np.ndarray) -> np.ndarray:
        """Dose model on the used rows (Gy per fraction): D·w, with the dose correction."""
        d = self.op.dot(w).astype(np.float64)
        if self.ratio is not None:
            d = d * self.ratio + self.offset
        return d

    def goal_status(self, d: np.ndarray, normalize: bool = True) -> list[GoalStatus]:
        """Every clinical goal on the used-row dose ``d`` (Gy per fraction), after scaling
        ``d`` so that the prescription goal is exact (as plan normalisation does) when
        ``normalize``. Goals on structures without rows fail (miss = inf)."""
        d_raw = np.asarray(d, dtype=np.float64)
        d = d_raw
        pg = prescription_goal(self.goals)
        if normalize and self._target_rows is not None and pg is not None:
            have = self._metric(d, self._target_rows, None, pg.metric)
            if np.isfinite(have) and have > 0:
                d = d * (pg.value / have)
        out = []
        for i, g in enumerate(self.goals.goals):
            gr = self._goal_rows[i]
            if gr is None:
                out.append(GoalStatus(i, g.priority, float("nan"), False, math.inf))
                continue
            # normalisation makes the prescription goal exact: judge it before scaling, so
            # that a plan that only meets it by being scaled up (hot spots, OARs) has its
            # target term re-weighted too
            v = self._metric(d_raw if g is pg else d, gr[0], gr[1], g.metric)
            tol = 1e-6 * max(abs(g.value), 1e-9)
            margin = v - g.value if g.op == ">=" else g.value - v
            if g.metric.startswith("V"):  # % volume: relative to 100 %, scaled like dose
                miss = -margin / 100.0
            else:
                miss = -margin / self.d_rx
            out.append(GoalStatus(i, g.priority, float(v), bool(margin >= -tol), float(miss)))
        return out

    def _metric(self, d, rows, om, metric: str) -> float:
        dv = d[rows]
        if dv.size == 0:
            return float("nan")
        m = metric.lower()
        if m == "dmean":
            return float(dv.mean() if om is None else (om @ dv) / om.sum())
        if m == "dmax":
            return float(dv.max())
        if m == "dmin":
            return float(dv.min())
        if m.startswith("d"):
            return _weighted_dx(dv, om, float(m[1:]))
        thr = float(m[1:]) / self.fractions
        hit = dv >= thr
        return float(100.0 * (hit.mean() if om is None else om[hit].sum() / om.sum()))

    def reweight(self, status: list[GoalStatus], gain: float = 50.0, max_factor: float = 8.0,
                 max_shift: float = 0.05) -> int:
        """Re-weight the terms of failing goals of the most important failing priority
        (lower priorities wait until the higher ones pass). With miss = relative shortfall
        (e.g. 0.02 = 2 % of the prescription): weight × clip(1 + gain × miss, 1.5,
        ``max_factor``), and the term's aim moves inside the goal by miss × prescription
        (cumulative, at most ``max_shift`` × prescription) — a quadratic penalty at the goal
        level always leaves a residual violation; moving the aim by the observed violation
        (as augmented-Lagrangian updates do) removes it in few rounds. A term of priority p >
        1 is never raised above the initial weight of priority p − 1 (multiplier ≤
        ``PRIORITY_WEIGHT``): rounds spent on a "nice to have" goal (e.g. TG-119's hard core
        goal) must not invert the priorities and trade away a "must" goal. Returns the number
        of terms re-weighted."""
        n = 0
        failing = [st.priority for st in status if not st.passed]
        if not failing:
            return 0
        top = min(failing)
        for st in status:
            if st.passed or st.priority != top:
                continue
            miss = st.miss if np.isfinite(st.miss) else 1.0
            f = float(np.clip(1.0 + gain * miss, 1.5, max_factor))
            g = self.goals.goals[st.index]
            for t in self.terms:
                if t.term.goal_index == st.index:
                    t.scale *= f
                    if g.priority > 1:
                        t.scale = min(t.scale, PRIORITY_WEIGHT)
                    if not g.metric.startswith("V"):
                        t.shift = min(t.shift + max(miss, 0.0) * self.d_rx, max_shift * self.d_rx)
                    n += 1
        return n

    @property
    def term_scales(self) -> list[tuple[float, float]]:
        """(weight multiplier, aim shift in Gy per fraction) of every term."""
        return [(t.scale, t.shift) for t in self.terms]

    def set_term_scales(self, scales) -> None:
        for t, (sc, sh) in zip(self.terms, scales):
            t.scale, t.shift = float(sc), float(sh)

    def smooth_value_and_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        grad = np.zeros(self.n_beamlets)
        if self.smoothness <= 0 or self.pairs.size == 0:
            return 0.0, grad
        a, b = self.pairs[:, 0], self.pairs[:, 1]
        diff = (w[a] - w[b]) / self.w_scale
        c = self.smoothness / len(self.pairs)
        f = c * float(diff @ diff)
        gd = 2.0 * c * diff / self.w_scale
        grad += np.bincount(a, weights=gd, minlength=self.n_beamlets)
        grad -= np.bincount(b, weights=gd, minlength=self.n_beamlets)
        return f, grad

    def apply_correction(self, d: np.ndarray) -> np.ndarray:
        """Dose model of used-row Dij doses ``d`` (Gy): with the dose correction, if set."""
        d = np.asarray(d, dtype=np.float64)
        return d if self.ratio is None else d * self.ratio + self.offset

    def value_and_grads(self, d: np.ndarray, w: np.ndarray
                        ) -> tuple[float, np.ndarray, np.ndarray]:
        """f and its gradients for used-row Dij doses ``d`` = D·w (Gy) computed elsewhere
        (e.g. from a precomputed segment-dose matrix): (f, ∂f/∂d, ∂f/∂w of the smoothness
        term). ∂f/∂w = Dᵀ·∂f/∂d + the last, as :meth:`__call__` returns it."""
        self.n_evaluations += 1
        f, gd = self.value_and_grad_dose(self.apply_correction(d))
        if self.ratio is not None:
            gd = gd * self.ratio
        fs, gs = self.smooth_value_and_grad(np.asarray(w, dtype=np.float64))
        return f + fs, gd, gs

    def columns_dose(self, a) -> np.ndarray:
        """Dense (used rows × k) matrix D·A for a sparse (beamlets × k) ``a`` (Gy per unit
        column weight), e.g. the dose of each MLC segment per MU."""
        return self.op.matmat_sparse(a)

    def __call__(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """(f, ∂f/∂w) at weights ``w`` (MU); gradient in float64."""
        self.n_evaluations += 1
        d = self.op.dot(w)
        if self.ratio is not None:
            d = d * self.ratio + self.offset
        f, gd = self.value_and_grad_dose(d)
        if self.ratio is not None:
            gd = gd * self.ratio
        grad = self.op.tdot(gd.astype(self.op.dtype)).astype(np.float64)
        fs, gs = self.smooth_value_and_grad(np.asarray(w, dtype=np.float64))
        return f + fs, grad + gs

    def value(self, w: np.ndarray) -> float:
        return self(w)[0]
