"""Dose of a step-and-shoot plan (jaws + MLC apertures, MU) with the same pencil-beam kernel
as the Dij: each beam's segments are rasterised into one fluence map on the isocenter plane
and the kernel is superposed over it (:func:`adaptive.dose.kernel.fluence_dose`)."""

from __future__ import annotations

import time

import numba
import numpy as np

from adaptive.dose import depth_cache as dc
from adaptive.dose.beam_geometry import beam_geometry
from adaptive.dose.beam_model import BeamModel, load_beam_model
from adaptive.dose.dose_grid import (
    body_on_dose_grid,
    dose_points,
    make_dose_grid,
    scatter_nodes,
)
from adaptive.dose.kernel import (
    beam_depths,
    far_scatter_parts,
    fluence_dose,
    fluence_dose_coarse_scatter,
    fluence_pyramid,
)
from adaptive.dose.raytrace import lps_to_grid_frame
from adaptive.errors import DoseError
from adaptive.geometry.volume import Volume
from adaptive.log import get_logger
from adaptive.model.plan import Beam


def _overlap(a0, a1, b0, b1):
    """Length of [a0, a1] ∩ [b0, b1] (broadcast)."""
    return np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0.0, None)


def aperture_fluence(cp, leaf_boundaries_mm, x_edges, y_edges, *, mlc_transmission: float,
                     jaw_transmission: float, sub_rows: int = 4) -> np.ndarray:
    """Relative fluence (0..1) of one control point's aperture on the pixel grid with edges
    ``x_edges`` (nx+1) / ``y_edges`` (ny+1) mm at the isocenter plane (IEC B X / Y).

    Each pixel gets the exact open fraction along X (jaw ∩ leaf opening) averaged over
    ``sub_rows`` sub-rows along Y. Blocked parts transmit ``mlc_transmission`` (under a leaf,
    inside the X jaws) or ``jaw_transmission`` (outside the X or Y jaws).
    """
    x0, x1 = x_edges[:-1], x_edges[1:]
    px = x1 - x0
    ny = len(y_edges) - 1
    ys = (y_edges[:-1, None] + (np.arange(sub_rows)[None, :] + 0.5) / sub_rows
          * np.diff(y_edges)[:, None]).ravel()
    jx1, jx2 = cp.jaw_x_mm
    jy1, jy2 = cp.jaw_y_mm
    jaw_open = _overlap(x0, x1, jx1, jx2) / px  # (nx,)
    if cp.mlc_x1_mm is not None and cp.mlc_x2_mm is not None:
        lb = np.asarray(leaf_boundaries_mm, dtype=np.float64)
        l1 = np.asarray(cp.mlc_x1_mm, dtype=np.float64)
        l2 = np.asarray(cp.mlc_x2_mm, dtype=np.float64)
        if lb is None or len(lb) != len(l1) + 1 or len(l1) != len(l2):
            raise DoseError(f"control point {cp.index}: {len(l1)} leaf pairs do not match "
                            f"{len(lb) - 1 if lb is not None else 'no'} leaf boundaries")
        pair = np.searchsorted(lb, ys, side="right") - 1
        inside = (pair >= 0) & (pair < len(l1))
        pc = np.clip(pair, 0, len(l1) - 1)
        a1 = np.where(inside, l1[pc], 0.0)[:, None]
        a2 = np.where(inside, l2[pc], 0.0)[:, None]
        both = _overlap(np.maximum(x0, jx1)[None, :], np.minimum(x1, jx2)[None, :], a1, a2) / px
        both = np.where(inside[:, None], both, 0.0)
    else:
        both = np.broadcast_to(jaw_open[None, :], (len(ys), len(x0)))
    row = both + mlc_transmission * (jaw_open[None, :] - both) + jaw_transmission * (
        1.0 - jaw_open[None, :])
    in_y = ((ys >= jy1) & (ys <= jy2))[:, None]
    row = np.where(in_y, row, jaw_transmission * row)
    return row.reshape(ny, sub_rows, -1).mean(axis=1)


