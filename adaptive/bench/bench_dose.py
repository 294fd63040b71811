"""Dose engine benchmark: dose-influence matrix (Dij) of 9-beam IMRT on committed cases.

Cases: the TG-119 C-shape (``replay_data/tg119_cshape``: planning CT + RS.dcm PTV/BODY) and the
replay pelvis (``replay_data/manifest.toml`` -> pelvis01 planning CT + PTV/BODY). If the replay
C-shape is absent, a private phantom is built instead (water elliptical cylinder 400 x 250 x
200 mm, CT 2.5 mm, TG-119 C-shape PTV: annulus 15-37 mm open anteriorly, 80 mm long). Beams: 9
coplanar (gantry 0, 40, ..., 320 deg) at the PTV centroid, 5 mm beamlets, 3 mm dose grid.

Plan dose (:func:`adaptive.dose.plan_dose.plan_dose`, 3 mm grid) of the case's committed
planning RT Plan (``RP.dcm`` next to its CT), if any: per-stage times of independent calls, and
of a session-like sequence sharing one ``depth_cache`` (deliverable dose, a correction round,
an independent check at half the fluence resolution).

Each case runs in its own subprocess (``python -m adaptive.bench.bench_dose --case NAME``), so
its peak RSS is its own. Numba compilation is measured separately: a subprocess with an empty
temporary NUMBA_CACHE_DIR times its first (compiling) and second Dij call on a small phantom.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from adaptive.bench.stats import summary
from adaptive.dicom import read_ct_series, read_rtplan, read_rtstruct
from adaptive.dose.beam_model import load_beam_model
from adaptive.dose.density import hu_to_density
from adaptive.dose.dij import compute_dij, full_kernel_dose
from adaptive.dose.plan_dose import plan_dose
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Beam, ControlPoint
from adaptive.replay.manifest import load_manifest

# TG-119 C-shape dimensions (mm)
CORE_R, PTV_RIN, PTV_ROUT, LENGTH = 10.0, 15.0, 37.0, 80.0
REPLAY = Path(__file__).resolve().parents[2] / "replay_data"
#: the smoke run's case (``--smoke``): the private C-shape on a 10 mm grid, 10 mm dose grid
SMOKE_CASE, SMOKE_MM = "tg119_cshape_smoke", 10.0


def tg119_cshape(voxel_mm: float = 2.5) -> tuple[Volume, np.ndarray, np.ndarray, np.ndarray]:
    """(density Volume, PTV mask, core mask, body mask) on an LPS grid centred on the origin."""
    nx, ny, nz = int(400 / voxel_mm), int(250 / voxel_mm), int(200 / voxel_mm)
    g = Grid((nz, ny, nx), origin=[-(nx - 1) * voxel_mm / 2, -(ny - 1) * voxel_mm / 2,
                                   -(nz - 1) * voxel_mm / 2], spacing=[voxel_mm] * 3)
    p = g.voxel_centers_lps(np.float32)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    body = (x / 200.0) ** 2 + (y / 125.0) ** 2 <= 1.0
    r = np.hypot(x, y)
    inz = np.abs(z) <= LENGTH / 2
    core = (r <= CORE_R) & inz
    opening = (np.abs(x) < PTV_RIN) & (y < 0)
    ptv = (r >= PTV_RIN) & (r <= PTV_ROUT) & ~opening & inz
    rho = np.where(body, 1.0, 0.001).astype(np.float32)
    return Volume(rho, g, "relative electron density"), ptv, core, body


def nine_beams(iso=(0.0, 0.0, 0.0)) -> list[Beam]:
    out = []
    for i, ga in enumerate(range(0, 360, 40)):
        cps = [ControlPoint(0, 0.0, (-50.0, 50.0), (-50.0, 50.0)),
               ControlPoint(1, 1.0, (-50.0, 50.0), (-50.0, 50.0))]
        out.append(Beam(i + 1, f"G{ga}", float(ga), 0.0, 0.0, np.array(iso, dtype=float), cps,
                        100.0))
    return out


def _replay_case(case_dir: Path):
    """(density, PTV mask, BODY mask) on the CT grid of a replay case's planning data."""
    ct, _ = read_ct_series(case_dir / "planning" / "CT")
    ss = read_rtstruct(case_dir / "planning" / "RS.dcm", grid=ct.grid)
    return hu_to_density(ct), ss.mask("PTV", ct.grid), ss.mask("BODY", ct.grid)


def available_cases() -> list[str]:
    out = []
    out.append("tg119_cshape" if (REPLAY / "tg119_cshape" / "planning" / "RS.dcm").exists()
               else "tg119_cshape_private")
    if (REPLAY / "manifest.toml").exists() and (REPLAY / "pelvis01" / "planning" / "RS.dcm"
                                                ).exists():
        out.append("pelvis01")
    return out


