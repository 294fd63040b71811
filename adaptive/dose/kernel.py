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
from scipy.special import erf as _scipy_erf

from adaptive.dose.raytrace import fan_depth_lookup, siddon_path

_SQRT2 = math.sqrt(2.0)

# erf on [0, 6] for cubic Hermite interpolation (values + exact derivatives, step 1/64):
# max abs error 1e-9 (tests/test_dose_raytrace.py), ~4x faster than libm erf; erf(6) = 1 - 2e-17.
_ERF_STEPS_PER_UNIT = 64
_ERF_T = np.arange(6 * _ERF_STEPS_PER_UNIT + 2) / _ERF_STEPS_PER_UNIT
_ERF_F = _scipy_erf(_ERF_T)
_ERF_D = 2.0 / math.sqrt(math.pi) * np.exp(-_ERF_T * _ERF_T) / _ERF_STEPS_PER_UNIT


@nb.njit(cache=True, inline="always")
def fast_erf(x):
    """erf(x) by cubic Hermite interpolation of a table (abs error < 1e-9)."""
    a = abs(x)
    if a >= 6.0:
        r = 1.0
    else:
        u = a * _ERF_STEPS_PER_UNIT
        i = int(u)
        s = u - i
        s2 = s * s
        s3 = s2 * s
        r = ((2.0 * s3 - 3.0 * s2 + 1.0) * _ERF_F[i] + (s3 - 2.0 * s2 + s) * _ERF_D[i]
             + (3.0 * s2 - 2.0 * s3) * _ERF_F[i + 1] + (s3 - s2) * _ERF_D[i + 1])
    return r if x >= 0.0 else -r


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
    i0 = math.ceil((x - r - e0) / w - 0.5)
    i1 = math.floor((x + r - e0) / w - 0.5)
    i0 = max(i0, 0)
    i1 = min(i1, n - 1)
    return i0, i1


@nb.njit(cache=True, inline="always")
def _edges(x, sig, e0, w, i0, i1, out):
    """out[m] = integral of the unit Gaussian (centre x, width sig) over element i0 + m."""
    inv = 1.0 / (_SQRT2 * sig)
    prev = fast_erf((e0 + i0 * w - x) * inv)
    for m in range(i1 - i0 + 1):
        nxt = fast_erf((e0 + (i0 + m + 1) * w - x) * inv)
        out[m] = 0.5 * (nxt - prev)
        prev = nxt


# --- dose-influence matrix ------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _row_span(x, dy2, r2, e0, w, n):
    """Index range [i0, i1] of the elements of one beamlet row (centres e0 + (i + 1/2) w)
    inside the cut-off circle (radius^2 r2) around x, for a row at squared distance dy2;
    empty (i1 < i0) if the row misses the circle. Shared by the count and fill passes so
    both select exactly the same (voxel, beamlet) pairs."""
    h2 = r2 - dy2
    if h2 < 0.0:
        return 0, -1
    return _window(x, math.sqrt(h2), e0, w, n)


@nb.njit(cache=True, parallel=True)
def dij_count(pts, rots, isos, sad, ex0, ey0, nbx, nby, lut_off, lut, wx, wy, cutoff, counts,
              pref, pref_off):
    """counts[v] = number of active beamlets (all beams) whose centre is within ``cutoff`` of
    point v's isocenter-plane projection. ``lut`` (flat, per beam row-major (iy, ix) at
    ``lut_off[b]``) holds the global beamlet (column) index or -1; ``pref`` (per beam
    (nby, nbx + 1) at ``lut_off[b] + nby[b] * b``) the running count of active beamlets
    along each beamlet row (see :func:`active_prefix`), beam b's block starting at
    ``pref_off[b]``."""
    n = pts.shape[0]
    nbeams = rots.shape[0]
    r2 = cutoff * cutoff
    for v in nb.prange(n):
        c = 0
        for b in range(nbeams):
            x, y, z = _project(rots[b], isos[b], sad, pts[v, 0], pts[v, 1], pts[v, 2])
            if z <= 0.0:
                continue
            iy0, iy1 = _window(y, cutoff, ey0[b], wy, nby[b])
            base = pref_off[b]
            for iy in range(iy0, iy1 + 1):
                dy = ey0[b] + (iy + 0.5) * wy - y
                ix0, ix1 = _row_span(x, dy * dy, r2, ex0[b], wx, nbx[b])
                if ix1 >= ix0:
                    row = base + iy * (nbx[b] + 1)
                    c += pref[row + ix1 + 1] - pref[row + ix0]
        counts[v] = c


