"""Pulling an image back through a spatial mapping, on both cores (numba).

The mapping sends a point ``x`` of the output (fixed) grid to the moving image's point
``p(x) = M x + u(x)`` (LPS mm): ``M`` a 4×4 affine matrix (identity by default), ``u`` an
optional displacement field on the output grid (numpy (z, y, x, 3), LPS mm). The output is
the moving image trilinearly interpolated at ``p(x)``, with the semantics of
``scipy.ndimage.map_coordinates(order=1, mode="constant")``: a point outside the moving
image's voxel centres (index < 0 or > n - 1 on any axis) gets ``fill``.

Why not scipy: ``map_coordinates`` needs the coordinates of every output voxel as a float64
array (24 bytes per voxel, plus the LPS centres they are computed from), runs on one core, and
a 512 × 512 CBCT has 23 M voxels: 3-5 s and 2 GB per image pulled back. This kernel computes
each voxel's moving index on the fly from the two grids' affines, in parallel over slices.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numba as nb
import numpy as np

from adaptive.errors import GeometryError

if TYPE_CHECKING:  # types only: volume.py imports this module (displacement_warp)
    from adaptive.geometry.volume import Grid, Volume


@nb.njit(cache=True, inline="always")
def _moving_index(a, b, minv, u, has_u, i, j, k):
    """Continuous moving index (x, y, z) of output voxel (i, j, k): ``a @ (i, j, k) + b``
    plus ``minv @ u[k, j, i]`` when there is a field (see :func:`_index_map`)."""
    x = a[0, 0] * i + a[0, 1] * j + a[0, 2] * k + b[0]
    y = a[1, 0] * i + a[1, 1] * j + a[1, 2] * k + b[1]
    z = a[2, 0] * i + a[2, 1] * j + a[2, 2] * k + b[2]
    if has_u:
        ux, uy, uz = u[k, j, i, 0], u[k, j, i, 1], u[k, j, i, 2]
        x += minv[0, 0] * ux + minv[0, 1] * uy + minv[0, 2] * uz
        y += minv[1, 0] * ux + minv[1, 1] * uy + minv[1, 2] * uz
        z += minv[2, 0] * ux + minv[2, 1] * uy + minv[2, 2] * uz
    return x, y, z


@nb.njit(cache=True, parallel=True)
def _pull_back(moving, a, b, minv, u, fill, box, sub, out):
    """out[k, j, i] = moving (trilinear) at continuous index a @ (i, j, k) + b + minv @ u[k, j, i]
    (u omitted when it has no voxels) for the output voxels in ``sub`` = (k0, k1, j0, j1, i0,
    i1) (half-open; the rest of ``out`` is left as it is); ``fill`` outside the moving
    image's centres or outside ``box`` = (i0, i1, j0, j1, k0, k1) (continuous moving indices:
    everything outside is known to be ``fill``, e.g. a mask's bounding box)."""
    mz, my, mx = moving.shape
    has_u = u.shape[0] > 0
    for k in nb.prange(sub[0], sub[1]):
        for j in range(sub[2], sub[3]):
            for i in range(sub[4], sub[5]):
                x, y, z = _moving_index(a, b, minv, u, has_u, i, j, k)
                if (x < box[0] or x > box[1] or y < box[2] or y > box[3] or z < box[4]
                        or z > box[5] or x < 0.0 or y < 0.0 or z < 0.0 or x > mx - 1
                        or y > my - 1 or z > mz - 1):
                    out[k, j, i] = fill
                    continue
                i0 = min(int(x), mx - 1)
                j0 = min(int(y), my - 1)
                k0 = min(int(z), mz - 1)
                fx = x - i0
                fy = y - j0
                fz = z - k0
                i1 = min(i0 + 1, mx - 1)
                j1 = min(j0 + 1, my - 1)
                k1 = min(k0 + 1, mz - 1)
                c00 = moving[k0, j0, i0] * (1.0 - fx) + moving[k0, j0, i1] * fx
                c01 = moving[k0, j1, i0] * (1.0 - fx) + moving[k0, j1, i1] * fx
                c10 = moving[k1, j0, i0] * (1.0 - fx) + moving[k1, j0, i1] * fx
                c11 = moving[k1, j1, i0] * (1.0 - fx) + moving[k1, j1, i1] * fx
                c0 = c00 * (1.0 - fy) + c01 * fy
                c1 = c10 * (1.0 - fy) + c11 * fy
                out[k, j, i] = c0 * (1.0 - fz) + c1 * fz


