"""Plan optimisation benchmark: TG-119 C-shape and prostate from the committed replay cases
(``replay_data/tg119_*/planning``: CT + RT Struct), 9 beams at 0, 40, …, 320°, 5 mm
beamlets, 3 mm dose grid. Computes the Dij once, times the fluence optimisation alone
(median and spread over repeats, same objective and settings as ``plan_case``), then runs
``plan_case`` on that Dij (optimise, normalise, sequence, segment weights, plan dose, dose
correction, normalise, checks) and reports the goal tables (optimised fluence vs
deliverable plan), segments and MU."""

from __future__ import annotations

import os
import time
from pathlib import Path

from adaptive.bench.stats import summary
from adaptive.dicom import read_ct_series, read_rtstruct
from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.density import hu_to_density
from adaptive.optimization.fluence import optimize_fluence_goals
from adaptive.optimization.goals import goal_table, load_goals
from adaptive.optimization.objective import Objective
from adaptive.pipeline.planning import PlanSettings, plan_case, stage_beams, stage_dij, stage_masks

REPO = Path(__file__).resolve().parents[2]


#: the smoke run's planning settings (``--smoke``): a coarse Dij, two re-weighting rounds
SMOKE_SETTINGS = {"dose_grid_spacing_mm": 6.0, "bixel_size_mm": 10.0, "goal_rounds": 2}


def _case(kind: str, repeats: int, smoke: bool = False) -> list[str]:
    case = REPO / "replay_data" / f"tg119_{kind}" / "planning"
    ct, series = read_ct_series(case / "CT")
    ss = read_rtstruct(case / "RS.dcm", series=series, grid=ct.grid)
    goals = load_goals(REPO / "config" / "goals" / f"tg119_{kind}.toml")
    s = PlanSettings(**SMOKE_SETTINGS) if smoke else PlanSettings()
    bm = load_beam_model()
    t0 = time.perf_counter()
    ct_masks, masks = stage_masks(ct, ss, goals, s.dose_grid_spacing_mm)
    templates = stage_beams(ct_masks, ct, goals, s.n_beams, None, bm)
    dij = stage_dij(hu_to_density(ct), templates, ct_masks, goals, bm, s)
    t_dij = time.perf_counter() - t0
    t0 = time.perf_counter()
    obj = Objective(dij, masks, goals, smoothness=s.smoothness)
    t_obj = time.perf_counter() - t0
    times, iters, nrounds = [], [], []
    scales = obj.term_scales
    for _ in range(repeats):
        obj.set_term_scales(scales)  # each repeat starts from the priority weights
        r = optimize_fluence_goals(dij, obj, max_iter=s.max_iter, ftol=s.ftol,
                                   max_rounds=s.goal_rounds)
        times.append(r.time_s)
        iters.append(r.iterations)
        nrounds.append(len(r.rounds))
    t0 = time.perf_counter()
    res = plan_case(ct, series, ss, goals, settings=s, dij=dij)
    total = time.perf_counter() - t0
    nfl = res.info.get("normalization_fluence", {})
    ndl = res.info.get("normalization_deliverable", {})
    rx = goals.prescription.dose_per_fraction_gy
    return [f"### TG-119 {kind} (replay_data/tg119_{kind}/planning)", "",
            (f"- Dij: {dij.n_voxels} voxels × {dij.n_beamlets} beamlets, {dij.nnz / 1e6:.1f} M "
            f"non-zeros ({dij.nbytes / 2**20:.0f} MiB), computed in {t_dij:.1f} s"),
            (f"- objective: {obj.rows_used.size} rows, {obj.op.nnz / 1e6:.1f} M non-zeros "
            f"({obj.op.nbytes / 2**20:.0f} MiB), sampled {obj.subsampled}; setup {t_obj:.1f} s"),
            (f"- fluence optimisation with goal re-weighting (ftol {s.ftol:g}, ≤ {s.goal_rounds} "
            f"rounds): **{summary(times)}**, iterations {iters}, rounds {nrounds}"),
            "- re-weighting rounds in plan_case (fluence): " + "; ".join(
                f"#{x['round']} {x['iterations']} it {x['time_s']:.1f} s, failing "
                f"{x['failing'] or 'none'}" for x in res.info.get("reweighting_fluence", [])),
            "- re-weighting rounds in plan_case (segment weights, corrected dose): " + "; ".join(
                f"#{x['round']} {x['iterations']} it {x['time_s']:.2f} s, failing "
                f"{x['failing'] or 'none'}" for x in res.info.get("reweighting_segments_1", [])),
            (f"- normalisation factors (to {nfl.get('structure')} {nfl.get('metric')}): fluence "
            f"{nfl.get('factor', float('nan')):.4f}, deliverable {ndl.get('factor', float('nan')):.4f}"),
            f"- plan_case on this Dij: {total:.1f} s; stages: "
            + ", ".join(f"{k} {v:.1f}" for k, v in res.timings_s.items()),
            (f"- segments per beam {[len(b.segments()) for b in res.plan.beams]} "
            f"(decomposition at the configured levels {res.info.get('segments_raw')}; "
            f"levels used {res.info.get('intensity_levels')}), total MU {res.plan.total_mu:.0f} "
            f"({res.plan.total_mu / rx:.0f} MU/Gy)"),
            f"- plan checks: {'passed' if res.checks.passed else 'FAILED'}; "
            + "; ".join(f"{i.name}: {i.detail}" for i in res.checks.items if not i.passed),
            "", "```",
            goal_table(res.goals_fluence, "optimised fluence (Dij dose, normalised), total-course Gy:"),
            "", goal_table(res.goals_deliverable, "deliverable plan (plan-dose engine, normalised):"),
            "```", ""]


def run(args) -> str:
    smoke = bool(getattr(args, "smoke", False))  # the C-shape only, one optimisation
    repeats = 1 if smoke else max(3, getattr(args, "repeats", 3))
    load = ""
    if Path("/proc/loadavg").is_file():
        load = Path("/proc/loadavg").read_text().split()[:3]
    lines = ["## plan (fluence optimisation, sequencing, deliverable dose)", "",
             (f"load average at start: {' '.join(load)}; OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY', '')}"), ""]
    for kind in ("cshape",) if smoke else ("cshape", "prostate"):
        lines += _case(kind, repeats, smoke)
    return "\n".join(lines)