def load_case(name: str):
    """(description, density, PTV mask, BODY mask, beams)."""
    if name == "tg119_cshape_private":
        rho, ptv, _, body = tg119_cshape()
        desc = "TG-119 C-shape, private phantom (water ellipse 40 x 25 cm, CT 2.5 mm)"
    elif name == SMOKE_CASE:
        rho, ptv, _, body = tg119_cshape(SMOKE_MM)
        desc = f"TG-119 C-shape, private phantom at {SMOKE_MM:g} mm (smoke run)"
    else:
        case_dir = _case_dir(name)
        if case_dir is None:
            raise FileNotFoundError(f"replay case {name!r} not found under {REPLAY}")
        rho, ptv, body = _replay_case(case_dir)
        sp = "x".join(f"{s:g}" for s in rho.grid.spacing)
        desc = f"{name} (replay_data planning CT {rho.grid.shape[::-1]} voxels of {sp} mm)"
    iso = np.round(rho.grid.voxel_centers_lps()[np.asarray(ptv, bool)].mean(axis=0), 1)
    return desc, rho, np.asarray(ptv, bool), np.asarray(body, bool), nine_beams(iso)


def _case_dir(name: str) -> Path | None:
    if name == "pelvis01":
        return load_manifest(REPLAY / "manifest.toml").case(name).directory
    d = REPLAY / name
    return d if d.is_dir() else None


def plan_dose_case(name: str, repeats: int) -> dict | None:
    """Time plan_dose of the case's planning RP.dcm on its planning CT (HU): ``repeats``
    independent calls (median per stage) and a 3-call sequence sharing a depth cache."""
    case_dir = _case_dir(name)
    rp = None if case_dir is None else next(iter(sorted(case_dir.rglob("RP.dcm"))), None)
    if rp is None or not (rp.parent / "CT").is_dir():
        return None
    ct, _ = read_ct_series(rp.parent / "CT")
    plan = read_rtplan(rp)
    bm = load_beam_model()
    plan_dose(ct, plan, beam_model=bm)  # numba cache load
    indep, loads = [], []
    for _ in range(repeats):
        tm: dict = {}
        loads.append(os.getloadavg()[0])
        plan_dose(ct, plan, beam_model=bm, timings=tm)
        indep.append(tm)
    seq = []
    cache: dict = {}
    for res_mm in (None, None, 2.0 * bm.fluence_resolution_mm):
        tm = {}
        plan_dose(ct, plan, beam_model=bm, fluence_resolution_mm=res_mm, depth_cache=cache,
                  timings=tm)
        seq.append(tm)
    med = {k: statistics.median(t[k] for t in indep) for k in indep[0]}
    return {"rp": str(rp.relative_to(REPLAY)), "beams": len(plan.beams),
            "shape": list(ct.grid.shape), "times": [t["total_s"] for t in indep],
            "stages": med, "sequence": seq, "loadavg": loads}


def run_case(name: str, repeats: int) -> dict:
    """Time the Dij of one case ``repeats`` times (after a first, cache-loading call) and check
    it against the full-kernel dose; returns a JSON-able dict."""
    bm = load_beam_model()
    t0 = time.perf_counter()
    desc, rho, ptv, body, beams = load_case(name)
    t_load = time.perf_counter() - t0

    def once():
        return compute_dij(rho, beams, ptv, body, beam_model=bm, bixel_size_mm=5.0,
                           dose_grid_spacing_mm=SMOKE_MM if name == SMOKE_CASE else 3.0,
                           margin_mm=5.0)

    loads = []
    t0 = time.perf_counter()
    dij = once()  # numba cache load (compilation is measured in its own process)
    t_first = time.perf_counter() - t0
    times, stages = [], []
    for _ in range(repeats):
        dij = None  # one matrix alive at a time: peak RSS reflects a single Dij
        loads.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        dij = once()
        times.append(time.perf_counter() - t0)
        stages.append(dij.timings_s)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    checks = []
    rng = np.random.default_rng(1)
    ptv_d = Volume(ptv, rho.grid).resample_to(dij.dose_grid, order=1).array.astype(bool)
    for label, w in (("uniform", np.ones(dij.n_beamlets)),
                     ("modulated (random 0-2)", rng.uniform(0.0, 2.0, dij.n_beamlets))):
        d_dij = dij.dose_volume(w).array
        d_full = full_kernel_dose(dij, rho, beams, w, beam_model=bm).array
        r = d_dij[ptv_d] / d_full[ptv_d]
        out = (d_full > 0.2 * d_full.max()) & ~ptv_d
        e = np.abs(d_dij[out] - d_full[out]) / d_full.max()
        checks.append((label, float(r.mean()), float(r.min()), float(r.max()),
                       float(100 * e.max()), float(100 * np.percentile(e, 95))))
    med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    pd = plan_dose_case(name, repeats)
    return {"plan_dose": pd, "name": name, "desc": desc, "beamlets": dij.n_beamlets, "rows": dij.n_voxels,
            "nnz": dij.nnz, "mb": dij.nbytes / 2**20, "times": times, "stages": med,
            "first": t_first, "rss_mb": rss_mb, "load_s": t_load, "checks": checks,
            "loadavg": loads}