# The same kernel on one thread, without numba's thread pool (see no_thread_pool). Its Python
# function is a copy under its own name: numba's on-disk cache is keyed by the function's
# qualified name and line, so a dispatcher of the very same function loaded the *parallel*
# compilation from the cache, and loading it starts the OpenMP pool (numba's
# _reload_parfors), which is what no_thread_pool exists to avoid.
_pull_back_serial = nb.njit(cache=True)(types.FunctionType(
    _pull_back.py_func.__code__.replace(co_name="_pull_back_serial",
                                        co_qualname="_pull_back_serial"),
    _pull_back.py_func.__globals__, "_pull_back_serial"))
_serial_depth = 0


@contextmanager
def no_thread_pool() -> Iterator[None]:
    """Inside: :func:`pull_back` runs on one thread and does not start numba's thread pool in
    this process. For work done in a process that later forks children using the parallel
    kernel (a service worker's warm-up before its stages run in forked children): numba's
    OpenMP layer is not fork-safe with GNU OpenMP; in a child of a process that already used
    it every parallel region is refused ("Terminating: fork() called from a process already
    using GNU OpenMP, this is unsafe.", SIGTERM to the child) and, where SIGTERM is handled,
    silently skipped, leaving the output array unwritten."""
    global _serial_depth
    _serial_depth += 1
    try:
        yield
    finally:
        _serial_depth -= 1


def _box_of(mask: np.ndarray) -> np.ndarray:
    """Continuous moving-index box (i0, i1, j0, j1, k0, k1) outside which a mask's trilinear
    interpolation is 0: its True voxels' bounding box grown by one voxel."""
    box = np.empty(6)
    for n, ax in enumerate((2, 1, 0)):  # i, j, k = numpy axes 2, 1, 0
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        box[2 * n], box[2 * n + 1] = idx[0] - 1.0, idx[-1] + 1.0
    return box


def _reaching(box: np.ndarray, mg: Grid, m: np.ndarray, grid: Grid,
              dvf_bounds: np.ndarray | None) -> np.ndarray:
    """Half-open output index ranges (k0, k1, j0, j1, i0, i1) that contain every output voxel
    whose mapped point p = m x + u(x) can fall inside the moving-index ``box``: the box's
    LPS corners, widened by the range of u (``dvf_bounds`` (2, 3): per-axis min and max),
    mapped back by m⁻¹ into output indices (an affine image of a box lies in the box of its
    corners' images)."""
    c = np.array([[x, y, z] for x in box[0:2] for y in box[2:4] for z in box[4:6]])
    lps = mg.ijk_to_lps(c)
    lo, hi = lps.min(axis=0), lps.max(axis=0)
    if dvf_bounds is not None:
        lo, hi = lo - dvf_bounds[1], hi - dvf_bounds[0]
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    minv = np.linalg.inv(m)
    ijk = grid.lps_to_ijk(corners @ minv[:3, :3].T + minv[:3, 3])
    a = np.floor(ijk.min(axis=0)).astype(np.int64) - 1
    b = np.ceil(ijk.max(axis=0)).astype(np.int64) + 2
    nx, ny, nz = grid.size_ijk
    i0, j0, k0 = (int(np.clip(v, 0, n)) for v, n in zip(a, (nx, ny, nz)))
    i1, j1, k1 = (int(np.clip(v, 0, n)) for v, n in zip(b, (nx, ny, nz)))
    return np.array([k0, k1, j0, j1, i0, i1], dtype=np.int64)


