"""The registration's mapping evaluated on any grid in the CBCT frame.

A registration result is a rigid matrix ``M`` (CBCT LPS → planning LPS) composed with an
elastix B-spline transform ``b`` found on the working grid (:mod:`adaptive.registration.
working`): a CBCT point x maps to the planning point ``M (x + b(x))``, so its displacement
is ``u(x) = M (x + b(x)) − x``. ``b`` is a smooth analytic function (cubic B-spline on a
25 mm control grid), so it is evaluated exactly at any point; this module does so for every
voxel of a grid (e.g. the native 512 × 512 CBCT the synthetic CT and the contours are made
on) with the separable form of the B-spline (:func:`elastix_backend.bspline_factors`) and one
parallel pass for the z contraction and the rigid composition, writing float32 directly (the
numpy route needs ~1 GB of float64 temporaries on a 23 M voxel grid).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from adaptive.geometry.volume import Grid
from adaptive.registration import elastix_backend as eb
from adaptive.registration.quality import affine_field_on_grid


@nb.njit(cache=True, parallel=True)
def _compose(t, wz, rot, trans, aff, out):
    """out[z, y, x] = rot (p + b) + trans − p for the voxel centre p = aff (x, y, z, 1) and
    b[c] = Σ_k wz[z, k] t[c, k, y, x] (b = 0 when ``t`` is empty)."""
    nz, ny, nx = out.shape[0], out.shape[1], out.shape[2]
    kz = wz.shape[1]
    has_b = t.shape[0] > 0
    for z in nb.prange(nz):
        for y in range(ny):
            for x in range(nx):
                px = aff[0, 0] * x + aff[0, 1] * y + aff[0, 2] * z + aff[0, 3]
                py = aff[1, 0] * x + aff[1, 1] * y + aff[1, 2] * z + aff[1, 3]
                pz = aff[2, 0] * x + aff[2, 1] * y + aff[2, 2] * z + aff[2, 3]
                qx, qy, qz = px, py, pz
                if has_b:
                    for k in range(kz):
                        w = wz[z, k]
                        if w != 0.0:
                            qx += w * t[0, k, y, x]
                            qy += w * t[1, k, y, x]
                            qz += w * t[2, k, y, x]
                out[z, y, x, 0] = rot[0, 0] * qx + rot[0, 1] * qy + rot[0, 2] * qz + trans[0] - px
                out[z, y, x, 1] = rot[1, 0] * qx + rot[1, 1] * qy + rot[1, 2] * qz + trans[1] - py
                out[z, y, x, 2] = rot[2, 0] * qx + rot[2, 1] * qy + rot[2, 2] * qz + trans[2] - pz


def mapping_field(rigid_matrix, grid: Grid, bspline_maps: list | None = None) -> np.ndarray:
    """u(x) = M (x + b(x)) − x (float32 (z, y, x, 3), LPS mm) on every voxel centre of
    ``grid``; ``bspline_maps``: the elastix B-spline stage's transform maps (None: the rigid
    map alone). A B-spline map that is not plain and axis-aligned with ``grid`` is evaluated
    by transformix."""
    m = np.asarray(rigid_matrix, dtype=np.float64)
    t = np.zeros((0, 0, 0, 0))
    wz = np.zeros((grid.shape[0], 0))
    if bspline_maps:
        f = eb.bspline_factors(bspline_maps[-1], grid) if len(bspline_maps) == 1 else None
        if f is None:
            return affine_field_on_grid(m, grid, eb.transform_field(bspline_maps, grid))
        coef, wz, wy, wx = f
        t = np.ascontiguousarray(np.einsum("ckji,yj,xi->ckyx", coef, wy, wx, optimize=True))
    out = np.empty(grid.shape + (3,), dtype=np.float32)
    _compose(t, np.ascontiguousarray(wz), np.ascontiguousarray(m[:3, :3]),
             np.ascontiguousarray(m[:3, 3]), np.ascontiguousarray(grid.affine[:3]), out)
    return out