def beam_fluence(segments, leaf_boundaries_mm, bm: BeamModel, res_mm: float, margin_mm: float
                 ) -> tuple[np.ndarray, float, float]:
    """Fluence map (MU per pixel, pixel ``res_mm`` square at the isocenter plane) of a list of
    (control point, MU) segments sharing one beam direction; returns (map (ny, nx), x0, y0)
    with pixel edges at x0 + i res, y0 + j res. The map covers the union of the jaw openings
    plus ``margin_mm`` (transmission beyond that is not modelled)."""
    xs1 = min(cp.jaw_x_mm[0] for cp, _ in segments) - margin_mm
    xs2 = max(cp.jaw_x_mm[1] for cp, _ in segments) + margin_mm
    ys1 = min(cp.jaw_y_mm[0] for cp, _ in segments) - margin_mm
    ys2 = max(cp.jaw_y_mm[1] for cp, _ in segments) + margin_mm
    x0 = np.floor(xs1 / res_mm) * res_mm
    y0 = np.floor(ys1 / res_mm) * res_mm
    nx = int(np.ceil((xs2 - x0) / res_mm))
    ny = int(np.ceil((ys2 - y0) / res_mm))
    xe = x0 + res_mm * np.arange(nx + 1)
    ye = y0 + res_mm * np.arange(ny + 1)
    f = np.zeros((ny, nx))
    for cp, mu in segments:
        f += mu * aperture_fluence(cp, leaf_boundaries_mm, xe, ye,
                                   mlc_transmission=bm.mlc.transmission,
                                   jaw_transmission=bm.jaw_transmission)
    return f, float(x0), float(y0)


#: Largest spacing (mm) of the coarse nodes on which the scatter components are summed (see
#: :func:`plan_dose`): the narrowest of them, the head scatter, has sigma 17 mm in the
#: commissioned model; linear interpolation of a Gaussian-blurred fluence edge over nodes h
#: apart errs by at most h^2/8 max|f''| = h^2/8 x 0.242/sigma^2 of the edge height, 0.4 % of
#: the head-scatter dose (0.02 % of the primary) at h = 6 mm.
SCATTER_NODE_MM = 6.0


def scatter_stride(dose_spacing_mm, node_mm: float | None = SCATTER_NODE_MM) -> int:
    """Stride (dose voxels, >= 1) of the scatter nodes: the largest whole number of dose
    voxels spanning at most ``node_mm`` along every axis; 1 (every voxel, no interpolation)
    for ``node_mm`` None."""
    if node_mm is None:
        return 1
    if not np.isfinite(node_mm) or node_mm <= 0:
        raise DoseError(f"scatter node spacing must be > 0 mm, got {node_mm}")
    return max(1, int(np.floor(node_mm / float(np.max(dose_spacing_mm)) + 1e-9)))


# dynamic scheduling of the parallel loops (the CPU is shared: a static split waits for the
# slowest thread): points per work item of the depth loop, chunks per item of the kernel loop
_DEPTH_CHUNK = 4096
_KERNEL_CHUNK = 1


def beam_point_depths(density: Volume, geometry, pts: np.ndarray, gpts: np.ndarray, *,
                      sad_mm: float, dens: np.ndarray | None = None) -> np.ndarray:
    """Radiological depth (mm) of the points ``pts`` (LPS (n, 3); ``gpts`` the same in the
    density-grid frame) for one beam geometry: one exact Siddon ray per point
    (:func:`adaptive.dose.kernel.beam_depths`); -1 behind the source."""
    if dens is None:
        dens = np.ascontiguousarray(density.array, dtype=np.float32)
    out = np.empty(len(pts), dtype=np.float64)
    with numba.parallel_chunksize(_DEPTH_CHUNK):
        beam_depths(pts, gpts, np.ascontiguousarray(lps_to_grid_frame(density,
                                                                      geometry.source_lps_mm)),
                    dens, np.ascontiguousarray(density.grid.spacing, dtype=np.float64),
                    np.ascontiguousarray(geometry.rotation),
                    np.ascontiguousarray(geometry.isocenter_lps_mm, dtype=np.float64), sad_mm,
                    np.zeros((2, 2, 0), np.float32), 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, out)
    return out


def _depths(cache: dict | None, key: tuple, idx: np.ndarray, density: Volume, geometry,
            points: tuple[np.ndarray, np.ndarray], sad_mm: float, dens: np.ndarray
            ) -> tuple[np.ndarray, bool]:
    """Exact radiological depths (mm) of the dose-grid points ``idx`` (``points``: their LPS
    and density-grid-frame coordinates) for one beam direction: those the cache holds
    (:mod:`adaptive.dose.depth_cache`; e.g. the Dij's rows), the rest traced and the completed
    set stored. Returns (depths, whether any came from the cache)."""
    pts, gpts = points
    got = dc.lookup(cache, key, idx)
    if got is not None and got[1] is None:
        return got[0], True
    if got is None:
        depths = beam_point_depths(density, geometry, pts, gpts, sad_mm=sad_mm, dens=dens)
    else:
        depths, missing = got
        depths[missing] = beam_point_depths(density, geometry,
                                            np.ascontiguousarray(pts[missing]),
                                            np.ascontiguousarray(gpts[missing]),
                                            sad_mm=sad_mm, dens=dens)
    dc.store(cache, key, idx, depths)
    return depths, got is not None