def _index_map(mg: Grid, grid: Grid, m: np.ndarray, dvf_lps_mm
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, minv, u) of the kernels: output index (i, j, k) -> moving index ``a @ ijk + b``
    (+ ``minv @ u``), ``minv`` the moving grid's LPS -> index matrix and ``u`` the field
    (float32/64; an empty array when there is none)."""
    minv = np.linalg.inv(mg.direction * mg.spacing[None, :])
    fixed = grid.direction * grid.spacing[None, :]
    a = minv @ m[:3, :3] @ fixed
    b = minv @ (m[:3, :3] @ grid.origin + m[:3, 3] - mg.origin)
    if dvf_lps_mm is None:
        return a, b, minv, np.zeros((0, 0, 0, 3), dtype=np.float32)
    u = np.asarray(dvf_lps_mm)
    if u.shape != grid.shape + (3,):
        raise GeometryError(f"DVF shape {u.shape} != {grid.shape + (3,)}")
    if u.dtype not in (np.float32, np.float64):
        u = u.astype(np.float32)
    return a, b, minv, u


def pull_back(moving: Volume, grid: Grid, *, matrix=None, dvf_lps_mm: np.ndarray | None = None,
              fill: float = 0.0, dvf_bounds: np.ndarray | None = None) -> np.ndarray:
    """``moving`` sampled (trilinear) at ``p(x) = matrix x + dvf(x)`` for every voxel centre
    ``x`` of ``grid`` (see the module docstring); float32 numpy (z, y, x) on ``grid``. A
    boolean ``moving`` (a mask) gives its interpolated occupancy in [0, 1], computed only on
    the output voxels that can reach the mask's bounding box (``dvf_bounds``: per-axis (min,
    max) of the field, (2, 3) mm; computed when not given)."""
    m = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise GeometryError(f"matrix must be 4x4, got {m.shape}")
    src = np.asarray(moving.array)
    mg = moving.grid
    nz, ny, nx = grid.shape
    sub = np.array([0, nz, 0, ny, 0, nx], dtype=np.int64)
    if src.dtype == bool:
        if not src.any():
            return np.full(grid.shape, fill, dtype=np.float32)
        box = _box_of(src)
        src = src.view(np.uint8)
        if dvf_lps_mm is not None and dvf_bounds is None:
            dvf_bounds = field_bounds(dvf_lps_mm)
        sub = _reaching(box, mg, m, grid, None if dvf_lps_mm is None else dvf_bounds)
    else:
        box = np.array([-np.inf, np.inf] * 3)
    a, b, minv, u = _index_map(mg, grid, m, dvf_lps_mm)
    full = sub[0] == 0 and sub[1] == nz and sub[2] == 0 and sub[3] == ny and sub[4] == 0 \
        and sub[5] == nx
    out = np.empty(grid.shape, dtype=np.float32) if full else np.full(grid.shape, fill,
                                                                       dtype=np.float32)
    kernel = _pull_back_serial if _serial_depth else _pull_back
    kernel(np.ascontiguousarray(src), np.ascontiguousarray(a), np.ascontiguousarray(b),
               np.ascontiguousarray(minv), np.ascontiguousarray(u), float(fill), box, sub, out)
    return out


@nb.njit(cache=True)
def _inside(shape, a, b, minv, u, margin, region, out):
    """out[k, j, i] = region[k, j, i] and the mapped continuous moving index (as in
    :func:`_pull_back`) lies within ``margin`` voxels outside the moving grid's edge centres
    on every axis (``shape`` = moving (nz, ny, nx)). Serial: no thread pool."""
    mz, my, mx = shape[0], shape[1], shape[2]
    has_u = u.shape[0] > 0
    nz, ny, nx = region.shape
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                if not region[k, j, i]:
                    out[k, j, i] = False
                    continue
                x, y, z = _moving_index(a, b, minv, u, has_u, i, j, k)
                out[k, j, i] = (-margin <= x <= mx - 1 + margin and -margin <= y <= my - 1 + margin
                                and -margin <= z <= mz - 1 + margin)


def mapped_inside(moving_grid: Grid, grid: Grid, region: np.ndarray, *, matrix=None,
                  dvf_lps_mm: np.ndarray | None = None, margin_vox: float = 0.5) -> np.ndarray:
    """Boolean (z, y, x) on ``grid``: the voxels of ``region`` whose mapped centre ``p(x) =
    matrix x + dvf(x)`` falls inside ``moving_grid`` (within ``margin_vox`` of its edge
    voxels' centres, as :meth:`Grid.contains_lps`), without forming the points: the same
    index arithmetic as :func:`pull_back`."""
    m = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
    a, b, minv, u = _index_map(moving_grid, grid, m, dvf_lps_mm)
    region = np.ascontiguousarray(region, dtype=bool)
    if region.shape != grid.shape:
        raise GeometryError(f"region shape {region.shape} != {grid.shape}")
    out = np.empty(grid.shape, dtype=bool)
    _inside(np.array(moving_grid.shape, dtype=np.int64), np.ascontiguousarray(a),
            np.ascontiguousarray(b), np.ascontiguousarray(minv), np.ascontiguousarray(u),
            float(margin_vox), region, out)
    return out


@nb.njit(cache=True)
def _min_max_xyz(u):
    """Per-component (min, max) of ``u`` (n, 3) in one pass (serial: no thread pool)."""
    out = np.empty((2, 3))
    for c in range(3):
        out[0, c] = np.inf
        out[1, c] = -np.inf
    for n in range(u.shape[0]):
        for c in range(3):
            v = u[n, c]
            if v != v:      # NaN: the bounds are NaN, as numpy's min / max would be
                out[:, :] = np.nan
                return out
            if v < out[0, c]:
                out[0, c] = v
            if v > out[1, c]:
                out[1, c] = v
    return out


def field_bounds(dvf_lps_mm: np.ndarray) -> np.ndarray:
    """Per-axis (min, max) of a displacement field (2, 3), mm. One pass of a compiled loop:
    numpy's ``reshape(-1, 3).min(axis=0)`` reduces over an inner length of 3 and took ~0.6 s
    per call on a 512 x 512 x 88 field (ten calls per registration). A NaN anywhere makes
    the result NaN, as numpy's would."""
    u = np.ascontiguousarray(dvf_lps_mm).reshape(-1, 3)
    if u.shape[0] == 0:
        raise GeometryError("field_bounds of an empty field")
    return _min_max_xyz(u)
