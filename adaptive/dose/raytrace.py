"""Radiological (water-equivalent) path lengths along straight rays: Siddon's exact
voxel-intersection algorithm with Jacobs' incremental traversal, in numba.

Rays are traced in the density grid's own frame: a point p (LPS mm) has grid-frame
coordinates ``q = D^T (p - origin)`` (mm along the i, j, k axes), so voxel (i, j, k) is the box
``[(i - 1/2) s_i, (i + 1/2) s_i] x ...``. Works for any orthonormal direction matrix.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from adaptive.geometry.volume import Volume


@nb.njit(cache=True, fastmath=False, nogil=True)
def siddon_path(dens, sx, sy, sz, ax, ay, az, bx, by, bz):
    """Integral of ``dens`` (numpy (k, j, i) array, units per mm of water) along the segment
    a -> b (grid-frame mm). Returns sum(density * intersection length) in mm; the parts of the
    segment outside the grid contribute 0."""
    nk, nj, ni = dens.shape
    dx, dy, dz = bx - ax, by - ay, bz - az
    length = math.sqrt(dx * dx + dy * dy + dz * dz)
    if length == 0.0:
        return 0.0
    amin = 0.0
    amax = 1.0
    # entry/exit parameters per axis
    if dx != 0.0:
        a0 = (-0.5 * sx - ax) / dx
        a1 = ((ni - 0.5) * sx - ax) / dx
        amin = max(amin, min(a0, a1))
        amax = min(amax, max(a0, a1))
    elif ax < -0.5 * sx or ax > (ni - 0.5) * sx:
        return 0.0
    if dy != 0.0:
        a0 = (-0.5 * sy - ay) / dy
        a1 = ((nj - 0.5) * sy - ay) / dy
        amin = max(amin, min(a0, a1))
        amax = min(amax, max(a0, a1))
    elif ay < -0.5 * sy or ay > (nj - 0.5) * sy:
        return 0.0
    if dz != 0.0:
        a0 = (-0.5 * sz - az) / dz
        a1 = ((nk - 0.5) * sz - az) / dz
        amin = max(amin, min(a0, a1))
        amax = min(amax, max(a0, a1))
    elif az < -0.5 * sz or az > (nk - 0.5) * sz:
        return 0.0
    if amin >= amax:
        return 0.0
    # voxel containing the midpoint of the first (infinitesimal) step
    am = amin + 1e-9 * (amax - amin)
    i = int(math.floor((ax + am * dx) / sx + 0.5))
    j = int(math.floor((ay + am * dy) / sy + 0.5))
    k = int(math.floor((az + am * dz) / sz + 0.5))
    i = min(max(i, 0), ni - 1)
    j = min(max(j, 0), nj - 1)
    k = min(max(k, 0), nk - 1)
    inf = 1e30
    if dx > 0.0:
        si, nxa, dax = 1, ((i + 0.5) * sx - ax) / dx, sx / dx
    elif dx < 0.0:
        si, nxa, dax = -1, ((i - 0.5) * sx - ax) / dx, -sx / dx
    else:
        si, nxa, dax = 0, inf, inf
    if dy > 0.0:
        sj, nya, day = 1, ((j + 0.5) * sy - ay) / dy, sy / dy
    elif dy < 0.0:
        sj, nya, day = -1, ((j - 0.5) * sy - ay) / dy, -sy / dy
    else:
        sj, nya, day = 0, inf, inf
    if dz > 0.0:
        sk, nza, daz = 1, ((k + 0.5) * sz - az) / dz, sz / dz
    elif dz < 0.0:
        sk, nza, daz = -1, ((k - 0.5) * sz - az) / dz, -sz / dz
    else:
        sk, nza, daz = 0, inf, inf
    acur = amin
    total = 0.0
    while True:
        anext = min(nxa, nya, nza)
        anext = min(anext, amax)
        total += dens[k, j, i] * (anext - acur)
        if anext >= amax:
            break
        acur = anext
        if nxa <= anext:
            i += si
            nxa += dax
            if i < 0 or i >= ni:
                break
        if nya <= anext:
            j += sj
            nya += day
            if j < 0 or j >= nj:
                break
        if nza <= anext:
            k += sk
            nza += daz
            if k < 0 or k >= nk:
                break
    return total * length


@nb.njit(cache=True, parallel=True)
def _paths(dens, sp, a, b, out):
    for n in nb.prange(b.shape[0]):
        out[n] = siddon_path(dens, sp[0], sp[1], sp[2], a[n, 0], a[n, 1], a[n, 2],
                             b[n, 0], b[n, 1], b[n, 2])


def lps_to_grid_frame(volume: Volume, p_lps) -> np.ndarray:
    """LPS mm (..., 3) -> grid-frame mm (..., 3): ``D^T (p - origin)``."""
    g = volume.grid
    return (np.asarray(p_lps, dtype=np.float64) - g.origin) @ g.direction


def radiological_path_lengths(density: Volume, start_lps, end_lps) -> np.ndarray:
    """Water-equivalent path length (mm) = integral of relative electron density along each
    segment start -> end (LPS mm, arrays (n, 3) or (3,) broadcast)."""
    a = np.atleast_2d(lps_to_grid_frame(density, start_lps))
    b = np.atleast_2d(lps_to_grid_frame(density, end_lps))
    a, b = np.broadcast_arrays(a, b)
    out = np.empty(b.shape[0], dtype=np.float64)
    dens = np.ascontiguousarray(density.array, dtype=np.float32)
    _paths(dens, np.ascontiguousarray(density.grid.spacing), np.ascontiguousarray(a),
           np.ascontiguousarray(b), out)
    return out
