"""The registration's working resolution: block averages of the input images.

What a registration can resolve is set by its own pyramid, not by the input's voxels: the
B-spline stage's finest control grid is ``FinalGridSpacingInPhysicalUnits`` (25 mm), its
finest pyramid level smooths by about a voxel, and its metric is estimated from a few
thousand random samples. A 512 × 512 CBCT at 0.9 mm (23 M voxels) gives elastix, the
candidate search and the quality measurements 4-9 times the voxels of a ~2 mm image without
resolving anything the 25 mm grid can follow, at 10-30 times the cost (measured: 114 s for
register() on the clinical-size replay case at native resolution). So the images are
block-averaged by integer factors to at most ``working_voxel_mm`` per axis (an axis already at
or above it is left alone, so the replay-size cases run unchanged), everything in
:func:`adaptive.registration.core.register` runs on them, and the result - a rigid matrix and
an analytic B-spline transform - is evaluated again on the native CBCT grid for the outputs
(synthetic CT, propagated contours).

Block averaging (not point sampling) keeps each working voxel's value the mean of the tissue
it covers, as a coarser scan would; the CBCT's field of view is reduced with "every native
voxel of the block valid" so no working voxel mixes in reconstruction padding.
"""

from __future__ import annotations

import numpy as np

from adaptive.geometry.volume import Grid, Volume


def block_factors(spacing_ijk, working_voxel_mm: float | None) -> tuple[int, int, int]:
    """Integer block sizes (numpy (z, y, x) order) that bring each axis to at most
    ``working_voxel_mm`` (1 where the axis is already at or above it; all 1 for None/0)."""
    if not working_voxel_mm or working_voxel_mm <= 0:
        return (1, 1, 1)
    sp = np.asarray(spacing_ijk, dtype=np.float64)[::-1]
    return tuple(max(1, int(np.floor(working_voxel_mm / s + 1e-6))) for s in sp)


def block_grid(grid: Grid, f: tuple[int, int, int]) -> Grid:
    """The grid of the ``f``-block means of ``grid`` (whole blocks only; a block's centre is
    its voxel centre)."""
    fijk = np.asarray(f[::-1], dtype=np.float64)
    shape = tuple(n // k for n, k in zip(grid.shape, f))
    return Grid(shape=shape, origin=grid.ijk_to_lps(0.5 * (fijk - 1.0)),
                spacing=grid.spacing * fijk, direction=grid.direction)


def _blocks(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    nz, ny, nx = (n // k * k for n, k in zip(a.shape, f))
    return a[:nz, :ny, :nx].reshape(nz // f[0], f[0], ny // f[1], f[1], nx // f[2], f[2])


def block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``f`` blocks (numpy (z, y, x)), float32; the remainder voxels are dropped."""
    if f == (1, 1, 1):
        return np.asarray(a, dtype=np.float32)
    out = np.zeros(tuple(n // k for n, k in zip(a.shape, f)), dtype=np.float32)
    b = _blocks(a, f)
    for dz in range(f[0]):  # sum in float32 without a float copy of the whole input
        for dy in range(f[1]):
            for dx in range(f[2]):
                out += b[:, dz, :, dy, :, dx]
    out *= np.float32(1.0 / (f[0] * f[1] * f[2]))
    return out


def block_all(mask: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """True where every voxel of the block is True."""
    if f == (1, 1, 1):
        return np.asarray(mask, dtype=bool)
    return _blocks(np.asarray(mask, dtype=bool), f).all(axis=(1, 3, 5))


def working_volume(vol: Volume, working_voxel_mm: float | None,
                   valid: np.ndarray | None = None, outside: float = -1000.0
                   ) -> tuple[Volume, np.ndarray | None, tuple[int, int, int]]:
    """``vol`` block-averaged to the working resolution (see the module docstring), the
    reduced ``valid`` mask (every native voxel of the block valid) and the factors; working
    voxels outside ``valid`` are set to ``outside``. Factors (1, 1, 1): ``vol`` itself."""
    f = block_factors(vol.grid.spacing, working_voxel_mm)
    if f == (1, 1, 1):
        return vol, valid, f
    arr = block_mean(vol.array, f)
    v = None
    if valid is not None:
        v = block_all(valid, f)
        arr[~v] = np.float32(outside)
    return Volume(arr, block_grid(vol.grid, f), vol.units), v, f