def compile_time(cold: bool = True) -> dict:
    """First vs second call of compute_dij + full_kernel_dose on a small phantom in a
    subprocess with an empty NUMBA_CACHE_DIR: the difference is the numba compile time.
    ``cold=False`` (smoke run) keeps the environment's cache: the first call loads it."""
    code = (
        "import time, json, numpy as np\n"
        "from adaptive.bench.bench_dose import tg119_cshape, nine_beams\n"
        "from adaptive.dose.dij import compute_dij, full_kernel_dose\n"
        "rho, ptv, _, body = tg119_cshape(10.0)\n"
        "b = nine_beams()\n"
        "t = []\n"
        "for _ in range(2):\n"
        "    t0 = time.perf_counter()\n"
        "    d = compute_dij(rho, b, ptv, body, dose_grid_spacing_mm=10.0)\n"
        "    full_kernel_dose(d, rho, b, np.ones(d.n_beamlets))\n"
        "    t.append(time.perf_counter() - t0)\n"
        "print(json.dumps(t))\n")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp) if cold else dict(os.environ)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=1200, check=False)
        wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"compile-time subprocess failed: {res.stderr[-2000:]}")
    first, second = json.loads(res.stdout.strip().splitlines()[-1])
    return {"first": first, "second": second, "wall": wall}


def run(args) -> str:
    smoke = bool(getattr(args, "smoke", False))  # first case only, one repeat, warm cache
    repeats = 1 if smoke else max(3, int(getattr(args, "repeats", 3) or 3))
    lines = ["## dose", "",
             ("Dose-influence matrix, 9 coplanar beams at the PTV centroid, 5 mm beamlets, 3 mm "
             f"dose grid, beamlet margin 5 mm, {numba.get_num_threads()} numba threads; each "
             "case in its own process (peak RSS = that process)."), ""]
    comp = compile_time(cold=not smoke)
    lines.append(f"Numba {'warm cache (smoke run' if smoke else 'cold compile (empty cache'}"
                 f", subprocess; Dij + full-kernel dose on a 10 mm "
                 f"phantom): first call {comp['first']:.1f} s, second {comp['second']:.2f} s "
                 f"-> compile {comp['first'] - comp['second']:.1f} s.")
    lines.append("")
    for name in [SMOKE_CASE] if smoke else available_cases():
        res = subprocess.run([sys.executable, "-m", "adaptive.bench.bench_dose", "--case", name,
                              "--repeats", str(repeats)], capture_output=True, text=True,
                             timeout=3600, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"case {name} failed: {res.stderr[-2000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        st = r["stages"]
        lines += [f"### {r['desc']}", "", "| figure | value |", "|---|---|",
                  f"| beamlets | {r['beamlets']} |",
                  f"| rows (voxels) | {r['rows']:,} |",
                  f"| non-zeros | {r['nnz']:,} |",
                  f"| Dij memory (CSR + row map) | {r['mb']:.0f} MB |",
                  f"| Dij time (median, min-max) | {summary(r['times'])} |",
                  (f"| load average (1 min) during the runs | "
                  f"{', '.join(f'{x:.1f}' for x in r['loadavg'])} |"),
                  ("| stages (median): setup / count / depth / fill / scatter correction | "
                  f"{st['setup_s']:.2f} / {st['count_s']:.2f} / {st['depth_s']:.2f} / "
                  f"{st['fill_s']:.2f} / {st['scatter_correction_s']:.2f} s |"),
                  f"| first call in the process (numba cache load + run) | {r['first']:.2f} s |",
                  f"| peak RSS of the process | {r['rss_mb']:.0f} MB |",
                  f"| case load (DICOM read / phantom build) | {r['load_s']:.2f} s |"]
        for label, mean, lo, hi, emax, e95 in r["checks"]:
            lines.append(f"| Dij / full kernel, {label} weights: PTV mean ratio (min-max); "
                         f"outside PTV (> 20 % of max) max / 95th pct abs error, % of max | "
                         f"{mean:.3f} ({lo:.3f}-{hi:.3f}); {emax:.1f} / {e95:.1f} % |")
        pd = r.get("plan_dose")
        if pd:
            ps = pd["stages"]
            stage_keys = ("density_s", "body_s", "points_s", "depth_s", "fluence_s", "kernel_s")
            lines += [(f"| plan dose of {pd['rp']} ({pd['beams']} beams, 3 mm grid): time "
                       f"(median, min-max) | {summary(pd['times'])} |"),
                      "| plan dose stages (median): density / body / points / depth (Siddon) / "
                      "fluence rasterisation / kernel | "
                      + " / ".join(f"{ps[k]:.2f}" for k in stage_keys) + " s |",
                      "| plan dose, 3 calls sharing a depth cache (deliverable, correction, "
                      "check at 2x fluence pixel): total (depth) per call | "
                      + ", ".join(f"{t['total_s']:.2f} ({t['depth_s']:.2f})"
                                  for t in pd["sequence"]) + " s |",
                      (f"| load average (1 min) during the plan-dose runs | "
                       f"{', '.join(f'{x:.1f}' for x in pd['loadavg'])} |")]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case, max(1, a.repeats))))
    else:
        print(run(a))
