"""Image grids and volumes in DICOM patient coordinates (LPS, mm).

Conventions (the same as ITK, so grids map 1:1 onto ``itk.Image``):

* The voxel array is stored in numpy order ``(z, y, x)`` = ``(slice k, row j, column i)``.
* ``origin``, ``spacing`` and the columns of ``direction`` are given in index order
  ``(i, j, k)`` = (column, row, slice).
* ``origin`` is the LPS position (mm) of the *centre* of voxel ``(i, j, k) = (0, 0, 0)``.
* ``direction[:, a]`` is the unit LPS vector along index axis ``a``; for a DICOM
  series this is ``[row direction cosine, column direction cosine, slice normal]``
  (DICOM Image Orientation (Patient) gives the first two).

So the LPS position of continuous index ``(i, j, k)`` is::

    p = origin + direction @ (spacing * [i, j, k])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from adaptive.errors import GeometryError


def _as3(v, name: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.shape != (3,):
        raise GeometryError(f"{name} must have 3 components, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise GeometryError(f"{name} must be finite, got {a}")
    return a


def apply_affine(points, m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``points @ m.T + b`` for points (..., 3) (float64), one output column at a time: a
    matrix product with an inner dimension of 3 goes through BLAS with large temporaries and
    costs ~10x more on volumes of millions of points (seconds on a 512 x 512 CBCT)."""
    p = np.asarray(points, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(3)
    out = np.empty(p.shape[:-1] + (3,), dtype=np.float64)
    for r in range(3):
        col = out[..., r]
        np.multiply(p[..., 0], m[r, 0], out=col)
        col += p[..., 1] * m[r, 1]
        col += p[..., 2] * m[r, 2]
        col += b[r]
    return out


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular 3-D sampling grid in patient LPS coordinates.

    Attributes
    ----------
    shape: ``(nz, ny, nx)`` numpy array shape of data on this grid.
    origin: LPS position (mm) of the centre of voxel (i, j, k) = (0, 0, 0).
    spacing: voxel size (mm) along (i, j, k).
    direction: 3×3 matrix whose columns are the LPS unit vectors of the i, j, k axes.
    """

    shape: tuple[int, int, int]
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise GeometryError(f"grid shape must be 3 positive ints (nz, ny, nx), got {self.shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "origin", _as3(self.origin, "origin"))
        sp = _as3(self.spacing, "spacing")
        if np.any(sp <= 0):
            raise GeometryError(f"spacing must be positive, got {sp}")
        object.__setattr__(self, "spacing", sp)
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise GeometryError(f"direction cosines are not orthonormal: {d.tolist()}")
        object.__setattr__(self, "direction", d)

    # --- basic properties -------------------------------------------------------
    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along (i, j, k) = (nx, ny, nz)."""
        nz, ny, nx = self.shape
        return (nx, ny, nz)

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous (i, j, k, 1) to LPS (x, y, z, 1) in mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction * self.spacing[None, :]
        a[:3, 3] = self.origin
        return a

    def same_as(self, other: Grid, tol_mm: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.origin, other.origin, atol=tol_mm)
            and np.allclose(self.spacing, other.spacing, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-5)
        )

    # --- transforms -------------------------------------------------------------
    def ijk_to_lps(self, ijk) -> np.ndarray:
        """Continuous index (..., 3) in (i, j, k) order → LPS mm (..., 3)."""
        return apply_affine(ijk, self.direction * self.spacing[None, :], self.origin)

    def lps_to_ijk(self, lps) -> np.ndarray:
        """LPS mm (..., 3) → continuous index (..., 3) in (i, j, k) order."""
        minv = np.linalg.inv(self.direction * self.spacing[None, :])
        return apply_affine(lps, minv, -minv @ self.origin)

    def axis_coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Index coordinates along i, j, k (0..n-1), as float arrays."""
        nx, ny, nz = self.size_ijk
        return (np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64),
                np.arange(nz, dtype=np.float64))

    def voxel_centers_lps(self, dtype=np.float64) -> np.ndarray:
        """LPS mm of every voxel centre, shape (nz, ny, nx, 3)."""
        nz, ny, nx = self.shape
        m = self.direction * self.spacing[None, :]  # column a: LPS step of index axis a
        # separable: origin + i m[:, 0] + j m[:, 1] + k m[:, 2], built by broadcasting
        out = np.empty((nz, ny, nx, 3), dtype=np.float64)
        out[...] = self.origin
        out += np.arange(nx, dtype=np.float64)[None, None, :, None] * m[:, 0]
        out += np.arange(ny, dtype=np.float64)[None, :, None, None] * m[:, 1]
        out += np.arange(nz, dtype=np.float64)[:, None, None, None] * m[:, 2]
        return out if dtype == np.float64 else out.astype(dtype)

    def bounds_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box (min, max) of the voxel centres, mm."""
        nx, ny, nz = self.size_ijk
        corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)],
                           dtype=np.float64)
        pts = self.ijk_to_lps(corners)
        return pts.min(axis=0), pts.max(axis=0)

    def center_lps(self) -> np.ndarray:
        nx, ny, nz = self.size_ijk
        return self.ijk_to_lps(np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]))

    def contains_lps(self, lps, margin_vox: float = 0.5) -> np.ndarray:
        """Whether LPS points (..., 3) fall inside the grid (within ``margin_vox`` of the edge centres)."""
        ijk = self.lps_to_ijk(lps)
        hi = np.array(self.size_ijk, dtype=np.float64) - 1 + margin_vox
        return np.all((ijk >= -margin_vox) & (ijk <= hi), axis=-1)

    def with_spacing(self, spacing_mm) -> Grid:
        """A grid covering the same extent with a different voxel size (same origin/direction)."""
        sp = _as3(spacing_mm, "spacing")
        extent = (np.array(self.size_ijk) - 1) * self.spacing
        n = np.maximum(1, np.floor(extent / sp + 1e-6).astype(int) + 1)
        return Grid(shape=(n[2], n[1], n[0]), origin=self.origin, spacing=sp, direction=self.direction)

    def crop_to_box(self, lo_lps, hi_lps) -> tuple[Grid, tuple[slice, slice, slice]]:
        """Sub-grid (and numpy slices) covering the LPS box [lo, hi] (clipped to this grid)."""
        corners = np.array([[x, y, z] for x in (lo_lps[0], hi_lps[0]) for y in (lo_lps[1], hi_lps[1])
                            for z in (lo_lps[2], hi_lps[2])])
        ijk = self.lps_to_ijk(corners)
        lo = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, np.array(self.size_ijk) - 1)
        hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int), 0, np.array(self.size_ijk) - 1)
        if np.any(hi < lo):
            raise GeometryError("crop box does not overlap the grid")
        origin = self.ijk_to_lps(lo.astype(np.float64))
        n = hi - lo + 1
        sl = (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1))
        return Grid(shape=(n[2], n[1], n[0]), origin=origin, spacing=self.spacing,
                    direction=self.direction), sl

    def to_dict(self) -> dict:
        return {"shape_zyx": list(self.shape), "origin_lps_mm": self.origin.tolist(),
                "spacing_ijk_mm": self.spacing.tolist(), "direction": self.direction.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        """Inverse of :meth:`to_dict`."""
        return cls(shape=tuple(d["shape_zyx"]), origin=d["origin_lps_mm"],
                   spacing=d["spacing_ijk_mm"], direction=d["direction"])


@dataclass(eq=False)
class Volume:
    """Voxel data on a :class:`Grid`. ``array`` has numpy shape ``grid.shape`` = (nz, ny, nx).

    ``units`` documents what the values are ("HU", "Gy", "relative electron density",
    "mask", "mm" ...).
    """

    array: np.ndarray
    grid: Grid
    units: str = ""

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.shape != self.grid.shape:
            raise GeometryError(f"array shape {self.array.shape} != grid shape {self.grid.shape}")

    @classmethod
    def zeros(cls, grid: Grid, dtype=np.float32, units: str = "") -> Volume:
        return cls(np.zeros(grid.shape, dtype=dtype), grid, units)

    def copy(self) -> Volume:
        return Volume(self.array.copy(), self.grid, self.units)

    def with_array(self, array: np.ndarray, units: str | None = None) -> Volume:
        return Volume(array, self.grid, self.units if units is None else units)

    def sample_lps(self, points_lps, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """Interpolate at LPS points (..., 3); ``order`` 1 = trilinear, 0 = nearest."""
        return sample_array(self.array, self.grid, points_lps, order=order, fill=fill)

    def resample_to(self, grid: Grid, order: int = 1, fill: float = 0.0, dtype=None) -> Volume:
        """This volume resampled onto ``grid`` (trilinear ``order=1`` or nearest ``order=0``)."""
        out = resample_array(self.array, self.grid, grid, order=order, fill=fill)
        if dtype is not None:
            out = out.astype(dtype)
        elif self.array.dtype == bool:
            out = out > 0.5
        else:
            out = out.astype(self.array.dtype if order == 0 else np.result_type(self.array.dtype, np.float32))
        return Volume(out, grid, self.units)

    def crop_to_box(self, lo_lps, hi_lps) -> Volume:
        g, sl = self.grid.crop_to_box(lo_lps, hi_lps)
        return Volume(self.array[sl].copy(), g, self.units)


def sample_array(array: np.ndarray, grid: Grid, points_lps, order: int = 1,
                 fill: float = 0.0) -> np.ndarray:
    """Interpolate ``array`` (on ``grid``) at LPS points (..., 3)."""
    pts = np.asarray(points_lps, dtype=np.float64)
    flat = pts.reshape(-1, 3)
    ijk = grid.lps_to_ijk(flat)
    coords = ijk[:, ::-1].T  # numpy order (k, j, i)
    src = array.astype(np.float32) if array.dtype == bool else array
    vals = ndimage.map_coordinates(src, coords, order=order, mode="constant", cval=fill,
                                   prefilter=False)
    return vals.reshape(pts.shape[:-1])


def resample_array(array: np.ndarray, src: Grid, dst: Grid, order: int = 1,
                   fill: float = 0.0) -> np.ndarray:
    """Resample ``array`` from ``src`` onto ``dst`` (linear or nearest), slice by slice in memory."""
    if src.same_as(dst):
        return array.copy()
    # index-to-index affine: dst ijk -> src ijk
    m = np.linalg.inv(src.affine) @ dst.affine
    # ndimage.affine_transform works in numpy (k, j, i) order.
    perm = np.array([2, 1, 0])
    mat = m[:3, :3][np.ix_(perm, perm)]
    off = m[:3, 3][perm]
    srcarr = array.astype(np.float32) if array.dtype == bool else array
    return ndimage.affine_transform(srcarr, mat, offset=off, output_shape=dst.shape, order=order,
                                    mode="constant", cval=fill, prefilter=False)


def displacement_warp(moving: Volume, dvf_lps_mm: np.ndarray, fixed_grid: Grid, order: int = 1,
                      fill: float = 0.0) -> Volume:
    """Warp ``moving`` onto ``fixed_grid`` with a displacement field.

    ``dvf_lps_mm`` has shape ``fixed_grid.shape + (3,)``: for every fixed-grid voxel centre
    x (LPS mm) the corresponding moving-image point is ``x + u(x)``. The result is
    ``moving(x + u(x))`` on the fixed grid (the pull-back used for synthetic CTs and
    contour propagation).
    """
    if dvf_lps_mm.shape != fixed_grid.shape + (3,):
        raise GeometryError(f"DVF shape {dvf_lps_mm.shape} != {fixed_grid.shape + (3,)}")
    if order == 1:
        from adaptive.geometry.warp import pull_back  # noqa: PLC0415 - deferred: numba

        vals = pull_back(moving, fixed_grid, dvf_lps_mm=dvf_lps_mm, fill=fill)
        if moving.array.dtype != bool:
            vals = vals.astype(np.result_type(moving.array.dtype, np.float32), copy=False)
    else:
        pts = fixed_grid.voxel_centers_lps() + dvf_lps_mm
        vals = moving.sample_lps(pts, order=order, fill=fill)
    if moving.array.dtype == bool:
        vals = vals > 0.5
    return Volume(vals, fixed_grid, moving.units)
