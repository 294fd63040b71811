"""Numba pencil-beam kernel: dose of rectangular fluence elements (beamlets or fluence pixels)
at points, with the three-Gaussian kernel of :mod:`adaptive.dose.beam_model`.

For a point P and one beam:

* ``z`` = distance (mm) from the source to P along the beam axis, ``(x, y)`` = IEC B X/Y of P
  projected along its ray onto the isocenter plane (mm), ``d`` = radiological depth of P (mm of
  water: density integral from the source to P, :func:`adaptive.dose.raytrace.siddon_path`).
* A rectangle [x0, x1] x [y0, y1] (isocenter plane) carrying fluence F (MU) gives
  ``D = F (SAD/z)^2 C sum_c A_c(d) Ex_c Ey_c`` (Gy) where ``Ex_c`` is the integral of the unit
  1-D Gaussian of component c (width sigma_c(d) projected to the isocenter plane) over
  [x0, x1] (an erf difference), likewise Ey_c. The integration over the rectangle is exact.
* Only elements whose centre lies within ``cutoff`` (mm, isocenter plane) of (x, y)
  contribute (the same rule in the Dij and in plan dose).

The kernel parameter array ``kp`` is :meth:`BeamModel.kernel_array`:
[mu, beta, k_s, s_p0, c_p, h, s_h, s_s0, c_s, C, SAD].
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from adaptive.dose.raytrace import siddon_path

_SQRT2 = math.sqrt(2.0)


@nb.njit(cache=True, inline="always")
def _components(kp, d, z, amp, sig):
    """Fill amp[3] (Gy/MU per unit fluence, incl. C and inverse square) and sig[3] (mm at the
    isocenter plane) at radiological depth d (mm) and source distance z (mm)."""
    sad = kp[10]
    proj = sad / z
    d = max(d, 0.0)
    p = (1.0 - math.exp(-kp[1] * d)) * math.exp(-kp[0] * d) * kp[9] * proj * proj
    amp[0] = p
    amp[1] = kp[5] * p
    amp[2] = kp[2] * d * p
    sp = math.sqrt(kp[3] * kp[3] + (kp[4] * d) * (kp[4] * d)) * proj
    sig[0] = sp
    sig[1] = math.sqrt(kp[6] * kp[6] + sp * sp)
    sig[2] = (kp[7] + kp[8] * d) * proj


@nb.njit(cache=True, inline="always")
def _project(rot, iso, sad, px, py, pz):
    """LPS point -> (x_iso, y_iso, z_source) for a beam with rotation columns X_b, Y_b, Z_b."""
    vx, vy, vz = px - iso[0], py - iso[1], pz - iso[2]
    bx = vx * rot[0, 0] + vy * rot[1, 0] + vz * rot[2, 0]
    by = vx * rot[0, 1] + vy * rot[1, 1] + vz * rot[2, 1]
    bz = vx * rot[0, 2] + vy * rot[1, 2] + vz * rot[2, 2]
    z = sad - bz
    f = sad / z
    return bx * f, by * f, z


@nb.njit(cache=True, inline="always")
def _window(x, r, e0, w, n):
    """Index range [i0, i1] of elements (edges e0 + i w) whose centre is within r of x."""
    i0 = int(math.ceil((x - r - e0) / w - 0.5))
    i1 = int(math.floor((x + r - e0) / w - 0.5))
    i0 = max(i0, 0)
    i1 = min(i1, n - 1)
    return i0, i1


@nb.njit(cache=True, inline="always")
def _edges(x, sig, e0, w, i0, i1, out):
    """out[m] = integral of the unit Gaussian (centre x, width sig) over element i0 + m."""
    inv = 1.0 / (_SQRT2 * sig)
    prev = math.erf((e0 + i0 * w - x) * inv)
    for m in range(i1 - i0 + 1):
        nxt = math.erf((e0 + (i0 + m + 1) * w - x) * inv)
        out[m] = 0.5 * (nxt - prev)
        prev = nxt


# --- dose-influence matrix ------------------------------------------------------------------


@nb.njit(cache=True, parallel=True)
def dij_count(pts, rots, isos, sad, ex0, ey0, nbx, nby, lut_off, lut, wx, wy, cutoff, counts):
    """counts[v] = number of beamlets (all beams) whose centre is within ``cutoff`` of point v's
    isocenter-plane projection. ``lut`` (flat, per beam row-major (iy, ix) at ``lut_off[b]``)
    holds the global beamlet (column) index or -1."""
    n = pts.shape[0]
    nbeams = rots.shape[0]
    r2 = cutoff * cutoff
    for v in nb.prange(n):
        c = 0
        for b in range(nbeams):
            x, y, z = _project(rots[b], isos[b], sad, pts[v, 0], pts[v, 1], pts[v, 2])
            if z <= 0.0:
                continue
            ix0, ix1 = _window(x, cutoff, ex0[b], wx, nbx[b])
            iy0, iy1 = _window(y, cutoff, ey0[b], wy, nby[b])
            for iy in range(iy0, iy1 + 1):
                dy = ey0[b] + (iy + 0.5) * wy - y
                for ix in range(ix0, ix1 + 1):
                    dx = ex0[b] + (ix + 0.5) * wx - x
                    if dx * dx + dy * dy <= r2 and lut[lut_off[b] + iy * nbx[b] + ix] >= 0:
                        c += 1
        counts[v] = c


@nb.njit(cache=True, parallel=True)
def dij_fill(pts, gpts, srcs, dens, dsp, rots, isos, sad, ex0, ey0, nbx, nby, lut_off, lut,
             wx, wy, cutoff, kp, indptr, indices, data, depth_out, nthreads):
    """Fill CSR rows (one per point) with Gy/MU per beamlet, in increasing column order.

    ``pts``: LPS (n, 3); ``gpts``/``srcs``: the same points / the beam sources in the density
    grid frame (for ray tracing); ``depth_out[v, b]``: radiological depth (mm) or -1 if the
    beam does not reach the point."""
    n = pts.shape[0]
    nbeams = rots.shape[0]
    r2 = cutoff * cutoff
    nwin = int(2.0 * cutoff / min(wx, wy)) + 3
    nchunk = max(1, min(n, 64 * nthreads))
    for ch in nb.prange(nchunk):
        amp = np.empty(3)
        sig = np.empty(3)
        exs = np.empty((3, nwin))
        eys = np.empty((3, nwin))
        for v in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            pos = indptr[v]
            for b in range(nbeams):
                depth_out[v, b] = -1.0
                x, y, z = _project(rots[b], isos[b], sad, pts[v, 0], pts[v, 1], pts[v, 2])
                if z <= 0.0:
                    continue
                ix0, ix1 = _window(x, cutoff, ex0[b], wx, nbx[b])
                iy0, iy1 = _window(y, cutoff, ey0[b], wy, nby[b])
                if ix1 < ix0 or iy1 < iy0:
                    continue
                d = siddon_path(dens, dsp[0], dsp[1], dsp[2], srcs[b, 0], srcs[b, 1], srcs[b, 2],
                                gpts[v, 0], gpts[v, 1], gpts[v, 2])
                depth_out[v, b] = d
                _components(kp, d, z, amp, sig)
                for c in range(3):
                    _edges(x, sig[c], ex0[b], wx, ix0, ix1, exs[c])
                    _edges(y, sig[c], ey0[b], wy, iy0, iy1, eys[c])
                for iy in range(iy0, iy1 + 1):
                    dy = ey0[b] + (iy + 0.5) * wy - y
                    my = iy - iy0
                    a0 = amp[0] * eys[0, my]
                    a1 = amp[1] * eys[1, my]
                    a2 = amp[2] * eys[2, my]
                    for ix in range(ix0, ix1 + 1):
                        dx = ex0[b] + (ix + 0.5) * wx - x
                        if dx * dx + dy * dy > r2:
                            continue
                        col = lut[lut_off[b] + iy * nbx[b] + ix]
                        if col < 0:
                            continue
                        mx = ix - ix0
                        indices[pos] = col
                        data[pos] = a0 * exs[0, mx] + a1 * exs[1, mx] + a2 * exs[2, mx]
                        pos += 1


# --- plan dose (fluence maps) ---------------------------------------------------------------


@nb.njit(cache=True, parallel=True)
def fluence_dose(pts, gpts, src, dens, dsp, rot, iso, sad, pyr, pyr_ny, pyr_nx, fx0, fy0, res,
                 cutoff, kp, out, nthreads, depths):
    """Add to ``out[v]`` the dose (Gy) of one beam's fluence map (MU per element).

    ``pyr[l]`` is the fluence averaged over 2^l x 2^l blocks (element size res * 2^l, edges at
    fx0 / fy0 + i * size); ``pyr_ny/pyr_nx[l]`` its size. Each kernel component is summed on the
    coarsest level whose element is <= its width sigma (exact erf integration over each element
    of the block-averaged fluence; block averaging widens the component by < 4 %), within
    min(cutoff, 3.5 sigma + element) of the point (the 2-D Gaussian beyond 3.5 sigma holds
    0.2 % of its integral). Levels are also limited to elements <= cutoff / 6 so that a short
    cut-off circle is resolved as finely as in the Dij (same truncated kernel in both paths)."""
    n = pts.shape[0]
    nlev = pyr.shape[0]
    nchunk = max(1, min(n, 64 * nthreads))
    nmax = max(pyr.shape[1], pyr.shape[2]) + 2
    for ch in nb.prange(nchunk):
        amp = np.empty(3)
        sig = np.empty(3)
        ex = np.empty(nmax)
        ey = np.empty(nmax)
        for v in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            x, y, z = _project(rot, iso, sad, pts[v, 0], pts[v, 1], pts[v, 2])
            if z <= 0.0:
                continue
            d = -1.0
            if depths.shape[0] > 0 and depths[v] >= 0.0:
                d = depths[v]
                _components(kp, d, z, amp, sig)
            tot = 0.0
            for c in range(3):
                # coarsest level with element size <= sigma/2 (needs the depth: trace lazily)
                if d < 0.0:
                    d = siddon_path(dens, dsp[0], dsp[1], dsp[2], src[0], src[1], src[2],
                                    gpts[v, 0], gpts[v, 1], gpts[v, 2])
                    _components(kp, d, z, amp, sig)
                s = sig[c]
                lev = 0
                while (lev + 1 < nlev and res * 2.0 ** (lev + 1) <= s
                       and res * 2.0 ** (lev + 1) <= cutoff / 6.0):
                    lev += 1
                w = res * 2.0 ** lev
                r = min(cutoff, 3.5 * s + w)
                ix0, ix1 = _window(x, r, fx0, w, pyr_nx[lev])
                iy0, iy1 = _window(y, r, fy0, w, pyr_ny[lev])
                if ix1 < ix0 or iy1 < iy0:
                    continue
                _edges(x, s, fx0, w, ix0, ix1, ex)
                _edges(y, s, fy0, w, iy0, iy1, ey)
                r2 = r * r
                acc = 0.0
                for iy in range(iy0, iy1 + 1):
                    dy = fy0 + (iy + 0.5) * w - y
                    row = 0.0
                    for ix in range(ix0, ix1 + 1):
                        dx = fx0 + (ix + 0.5) * w - x
                        if dx * dx + dy * dy <= r2:
                            row += ex[ix - ix0] * pyr[lev, iy, ix]
                    acc += row * ey[iy - iy0]
                tot += amp[c] * acc
            out[v] += tot


def fluence_pyramid(fluence: np.ndarray, max_levels: int = 6) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """Stack of block-averaged fluence maps (level l: 2^l x 2^l blocks), zero padded into one
    (L, ny, nx) array, with per-level sizes."""
    f = np.asarray(fluence, dtype=np.float64)
    ny, nx = f.shape
    levels = [f]
    while len(levels) < max_levels and min(levels[-1].shape) > 2:
        a = levels[-1]
        h, w = a.shape
        p = np.zeros((h + h % 2, w + w % 2))
        p[:h, :w] = a
        levels.append(0.25 * (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]))
    pyr = np.zeros((len(levels), ny, nx))
    for i, a in enumerate(levels):
        pyr[i, :a.shape[0], :a.shape[1]] = a
    return (pyr, np.array([a.shape[0] for a in levels], dtype=np.int64),
            np.array([a.shape[1] for a in levels], dtype=np.int64))


@nb.njit(cache=True, parallel=True)
def row_beam_sums(indptr, indices, data, beam_of_col, nbeams, out):
    """out[v, b] = sum of row v's entries in columns of beam b."""
    for v in nb.prange(indptr.shape[0] - 1):
        for b in range(nbeams):
            out[v, b] = 0.0
        for p in range(indptr[v], indptr[v + 1]):
            out[v, beam_of_col[indices[p]]] += data[p]


@nb.njit(cache=True, parallel=True)
def scale_row_beams(indptr, indices, data, beam_of_col, factor):
    """data[p] *= factor[v, beam of column] for every entry p of row v."""
    for v in nb.prange(indptr.shape[0] - 1):
        for p in range(indptr[v], indptr[v + 1]):
            data[p] = np.float32(data[p] * factor[v, beam_of_col[indices[p]]])