def _segments_by_direction(beam: Beam) -> dict[tuple[float, float, float], list]:
    """The beam's (control point, MU) segments grouped by (gantry, collimator, couch) angle
    (deg, IEC 61217): a control point without its own angle has the beam's."""
    groups: dict[tuple[float, float, float], list] = {}
    for cp, mu in beam.segments():
        key = (beam.gantry_deg if cp.gantry_deg is None else cp.gantry_deg,
               beam.collimator_deg if cp.collimator_deg is None else cp.collimator_deg,
               beam.couch_deg if cp.couch_deg is None else cp.couch_deg)
        groups.setdefault(key, []).append((cp, mu))
    return groups


def plan_dose(ct_or_density: Volume, plan, *, beam_model: BeamModel | None = None,
              dose_grid_spacing_mm: float | None = 3.0, body_mask=None,
              cutoff_mm: float | None = None, fluence_resolution_mm: float | None = None,
              patient_position: str = "HFS", depth_cache=None, timings: dict | None = None,
              scatter_node_mm: float | None = SCATTER_NODE_MM) -> Volume:
    """Dose (Gy per fraction) of ``plan`` on the dose grid (CT grid at ``dose_grid_spacing_mm``).

    ``ct_or_density``: a CT in HU (``units == "HU"``, converted with :func:`hu_to_density`) or
    a relative electron density Volume. Each beam's segments (:meth:`Beam.segments`: aperture of
    control point i delivered with its meterset-weight increment x beam MU) are rasterised
    (jaws, MLC, transmissions from the beam model) at ``fluence_resolution_mm``; control points
    with their own gantry/collimator/couch angles form separate fluence maps. Voxels outside the
    body (``body_mask`` or density threshold) get 0. ``cutoff_mm`` defaults to
    ``beam_model.plan_cutoff_mm``.

    Radiological depths are traced once per (dose voxel, beam direction) (exact Siddon rays,
    :func:`beam_point_depths`) and shared by all of that direction's segments.

    The kernel's primary component is summed over the fluence at every dose voxel. Its two
    scatter components (head scatter sigma 17 mm, phantom scatter 44 mm and more) are smooth
    on the scale of the dose grid: their lateral integrals (fluence x Gaussian, per unit
    amplitude) are summed on coarse nodes at most ``scatter_node_mm`` apart (every
    :func:`scatter_stride`-th dose voxel per axis), interpolated trilinearly to each voxel
    and multiplied there by the voxel's own amplitudes (its depth and source distance), so
    build-up, attenuation, inverse square and the scatter's growth with depth stay exact at
    every voxel (:func:`adaptive.dose.kernel.fluence_dose_coarse_scatter`; the Dij's far
    scatter uses the same nodes). ``scatter_node_mm=None``, or a dose grid coarser than it,
    sums every component at every voxel (the full kernel; tested against each other in
    tests/test_dose_plan_scatter_nodes.py).

    ``depth_cache`` (optional, dict-like, owned by the caller; :mod:`adaptive.dose.depth_cache`):
    depths are stored under (density content: shape, CRC-32 of the values; CT/dose grids;
    beam direction) with the dose voxels they were computed for, and reused by later calls on
    the same CT values and grid (e.g. the deliverable dose, its correction round, the
    independent check at another fluence resolution and the scheduled plan on today's
    anatomy: same beam directions). An entry for other voxels (the Dij's rows,
    :func:`adaptive.dose.dij.compute_dij` with the same cache) serves those it holds; only the
    rest are traced. Results are identical with or without the cache. Memory: 8 bytes per dose
    voxel and beam direction (~45 MB for 620 k voxels x 9 beams). ``timings`` (optional dict)
    receives per-stage seconds (density, body, points, depth, fluence, scatter (node depths
    and integrals), kernel, total).
    """
    log = get_logger("adaptive.dose.plan_dose")
    t0 = time.perf_counter()
    tm = {"density_s": 0.0, "body_s": 0.0, "points_s": 0.0, "depth_s": 0.0, "fluence_s": 0.0,
          "scatter_s": 0.0, "kernel_s": 0.0}
    bm = beam_model or load_beam_model()
    density = dc.density_of(depth_cache, ct_or_density) \
        if ct_or_density.units.upper() == "HU" else ct_or_density
    res = float(fluence_resolution_mm or bm.fluence_resolution_mm)
    cutoff = float(bm.plan_cutoff_mm if cutoff_mm is None else cutoff_mm)
    t1 = time.perf_counter()
    tm["density_s"] = t1 - t0
    dgrid = make_dose_grid(density, dose_grid_spacing_mm)
    dens = np.ascontiguousarray(density.array, dtype=np.float32)
    grid_key = None if depth_cache is None else dc.grid_key(dens, density.grid, dgrid)
    if body_mask is None:
        body = dc.derived(depth_cache, ("body", grid_key, float(bm.body_density_threshold)),
                          lambda: body_on_dose_grid(density, dgrid, None,
                                                    bm.body_density_threshold))
    else:
        body = body_on_dose_grid(density, dgrid, body_mask, bm.body_density_threshold)
    idx = np.flatnonzero(body.ravel())
    t2 = time.perf_counter()
    tm["body_s"] = t2 - t1
    pts, gpts = dose_points(dgrid, idx, density)
    out = np.zeros(len(idx), dtype=np.float64)
    dsp = np.ascontiguousarray(density.grid.spacing)
    kp = bm.kernel_array()
    stride = scatter_stride(dgrid.spacing, scatter_node_mm)
    if stride > 1:
        node_index, npts, ngpts = scatter_nodes(dgrid, idx, stride, density)
        node_ids = np.flatnonzero(node_index.ravel() >= 0)
        q = np.empty((len(npts), 2))
        dshape = np.array(dgrid.shape, dtype=np.int64)
    tm["points_s"] = time.perf_counter() - t2
    n_maps = 0
    n_cached = 0
    for beam in plan.beams:
        if abs(beam.sad_mm - bm.sad_mm) > 1e-6:
            raise DoseError(f"beam {beam.number} SAD {beam.sad_mm} mm != model {bm.sad_mm} mm")
        lb = beam.leaf_boundaries_mm if beam.leaf_boundaries_mm is not None \
            else bm.mlc.leaf_boundaries_mm
        groups = _segments_by_direction(beam)
        for (ga, co, cu), segs in groups.items():
            g = beam_geometry(ga, co, cu, beam.isocenter_lps_mm, beam.sad_mm, patient_position)
            ta = time.perf_counter()
            flu, fx0, fy0 = beam_fluence(segs, lb, bm, res, margin_mm=2 * res)
            pyr, pny, pnx = fluence_pyramid(flu)
            tb = time.perf_counter()
            dkey = (ga, co, cu, beam.isocenter_lps_mm, beam.sad_mm, patient_position, grid_key)
            depths, hit = _depths(depth_cache, dc.direction_key(*dkey), idx, density, g,
                                  (pts, gpts), bm.sad_mm, dens)
            n_cached += hit
            tc = time.perf_counter()
            rot = np.ascontiguousarray(g.rotation)
            if stride > 1:
                ndepths, _ = _depths(depth_cache, dc.direction_key(*dkey, nodes=stride),
                                     node_ids, density, g, (npts, ngpts), bm.sad_mm, dens)
                with numba.parallel_chunksize(_KERNEL_CHUNK):
                    far_scatter_parts(npts, ndepths, rot, g.isocenter_lps_mm, bm.sad_mm, pyr,
                                      pny, pnx, fx0, fy0, res, cutoff, 0.0, kp, q,
                                      numba.get_num_threads())
                tq = time.perf_counter()
                with numba.parallel_chunksize(_KERNEL_CHUNK):
                    fluence_dose_coarse_scatter(pts, depths, rot, g.isocenter_lps_mm, bm.sad_mm,
                                                pyr, pny, pnx, fx0, fy0, res, cutoff, kp, idx,
                                                dshape, stride, node_index, q, out,
                                                numba.get_num_threads())
            else:
                tq = tc
                src = np.ascontiguousarray(lps_to_grid_frame(density, g.source_lps_mm))
                with numba.parallel_chunksize(_KERNEL_CHUNK):
                    fluence_dose(pts, gpts, src, dens, dsp, rot, g.isocenter_lps_mm, bm.sad_mm,
                                 pyr, pny, pnx, fx0, fy0, res, cutoff, kp, out,
                                 numba.get_num_threads(), depths)
            td = time.perf_counter()
            tm["fluence_s"] += tb - ta
            tm["depth_s"] += tc - tb
            tm["scatter_s"] += tq - tc
            tm["kernel_s"] += td - tq
            n_maps += 1
    full = np.zeros(dgrid.n_voxels, dtype=np.float32)
    full[idx] = out
    tm["total_s"] = time.perf_counter() - t0
    if timings is not None:
        timings.update(tm)
    log.info("plan_dose_computed", beams=len(plan.beams), fluence_maps=n_maps, voxels=len(idx),
             cached_depths=n_cached, scatter_stride=stride,
             max_gy=float(out.max(initial=0.0)), seconds=round(tm["total_s"], 3),
             **{k: round(v, 3) for k, v in tm.items()})
    return Volume(full.reshape(dgrid.shape), dgrid, "Gy")
