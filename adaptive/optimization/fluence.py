"""Fluence-map optimisation: non-negative beamlet weights (MU per fraction) by L-BFGS-B,
anytime with a deadline.

The optimiser works on scaled variables x = w / w_s (``w_s``: :attr:`Objective.w_scale`, the
uniform weight giving the prescription on average in the target) so that x is O(1). Every
function evaluation is a feasible point (L-BFGS-B keeps x within its bounds), so the best
point evaluated so far is always a valid plan: when the deadline is reached the optimiser
stops at the next function evaluation and returns that best point, flagged
``stopped_early=True`` with the reason. The result does not depend on timing unless the
deadline stops it (the numba products are row-parallel without atomics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from adaptive.dose.influence import DoseInfluence
from adaptive.errors import OptimizationError
from adaptive.model.plan import Plan
from adaptive.optimization.objective import Objective


@dataclass
class FluenceResult:
    """Outcome of :func:`optimize_fluence`.

    ``weights_mu``: beamlet weights (MU per fraction), ≥ 0 and finite.
    ``history``: (elapsed s, best objective value) after every L-BFGS-B iteration.
    ``reason``: "converged: <scipy message>", "max_iter", or "deadline".
    """

    weights_mu: np.ndarray
    objective_value: float
    iterations: int
    stopped_early: bool
    reason: str
    history: list[tuple[float, float]] = field(default_factory=list)
    time_s: float = 0.0
    n_evaluations: int = 0
    initial_objective_value: float = float("nan")
    rounds: list[dict] = field(default_factory=list)  # goal re-weighting rounds, if any


class _DeadlineReached(Exception):
    pass


def optimize_fluence(dij: DoseInfluence, objective: Objective, *, w0: np.ndarray | None = None,
                     deadline_s: float | None = None, max_iter: int = 400,
                     ftol: float = 1e-6, gtol: float = 1e-8, maxcor: int = 20) -> FluenceResult:
    """Minimise ``objective`` over beamlet weights w ≥ 0 (MU per fraction).

    ``w0``: warm start (e.g. :func:`fluence_from_plan` of the scheduled plan); default the
    uniform weights of :meth:`Objective.uniform_start`. ``deadline_s``: wall-time budget in
    seconds from the call; when exceeded, the best iterate so far is returned with
    ``stopped_early=True, reason="deadline"`` (overshoot: at most one function evaluation).
    ``ftol``: relative objective decrease at which L-BFGS-B stops (float32 products make
    tighter values meaningless).
    """
    t0 = time.perf_counter()
    if objective.dij is not dij and objective.n_beamlets != dij.n_beamlets:
        raise OptimizationError(f"objective has {objective.n_beamlets} beamlets, Dij has "
                                f"{dij.n_beamlets}")
    n = dij.n_beamlets
    ws = objective.w_scale
    if w0 is None:
        w0 = objective.uniform_start()
    w0 = np.asarray(w0, dtype=np.float64).reshape(-1)
    if w0.shape != (n,):
        raise OptimizationError(f"w0 has {w0.shape[0]} weights, Dij has {n} beamlets")
    if not np.all(np.isfinite(w0)):
        raise OptimizationError("w0 contains NaN/inf")
    x0 = np.maximum(w0, 0.0) / ws

    best = {"f": np.inf, "x": x0.copy()}
    history: list[tuple[float, float]] = []
    state = {"iter": 0, "nfev": 0}

    def fun(x):
        if deadline_s is not None and state["nfev"] > 0 and time.perf_counter() - t0 > deadline_s:
            raise _DeadlineReached
        state["nfev"] += 1
        f, g = objective(x * ws)
        if not np.isfinite(f):
            raise OptimizationError("objective is not finite")
        if f < best["f"]:
            best["f"] = float(f)
            best["x"] = x.copy()
        return f, g * ws

    def callback(intermediate_result):
        state["iter"] += 1
        history.append((time.perf_counter() - t0, best["f"]))

    f_init = float("nan")
    stopped, reason = False, ""
    try:
        f_init = fun(x0)[0]
        res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * n,
                       callback=callback,
                       options={"maxiter": int(max_iter), "maxcor": int(maxcor), "ftol": ftol,
                                "gtol": gtol, "maxfun": 20 * int(max_iter) + 20})
        if res.nit >= max_iter:
            reason = "max_iter"
            stopped = True
        else:
            reason = f"converged: {res.message}"
    except _DeadlineReached:
        stopped, reason = True, "deadline"
    w = np.maximum(best["x"] * ws, 0.0)
    if not np.all(np.isfinite(w)):
        raise OptimizationError("optimised weights are not finite")
    return FluenceResult(weights_mu=w, objective_value=best["f"], iterations=state["iter"],
                         stopped_early=stopped, reason=reason, history=history,
                         time_s=time.perf_counter() - t0, n_evaluations=state["nfev"],
                         initial_objective_value=f_init)


def fluence_from_plan(plan: Plan, dij: DoseInfluence, beam_map: list[int] | None = None) -> np.ndarray:
    """Beamlet weights (MU per fraction) equivalent to a plan's MLC segments.

    Each segment's MU is projected onto the beamlets: a beamlet whose centre (``bev_x_mm``,
    ``bev_y_mm`` at the isocenter plane) lies in an (open or closed) leaf pair inside the jaws
    gets MU × the fraction of its width along X that lies between the pair's X1 and X2 leaves
    (and the X jaws) — so a closed pair's minimum gap contributes gap/bixel width. ``beam_map[b]`` = index
    of the plan beam that Dij beam ``b`` corresponds to (default: identity).
    """
    w = np.zeros(dij.n_beamlets, dtype=np.float64)
    nb = int(dij.beam_index.max()) + 1 if dij.n_beamlets else 0
    beam_map = list(range(nb)) if beam_map is None else beam_map
    for b in range(nb):
        if beam_map[b] >= len(plan.beams):
            raise OptimizationError(f"Dij beam {b} has no counterpart in the plan "
                                    f"({len(plan.beams)} beams)")
        beam = plan.beams[beam_map[b]]
        idx = dij.beamlets_of(b)
        x = np.asarray(dij.bev_x_mm)[idx]
        y = np.asarray(dij.bev_y_mm)[idx]
        hx = 0.5 * float(dij.bixel_size_mm[0])
        for cp, mu in beam.segments():
            inside = (y > cp.jaw_y_mm[0]) & (y < cp.jaw_y_mm[1])
            lo = np.full(x.shape, float(cp.jaw_x_mm[0]))
            hi = np.full(x.shape, float(cp.jaw_x_mm[1]))
            if cp.mlc_x1_mm is not None and beam.leaf_boundaries_mm is not None:
                lb = np.asarray(beam.leaf_boundaries_mm, dtype=np.float64)
                pair = np.searchsorted(lb, y, side="right") - 1
                ok = (pair >= 0) & (pair < len(lb) - 1)
                pc = np.clip(pair, 0, len(lb) - 2)
                lo = np.maximum(lo, np.asarray(cp.mlc_x1_mm, dtype=np.float64)[pc])
                hi = np.minimum(hi, np.asarray(cp.mlc_x2_mm, dtype=np.float64)[pc])
                inside &= ok
            cover = np.clip(np.minimum(hi, x + hx) - np.maximum(lo, x - hx), 0.0, None) / (2 * hx)
            w[idx] += mu * np.where(inside, cover, 0.0)
    return w


@dataclass
class ReweightRound:
    """One round of the goal re-weighting loop: optimiser outcome and the goals after it
    (evaluated on the dose model, normalised to the prescription goal)."""

    round: int
    iterations: int
    time_s: float
    reason: str
    failing: list[str]
    failing_priority1: int
    score: float

    def to_dict(self) -> dict:
        return {"round": self.round, "iterations": self.iterations,
                "time_s": round(self.time_s, 3), "reason": self.reason,
                "failing": self.failing, "failing_priority1": self.failing_priority1,
                "score": self.score}


def goal_score(status) -> tuple[int, float]:
    """(number of failing priority-1 goals, Σ 10^(1−priority) × relative miss of failing
    goals): lower is better, compared lexicographically."""
    p1 = sum(1 for s in status if not s.passed and s.priority == 1)
    miss = sum(10.0 ** (1 - s.priority) * min(s.miss, 10.0) for s in status if not s.passed)
    return p1, float(miss)


def reweighting_loop(objective: Objective, solve, x0: np.ndarray, dose_of, *,
                     deadline_s: float | None, max_rounds: int, t0: float | None = None,
                     rounds_out: list | None = None):
    """Generic goal re-weighting loop (used for beamlet and for segment weights).

    ``solve(x, budget_s)`` → (x_new, iterations, reason, stopped_by_deadline) optimises the
    current objective from ``x``; ``dose_of(x)`` → the used-row dose model. After each round
    the goals are evaluated (:meth:`Objective.goal_status`); the loop stops when every
    priority-1 goal passes and nothing else fails, when every priority-1 goal passes and the
    goal score stops improving, at ``max_rounds`` or at the deadline. Failing goals' weights are multiplied before the next,
    warm-started, round. Returns (best x by :func:`goal_score`, its status, deadline_hit);
    the term weights are left at those that produced the best x."""
    t0 = time.perf_counter() if t0 is None else t0
    rounds = [] if rounds_out is None else rounds_out
    best = None
    x = x0
    deadline_hit = False
    for k in range(max(1, max_rounds)):
        budget = None if deadline_s is None else deadline_s - (time.perf_counter() - t0)
        if budget is not None and budget <= 0 and best is not None:
            deadline_hit = True
            break
        ts = time.perf_counter()
        x, iters, reason, hit = solve(x, budget)
        status = objective.goal_status(dose_of(x))
        score = goal_score(status)
        rounds.append(ReweightRound(k + 1, iters, time.perf_counter() - ts, reason,
                                    [objective.goals.goals[s.index].structure + " "
                                     + objective.goals.goals[s.index].text
                                     for s in status if not s.passed],
                                    score[0], round(score[1], 5)))
        improved = best is None or score < best[1]
        if improved:
            best = (x.copy(), score, status, objective.term_scales)
        if hit:
            deadline_hit = True
            break
        if score == (0, 0.0):
            break
        # stop when all priority-1 goals pass and the lower priorities stopped improving;
        # while a priority-1 goal fails, its weight keeps growing until max_rounds
        if not improved and score[0] == 0:
            break
        objective.reweight(status)
    objective.set_term_scales(best[3])
    return best[0], best[2], deadline_hit


def optimize_fluence_goals(dij: DoseInfluence, objective: Objective, *,
                           w0: np.ndarray | None = None, deadline_s: float | None = None,
                           max_iter: int = 400, ftol: float = 1e-6, gtol: float = 1e-8,
                           maxcor: int = 20, max_rounds: int = 6) -> FluenceResult:
    """:func:`optimize_fluence` inside the automatic goal re-weighting loop
    (:func:`reweighting_loop`): optimise, evaluate the clinical goals on the normalised dose
    model, multiply the weights of failing goals, re-optimise warm-started; the whole loop
    honours ``deadline_s`` (best round returned, ``stopped_early=True, reason="deadline"``).
    ``FluenceResult.rounds`` lists the rounds."""
    t0 = time.perf_counter()
    state = {"iters": 0, "nfev": 0, "f0": float("nan"), "hist": []}

    def solve(w, budget):
        r = optimize_fluence(dij, objective, w0=w, deadline_s=budget, max_iter=max_iter,
                             ftol=ftol, gtol=gtol, maxcor=maxcor)
        if state["iters"] == 0 and state["nfev"] == 0:
            state["f0"] = r.initial_objective_value
        state["iters"] += r.iterations
        state["nfev"] += r.n_evaluations
        state["hist"] += [(t + (time.perf_counter() - t0 - r.time_s), f) for t, f in r.history]
        return r.weights_mu, r.iterations, r.reason, r.reason == "deadline"

    rounds: list[ReweightRound] = []
    w_start = objective.uniform_start() if w0 is None else np.asarray(w0, dtype=np.float64)
    w, _status, hit = reweighting_loop(objective, solve, w_start, objective.model_dose,
                                       deadline_s=deadline_s, max_rounds=max_rounds, t0=t0,
                                       rounds_out=rounds)
    f = float(objective(w)[0])
    res = FluenceResult(weights_mu=w, objective_value=f, iterations=state["iters"],
                        stopped_early=hit, reason="deadline" if hit else
                        (rounds[-1].reason if rounds else ""), history=state["hist"],
                        time_s=time.perf_counter() - t0, n_evaluations=state["nfev"],
                        initial_objective_value=state["f0"])
    res.rounds = [r.to_dict() for r in rounds]
    return res
