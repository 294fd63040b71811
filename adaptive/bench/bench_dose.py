"""Dose engine benchmark: dose-influence matrix for the AAPM TG-119 C-shape phantom.

Phantom (built here, self-contained): water elliptical cylinder 400 mm (left-right) x 250 mm
(anterior-posterior) x 200 mm long, CT voxels 2.5 mm. TG-119 C-shape geometry: core cylinder
radius 10 mm, PTV = annulus of radii 15-37 mm (5 mm gap around the core) open towards
anterior over the width of core + gap (|x| < 15 mm, y < 0), both 80 mm long, centred on the
isocenter. Beams: 9 coplanar, gantry 0, 40, ..., 320 deg, 5 mm beamlets, 3 mm dose grid.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from adaptive.bench.stats import summary
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Beam, ControlPoint

# TG-119 C-shape dimensions (mm)
CORE_R, PTV_RIN, PTV_ROUT, LENGTH = 10.0, 15.0, 37.0, 80.0


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
        out.append(Beam(i + 1, f"G{ga}", float(ga), 0.0, 0.0, np.array(iso), cps, 100.0))
    return out


def run(args) -> str:
    import numba

    from adaptive.dose.beam_model import load_beam_model
    from adaptive.dose.dij import compute_dij

    repeats = max(3, int(getattr(args, "repeats", 3) or 3))
    bm = load_beam_model()
    t0 = time.perf_counter()
    rho, ptv, core, body = tg119_cshape()
    t_phantom = time.perf_counter() - t0
    beams = nine_beams()

    def once():
        return compute_dij(rho, beams, ptv, body, beam_model=bm, bixel_size_mm=5.0,
                           dose_grid_spacing_mm=3.0, margin_mm=5.0)

    t0 = time.perf_counter()
    dij = once()  # first call: numba compile or cache load
    t_first = time.perf_counter() - t0
    del dij  # keep one matrix alive at a time, so peak RSS reflects a single Dij
    times = []
    for _ in range(repeats):
        dij = None
        t0 = time.perf_counter()
        dij = once()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    # truncation + scatter correction check against the full kernel (plan-dose path)
    from adaptive.dose.dij import full_kernel_dose

    checks = []
    rng = np.random.default_rng(1)
    ptv_d = Volume(ptv, rho.grid).resample_to(dij.dose_grid, order=1).array.astype(bool)
    for label, w in (("uniform", np.ones(dij.n_beamlets)),
                     ("modulated (random 0-2)", rng.uniform(0.0, 2.0, dij.n_beamlets))):
        d_dij = dij.dose_volume(w).array
        d_full = full_kernel_dose(dij, rho, beams, w, beam_model=bm).array
        r = d_dij[ptv_d] / d_full[ptv_d]
        hi = d_full > 0.2 * d_full.max()
        e = np.abs(d_dij[hi] - d_full[hi]) / d_full.max()
        checks.append(f"| Dij / full kernel, {label} weights: PTV mean ratio, PTV min-max, "
                      f"max abs error (> 20 % of max, % of max) | {r.mean():.3f}, "
                      f"{r.min():.3f}-{r.max():.3f}, {100 * e.max():.1f} % |")

    lines = [
        "## dose",
        "",
        "Dose-influence matrix, TG-119 C-shape (water ellipse 40 x 25 cm, CT 2.5 mm), 9 coplanar "
        "beams, 5 mm beamlets, 3 mm dose grid, beamlet margin 5 mm, "
        f"lateral cut-off {bm.dij_cutoff_mm:.0f} mm, {numba.get_num_threads()} numba threads.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| beamlets | {dij.n_beamlets} |",
        f"| rows (voxels) | {dij.n_voxels} |",
        f"| non-zeros | {dij.nnz:,} |",
        f"| Dij memory (CSR + row map) | {dij.nbytes / 2**20:.0f} MB |",
        f"| Dij time (median, min-max) | {summary(times)} |",
        f"| of which setup / count / fill / scatter correction (last run) | "
        f"{dij.timings_s['setup_s']:.2f} / {dij.timings_s['count_s']:.2f} / "
        f"{dij.timings_s['fill_s']:.2f} / {dij.timings_s['scatter_correction_s']:.2f} s |",
        f"| first call (numba compile or cache load + run) | {t_first:.2f} s "
        f"(overhead {max(t_first - med, 0):.2f} s) |",
        f"| peak RSS of the process | {rss_mb:.0f} MB |",
        f"| phantom build | {t_phantom:.2f} s |",
    ] + checks
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    print(run(argparse.Namespace(repeats=3)))
