"""Radiological (water-equivalent) path lengths along straight rays: Siddon's exact
voxel-intersection algorithm with Jacobs' incremental traversal, in numba.

Rays are traced in the density grid's own frame: a point p (LPS mm) has grid-frame
coordinates ``q = D^T (p - origin)`` (mm along the i, j, k axes), so voxel (i, j, k) is the box
``[(i - 1/2) s_i, (i + 1/2) s_i] x ...``. Works for any orthonormal direction matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba as nb
import numpy as np

from adaptive.geometry.volume import Volume


@nb.njit(cache=True, inline="always")
def _siddon_start(nk, nj, ni, sx, sy, sz, ax, ay, az, dx, dy, dz):
    """Where the segment a -> a + (dx, dy, dz) (grid-frame mm) crosses the grid, and the state
    of Jacobs' incremental traversal there: ``(inside, amin, amax, i, j, k, si, sj, sk, nxa,
    nya, nza, dax, day, daz)`` with [amin, amax] the parameter range inside the grid, (i, j, k)
    the first voxel, s* the index steps, n*a the parameters of the next plane crossings and
    da* the parameter distance between planes per axis."""
    amin = 0.0
    amax = 1.0
    inf = 1e30
    # entry/exit parameters per axis
    if dx != 0.0:
        a0 = (-0.5 * sx - ax) / dx
        a1 = ((ni - 0.5) * sx - ax) / dx
        amin = max(amin, min(a0, a1))
        amax = min(amax, max(a0, a1))
    elif ax < -0.5 * sx or ax > (ni - 0.5) * sx:
        amin = amax
    if dy != 0.0:
        a0 = (-0.5 * sy - ay) / dy
        a1 = ((nj - 0.5) * sy - ay) / dy
        amin = max(amin, min(a0, a1))
        amax = min(amax, max(a0, a1))
    elif ay < -0.5 * sy or ay > (nj - 0.5) * sy:
        amin = amax
    if dz != 0.0:
        a0 = (-0.5 * sz - az) / dz
        a1 = ((nk - 0.5) * sz - az) / dz
        amin = max(amin, min(a0, a1))
        amax = min(amax, max(a0, a1))
    elif az < -0.5 * sz or az > (nk - 0.5) * sz:
        amin = amax
    # voxel containing the midpoint of the first (infinitesimal) step
    am = amin + 1e-9 * (amax - amin)
    i = min(max(math.floor((ax + am * dx) / sx + 0.5), 0), ni - 1)
    j = min(max(math.floor((ay + am * dy) / sy + 0.5), 0), nj - 1)
    k = min(max(math.floor((az + am * dz) / sz + 0.5), 0), nk - 1)
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
    return amin < amax, amin, amax, i, j, k, si, sj, sk, nxa, nya, nza, dax, day, daz


@nb.njit(cache=True, inline="always")
def _siddon_step(anext, i, j, k, si, sj, sk, nxa, nya, nza, dax, day, daz, ni, nj, nk):
    """Cross the voxel planes at parameter ``anext``: ``(still inside, i, j, k, nxa, nya,
    nza)``."""
    if nxa <= anext:
        i += si
        nxa += dax
        if i < 0 or i >= ni:
            return False, i, j, k, nxa, nya, nza
    if nya <= anext:
        j += sj
        nya += day
        if j < 0 or j >= nj:
            return False, i, j, k, nxa, nya, nza
    if nza <= anext:
        k += sk
        nza += daz
        if k < 0 or k >= nk:
            return False, i, j, k, nxa, nya, nza
    return True, i, j, k, nxa, nya, nza


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
    inside, amin, amax, i, j, k, si, sj, sk, nxa, nya, nza, dax, day, daz = _siddon_start(
        nk, nj, ni, sx, sy, sz, ax, ay, az, dx, dy, dz)
    if not inside:
        return 0.0
    acur = amin
    total = 0.0
    while True:
        anext = min(nxa, nya, nza)
        anext = min(anext, amax)
        total += dens[k, j, i] * (anext - acur)
        if anext >= amax:
            break
        acur = anext
        inside, i, j, k, nxa, nya, nza = _siddon_step(anext, i, j, k, si, sj, sk, nxa, nya,
                                                      nza, dax, day, daz, ni, nj, nk)
        if not inside:
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


# --- per-beam divergent (fan) depth grid ---------------------------------------------------


@nb.njit(cache=True, fastmath=False, nogil=True)
def siddon_profile(dens, sx, sy, sz, ax, ay, az, bx, by, bz, alphas, out):
    """Cumulative radiological path (mm) from a to the points a + alpha (b - a) for the
    increasing parameters ``alphas`` (in [0, 1]), written to ``out``: exact Siddon
    accumulation along the segment a -> b (grid-frame mm), in one traversal. Samples before the
    ray enters the grid get 0, samples after it leaves get the total."""
    nk, nj, ni = dens.shape
    ns = alphas.shape[0]
    dx, dy, dz = bx - ax, by - ay, bz - az
    length = math.sqrt(dx * dx + dy * dy + dz * dz)
    for s in range(ns):
        out[s] = 0.0
    if length == 0.0:
        return
    inside, amin, amax, i, j, k, si, sj, sk, nxa, nya, nza, dax, day, daz = _siddon_start(
        nk, nj, ni, sx, sy, sz, ax, ay, az, dx, dy, dz)
    if not inside:
        return
    s = 0
    while s < ns and alphas[s] <= amin:
        s += 1
    acur = amin
    total = 0.0
    while s < ns:
        anext = min(nxa, nya, nza)
        anext = min(anext, amax)
        rho = dens[k, j, i]
        while s < ns and alphas[s] <= anext:
            out[s] = (total + rho * (alphas[s] - acur)) * length
            s += 1
        total += rho * (anext - acur)
        if anext >= amax:
            break
        acur = anext
        inside, i, j, k, nxa, nya, nza = _siddon_step(anext, i, j, k, si, sj, sk, nxa, nya,
                                                      nza, dax, day, daz, ni, nj, nk)
        if not inside:
            break
    while s < ns:
        out[s] = total * length
        s += 1


@nb.njit(cache=True, parallel=True)
def fan_depth_table(dens, dsp, src, org, ex, ey, ez, x0, y0, dxy, nx, ny, z0, dzs, nz, table):
    """Radiological depth (mm) on a beam's divergent grid: ``table[iy, ix, iz]`` is the exact
    (Siddon) density integral from the source to the point at axis distance ``z0 + iz dzs``
    (mm from the source) on the ray through isocenter-plane position (x0 + ix dxy,
    y0 + iy dxy) (IEC B mm). Frame vectors are in the density grid frame (mm): ``src`` the
    source, ``org`` the isocenter, ``ex``/``ey`` the IEC B X/Y unit vectors, ``ez`` the unit
    vector from the isocenter towards the source. ``sad`` is |src - org|."""
    sad = math.sqrt((src[0] - org[0]) ** 2 + (src[1] - org[1]) ** 2 + (src[2] - org[2]) ** 2)
    zend = z0 + (nz - 1) * dzs
    for r in nb.prange(ny * nx):
        iy = r // nx
        ix = r - iy * nx
        alphas = np.empty(nz)
        for iz in range(nz):
            alphas[iz] = (z0 + iz * dzs) / zend
        x = x0 + ix * dxy
        y = y0 + iy * dxy
        f = zend / sad
        # point at axis distance zend: iso + f * (x ex + y ey) - (zend - sad) ez
        bx = org[0] + f * (x * ex[0] + y * ey[0]) - (zend - sad) * ez[0]
        by = org[1] + f * (x * ex[1] + y * ey[1]) - (zend - sad) * ez[1]
        bz = org[2] + f * (x * ex[2] + y * ey[2]) - (zend - sad) * ez[2]
        siddon_profile(dens, dsp[0], dsp[1], dsp[2], src[0], src[1], src[2], bx, by, bz,
                       alphas, table[iy, ix])


@nb.njit(cache=True, inline="always")
def fan_depth_lookup(table, x0, y0, dxy, z0, dzs, x, y, z, max_spread):
    """Trilinear interpolation of a :func:`fan_depth_table` at isocenter-plane position (x, y)
    (mm) and axis distance z (mm from the source); -1 if outside the table or if the four
    surrounding rays' depths (at z) differ by more than ``max_spread`` mm (steep lateral depth
    change: grazing entry or an interface along the beam; the caller traces such points
    exactly)."""
    ny, nx, nz = table.shape
    fx = (x - x0) / dxy
    fy = (y - y0) / dxy
    fz = (z - z0) / dzs
    if not (fx >= 0.0 and fy >= 0.0 and fz >= 0.0 and fx <= nx - 1 and fy <= ny - 1
            and fz <= nz - 1):
        return -1.0
    ix = min(int(fx), nx - 2)
    iy = min(int(fy), ny - 2)
    iz = min(int(fz), nz - 2)
    tx = fx - ix
    ty = fy - iy
    tz = fz - iz
    c00 = table[iy, ix, iz] * (1.0 - tz) + table[iy, ix, iz + 1] * tz
    c01 = table[iy, ix + 1, iz] * (1.0 - tz) + table[iy, ix + 1, iz + 1] * tz
    c10 = table[iy + 1, ix, iz] * (1.0 - tz) + table[iy + 1, ix, iz + 1] * tz
    c11 = table[iy + 1, ix + 1, iz] * (1.0 - tz) + table[iy + 1, ix + 1, iz + 1] * tz
    spread = max(c00, c01, c10, c11) - min(c00, c01, c10, c11)
    if spread > max_spread:
        return -1.0
    return ((c00 * (1.0 - tx) + c01 * tx) * (1.0 - ty) + (c10 * (1.0 - tx) + c11 * tx) * ty)


@dataclass
class FanDepthTable:
    """One beam's radiological depths on a divergent grid (see :func:`fan_depth_table`):
    ``table[iy, ix, iz]`` (mm, float32) at isocenter-plane position (x0 + ix dxy,
    y0 + iy dxy) (IEC B mm) and axis distance z0 + iz dz (mm from the source)."""

    table: np.ndarray
    x0_mm: float
    y0_mm: float
    dxy_mm: float
    z0_mm: float
    dz_mm: float


def build_fan_depth_table(density: Volume, geometry, pts_lps: np.ndarray, dxy_mm: float,
                          dz_mm: float, dens: np.ndarray | None = None) -> FanDepthTable:
    """Fan depth table of one beam (:class:`adaptive.dose.beam_geometry.BeamGeometry`)
    covering the points ``pts_lps`` (n, 3) in front of the source, with ray spacing
    ``dxy_mm`` at the isocenter plane and depth samples every ``dz_mm`` along the axis."""
    if dxy_mm <= 0 or dz_mm <= 0:
        raise ValueError(f"fan grid spacings must be > 0 (got {dxy_mm}, {dz_mm})")
    x, y, z = geometry.project_to_isoplane(np.asarray(pts_lps, dtype=np.float64))
    ok = z > 0
    if not ok.any():
        return FanDepthTable(np.zeros((2, 2, 0), np.float32), 0.0, 0.0, dxy_mm, 0.0, dz_mm)
    x, y, z = x[ok], y[ok], z[ok]
    x0 = float(np.floor(x.min() / dxy_mm) - 1) * dxy_mm
    y0 = float(np.floor(y.min() / dxy_mm) - 1) * dxy_mm
    z0 = max(float(np.floor(z.min() / dz_mm) - 1) * dz_mm, dz_mm)
    nx = int(np.ceil((x.max() - x0) / dxy_mm)) + 2
    ny = int(np.ceil((y.max() - y0) / dxy_mm)) + 2
    nz = int(np.ceil((z.max() - z0) / dz_mm)) + 2
    table = np.empty((ny, nx, nz), dtype=np.float32)
    if dens is None:
        dens = np.ascontiguousarray(density.array, dtype=np.float32)
    d = density.grid.direction
    rot = geometry.rotation
    fan_depth_table(dens, np.ascontiguousarray(density.grid.spacing, dtype=np.float64),
                    np.ascontiguousarray(lps_to_grid_frame(density, geometry.source_lps_mm)),
                    np.ascontiguousarray(lps_to_grid_frame(density, geometry.isocenter_lps_mm)),
                    np.ascontiguousarray(rot[:, 0] @ d), np.ascontiguousarray(rot[:, 1] @ d),
                    np.ascontiguousarray(rot[:, 2] @ d), x0, y0, float(dxy_mm), nx, ny, z0,
                    float(dz_mm), nz, table)
    return FanDepthTable(table, x0, y0, float(dxy_mm), z0, float(dz_mm))