def active_prefix(lut: np.ndarray, lut_off: np.ndarray, nbx: np.ndarray, nby: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per beam and beamlet row, the running count of active beamlets (lut >= 0), and where
    each beam's (nby, nbx + 1) block starts. The blocks are as long as the beams' beamlet grids
    (plus one column per row), so the offsets are their running sum: beams with different
    grids (other jaw or collimator settings) do not share a stride (an offset computed as
    ``lut_off[b] + nby[b] * b`` held only for equal grids; the count pass then disagreed with
    the fill pass)."""
    out = []
    for b in range(len(nbx)):
        act = lut[lut_off[b]:lut_off[b] + nbx[b] * nby[b]].reshape(nby[b], nbx[b]) >= 0
        pre = np.zeros((nby[b], nbx[b] + 1), dtype=np.int64)
        np.cumsum(act, axis=1, out=pre[:, 1:])
        out.append(pre.ravel())
    sizes = np.asarray([len(o) for o in out], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return np.concatenate(out), offsets


@nb.njit(cache=True, parallel=True)
def beam_depths(pts, gpts, src, dens, dsp, rot, iso, sad, table, x0, y0, dxy, z0, dzs,
                max_spread, out):
    """out[v] = radiological depth (mm) of point v for one beam, interpolated from the beam's
    fan depth table (:func:`adaptive.dose.raytrace.fan_depth_table`); points outside the
    table, or where the surrounding rays' depths differ by more than ``max_spread`` (mm), are
    traced exactly (:func:`siddon_path`); -1 for points behind the source.
    ``pts`` LPS (n, 3), ``gpts``/``src`` density-grid frame (mm)."""
    for v in nb.prange(pts.shape[0]):
        x, y, z = _project(rot, iso, sad, pts[v, 0], pts[v, 1], pts[v, 2])
        if z <= 0.0:
            out[v] = -1.0
            continue
        d = -1.0
        if table.shape[2] >= 2:
            d = fan_depth_lookup(table, x0, y0, dxy, z0, dzs, x, y, z, max_spread)
        if d < 0.0:
            d = siddon_path(dens, dsp[0], dsp[1], dsp[2], src[0], src[1], src[2],
                            gpts[v, 0], gpts[v, 1], gpts[v, 2])
        out[v] = d


@nb.njit(cache=True, parallel=True)
def dij_fill(pts, depth, rots, isos, sad, ex0, ey0, nbx, nby, lut_off, lut, wx, wy, cutoff, kp,
             indptr, indices, data, nthreads, bad):
    """Fill CSR rows (one per point) with Gy/MU per beamlet, in increasing column order.

    ``pts``: LPS (n, 3); ``depth[v, b]``: radiological depth (mm) of point v for beam b (see
    :func:`beam_depths`). The (voxel, beamlet) pairs are those counted by :func:`dij_count`;
    ``bad[0]`` is set to the number of rows whose fill disagrees with ``indptr`` (must be 0)."""
    n = pts.shape[0]
    nbeams = rots.shape[0]
    r2 = cutoff * cutoff
    nwin = int(2.0 * cutoff / min(wx, wy)) + 3
    nchunk = max(1, min(n, 64 * nthreads))
    nbad = np.zeros(nchunk, dtype=np.int64)
    for ch in nb.prange(nchunk):
        amp = np.empty(3)
        sig = np.empty(3)
        exs = np.empty((3, nwin))
        eys = np.empty((3, nwin))
        for v in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            pos = indptr[v]
            end = indptr[v + 1]
            for b in range(nbeams):
                x, y, z = _project(rots[b], isos[b], sad, pts[v, 0], pts[v, 1], pts[v, 2])
                if z <= 0.0:
                    continue
                ix0, ix1 = _window(x, cutoff, ex0[b], wx, nbx[b])
                iy0, iy1 = _window(y, cutoff, ey0[b], wy, nby[b])
                if ix1 < ix0 or iy1 < iy0:
                    continue
                d = depth[v, b]
                _components(kp, d, z, amp, sig)
                for c in range(3):
                    _edges(x, sig[c], ex0[b], wx, ix0, ix1, exs[c])
                    _edges(y, sig[c], ey0[b], wy, iy0, iy1, eys[c])
                for iy in range(iy0, iy1 + 1):
                    dy = ey0[b] + (iy + 0.5) * wy - y
                    jx0, jx1 = _row_span(x, dy * dy, r2, ex0[b], wx, nbx[b])
                    my = iy - iy0
                    a0 = amp[0] * eys[0, my]
                    a1 = amp[1] * eys[1, my]
                    a2 = amp[2] * eys[2, my]
                    lrow = lut_off[b] + iy * nbx[b]
                    for ix in range(jx0, jx1 + 1):
                        col = lut[lrow + ix]
                        if col < 0:
                            continue
                        if pos >= end:
                            nbad[ch] += 1
                            break
                        mx = ix - ix0
                        indices[pos] = col
                        data[pos] = a0 * exs[0, mx] + a1 * exs[1, mx] + a2 * exs[2, mx]
                        pos += 1
            if pos != end:
                nbad[ch] += 1
    bad[0] = nbad.sum()


@nb.njit(cache=True, inline="always")
def _pyramid_level(s, res, cutoff, nlev):
    """Coarsest level of a fluence pyramid (element res * 2^l mm) whose element is <= the
    component width ``s`` and <= ``cutoff`` / 6 (see :func:`fluence_dose`)."""
    lev = 0
    while (lev + 1 < nlev and res * 2.0 ** (lev + 1) <= s
           and res * 2.0 ** (lev + 1) <= cutoff / 6.0):
        lev += 1
    return lev


@nb.njit(cache=True, inline="always")
def _disc_sum(pyr, lev, pyr_ny, pyr_nx, fx0, fy0, w, x, y, s, r, ex, ey):
    """Sum over the elements of pyramid level ``lev`` (size ``w`` mm) within ``r`` mm of
    (x, y) of the fluence times the element's integral of the 2-D Gaussian of width ``s``
    centred on (x, y) (exact erf integration per axis; ``ex``/``ey`` scratch)."""
    ix0, ix1 = _window(x, r, fx0, w, pyr_nx[lev])
    iy0, iy1 = _window(y, r, fy0, w, pyr_ny[lev])
    if ix1 < ix0 or iy1 < iy0:
        return 0.0
    _edges(x, s, fx0, w, ix0, ix1, ex)
    _edges(y, s, fy0, w, iy0, iy1, ey)
    r2 = r * r
    acc = 0.0
    for iy in range(iy0, iy1 + 1):
        dy = fy0 + (iy + 0.5) * w - y
        jx0, jx1 = _row_span(x, dy * dy, r2, fx0, w, pyr_nx[lev])
        row = 0.0
        for ix in range(max(jx0, ix0), min(jx1, ix1) + 1):
            row += ex[ix - ix0] * pyr[lev, iy, ix]
        acc += row * ey[iy - iy0]
    return acc


@nb.njit(cache=True, inline="always")
def _component_disc(c, sig, pyr, pyr_ny, pyr_nx, fx0, fy0, res, cutoff, x, y, ex, ey):
    """Lateral integral of kernel component ``c`` (unit amplitude) over one beam's fluence
    pyramid at the isocenter-plane point (x, y): the level and radius rule of
    :func:`fluence_dose`."""
    s = sig[c]
    lev = _pyramid_level(s, res, cutoff, pyr.shape[0])
    w = res * 2.0 ** lev
    r = min(cutoff, 3.5 * s + w)
    return _disc_sum(pyr, lev, pyr_ny, pyr_nx, fx0, fy0, w, x, y, s, r, ex, ey)


@nb.njit(cache=True, parallel=True)
def far_scatter_parts(pts, depths, rot, iso, sad, pyr, pyr_ny, pyr_nx, fx0, fy0, res,
                      cutoff_full, cutoff_near, kp, out, nthreads):
    """Long-range (beyond ``cutoff_near``) parts of one beam's fluence map dose at points, per
    unit primary amplitude: ``out[v, 0]`` = head-scatter and ``out[v, 1]`` = phantom-scatter
    lateral integrals of the fluence within ``cutoff_full`` minus those within
    ``cutoff_near`` (level-0 elements, the Dij's rule). The far dose of point v is
    ``P (h out[v, 0] + k_s d out[v, 1])`` with P the primary amplitude
    (:func:`_components` ``amp[0]``). The primary (width < cut-off / 6) has no far part.
    ``depths[v]``: radiological depth (mm). ``cutoff_near`` 0: the whole integrals within
    ``cutoff_full`` (the plan dose's coarse scatter nodes, :func:`fluence_dose_coarse_scatter`;
    nothing is subtracted), with the level and radius rule of :func:`fluence_dose`."""
    n = pts.shape[0]
    nchunk = max(1, min(n, 64 * nthreads))
    nmax = max(pyr.shape[1], pyr.shape[2]) + 2
    for ch in nb.prange(nchunk):
        amp = np.empty(3)
        sig = np.empty(3)
        ex = np.empty(nmax)
        ey = np.empty(nmax)
        for v in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            out[v, 0] = 0.0
            out[v, 1] = 0.0
            x, y, z = _project(rot, iso, sad, pts[v, 0], pts[v, 1], pts[v, 2])
            if z <= 0.0 or depths[v] < 0.0:
                continue
            _components(kp, depths[v], z, amp, sig)
            for c in range(1, 3):
                part = _component_disc(c, sig, pyr, pyr_ny, pyr_nx, fx0, fy0, res,
                                       cutoff_full, x, y, ex, ey)
                if cutoff_near > 0.0:
                    part -= _disc_sum(pyr, 0, pyr_ny, pyr_nx, fx0, fy0, res, x, y, sig[c],
                                      cutoff_near, ex, ey)
                out[v, c - 1] = part


@nb.njit(cache=True, inline="always")
def primary_amplitude(kp, d, z):
    """Primary amplitude P (Gy/MU per unit fluence, incl. C and inverse square) at
    radiological depth d (mm) and source distance z (mm): ``amp[0]`` of :func:`_components`."""
    proj = kp[10] / z
    d = max(d, 0.0)
    return (1.0 - math.exp(-kp[1] * d)) * math.exp(-kp[0] * d) * kp[9] * proj * proj


@nb.njit(cache=True, inline="always")
def _node_interp(fi, ny_, nx_, stride, node_index, parts):
    """Trilinear interpolation of the two columns of ``parts`` (values on the coarse nodes:
    dose-grid indices that are multiples of ``stride``; ``node_index`` (nK, nJ, nI) maps a
    node to its row in ``parts``) at the dose voxel with flat index ``fi``."""
    k = fi // (ny_ * nx_)
    rem = fi - k * ny_ * nx_
    j = rem // nx_
    i = rem - j * nx_
    k0, j0, i0 = k // stride, j // stride, i // stride
    tk = (k - k0 * stride) / stride
    tj = (j - j0 * stride) / stride
    ti = (i - i0 * stride) / stride
    q0 = 0.0
    q1 = 0.0
    for dk in range(2):
        wk = tk if dk else 1.0 - tk
        if wk == 0.0:
            continue
        for dj in range(2):
            wj = tj if dj else 1.0 - tj
            if wj == 0.0:
                continue
            for di in range(2):
                wi = ti if di else 1.0 - ti
                if wi == 0.0:
                    continue
                m = node_index[k0 + dk, j0 + dj, i0 + di]
                wgt = wk * wj * wi
                q0 += wgt * parts[m, 0]
                q1 += wgt * parts[m, 1]
    return q0, q1


@nb.njit(cache=True, parallel=True)
def far_scatter_rows(pts, depth, rot, iso, sad, kp, flat_idx, dshape, stride, node_index,
                     parts, near, factor, cap):
    """Scatter-correction factor of one beam at the Dij rows: ``factor[v] = (near[v] +
    far[v]) / near[v]`` (clipped to [0, cap]; 1 where ``near`` is 0), with ``far`` = P(d, z)
    (h q_h + k_s d q_s) and (q_h, q_s) trilinearly interpolated from :func:`far_scatter_parts`
    on the coarse nodes (dose-grid indices that are multiples of ``stride``; ``node_index``
    (nK, nJ, nI) maps a node to its row in ``parts`` or -1). Returns via ``factor``; the
    number of capped factors is added to ``cap[1]`` (``cap[0]`` is the cap)."""
    n = pts.shape[0]
    ny_, nx_ = dshape[1], dshape[2]
    ncap = np.zeros(n, dtype=np.int64)
    for v in nb.prange(n):
        if near[v] <= 0.0:
            factor[v] = 1.0
            continue
        qh, qs = _node_interp(flat_idx[v], ny_, nx_, stride, node_index, parts)
        _, _, z = _project(rot, iso, sad, pts[v, 0], pts[v, 1], pts[v, 2])
        d = max(depth[v], 0.0)
        far = primary_amplitude(kp, d, z) * (kp[5] * qh + kp[2] * d * qs)
        f = (near[v] + far) / near[v]
        if f > cap[0]:
            ncap[v] = 1
            f = cap[0]
        factor[v] = max(f, 0.0)
    cap[1] += ncap.sum()


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
                tot += amp[c] * _component_disc(c, sig, pyr, pyr_ny, pyr_nx, fx0, fy0, res,
                                                cutoff, x, y, ex, ey)
            out[v] += tot


@nb.njit(cache=True, parallel=True)
def fluence_dose_coarse_scatter(pts, depths, rot, iso, sad, pyr, pyr_ny, pyr_nx, fx0, fy0,
                                res, cutoff, kp, flat_idx, dshape, stride, node_index, q, out,
                                nthreads):
    """Add to ``out[v]`` the dose (Gy) of one beam's fluence map: the primary component
    exactly (as :func:`fluence_dose`), the two scatter components from their lateral
    integrals ``q`` (:func:`far_scatter_parts` with ``cutoff_near`` 0 on the coarse nodes, ``node_index`` as in
    :func:`far_scatter_rows`) interpolated trilinearly to the voxel (flat dose-grid index
    ``flat_idx[v]``, grid shape ``dshape``) and multiplied by the voxel's own amplitudes (its
    depth and source distance: build-up, attenuation, inverse square and the phantom
    scatter's growth with depth stay exact). ``depths[v]`` (mm) must be given."""
    n = pts.shape[0]
    ny_, nx_ = dshape[1], dshape[2]
    nchunk = max(1, min(n, 64 * nthreads))
    nmax = max(pyr.shape[1], pyr.shape[2]) + 2
    for ch in nb.prange(nchunk):
        amp = np.empty(3)
        sig = np.empty(3)
        ex = np.empty(nmax)
        ey = np.empty(nmax)
        for v in range(ch * n // nchunk, (ch + 1) * n // nchunk):
            x, y, z = _project(rot, iso, sad, pts[v, 0], pts[v, 1], pts[v, 2])
            if z <= 0.0 or depths[v] < 0.0:
                continue
            _components(kp, depths[v], z, amp, sig)
            tot = amp[0] * _component_disc(0, sig, pyr, pyr_ny, pyr_nx, fx0, fy0,
                                           res, cutoff, x, y, ex, ey)
            qh, qs = _node_interp(flat_idx[v], ny_, nx_, stride, node_index, q)
            out[v] += tot + amp[1] * qh + amp[2] * qs


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
