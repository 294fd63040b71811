"""Thin layer over itk-elastix: image conversion, running a parameter map, reading transforms.

Threads: the ITK global default thread count is set explicitly with
``itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads`` (passing ``number_of_threads=`` to
elastix together with a multi-metric map segfaults in itk-elastix 0.25.4). The threader is
switched from ITK's default (TBB in the wheels) to the *platform* threader, which starts its
threads per parallel section and keeps no pool: that makes it safe to ``fork`` a worker for
the deadline-bounded B-spline stage (a forked TBB pool would deadlock the child).

Everything here works in the LPS mm frame; arrays are numpy (z, y, x) on a
:class:`~adaptive.geometry.volume.Grid`.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

from adaptive.errors import RegistrationError
from adaptive.geometry.volume import Grid

_lock = threading.Lock()
_itk = None
_threads_set: int | None = None


def itk_module(threads: int = 2):
    """Import itk (once), set the platform threader and the global thread count."""
    global _itk, _threads_set
    with _lock:
        if _itk is None:
            os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(threads))
            import itk  # noqa: PLC0415 - deferred: ITK takes seconds; imported once, on first use

            enums = itk.MultiThreaderBaseEnums
            itk.MultiThreaderBase.SetGlobalDefaultThreader(enums.Threader_Platform)
            _itk = itk
        # the count in force, read back rather than remembered: anything else in a
        # long-lived process (a Dask worker's set-up, a library, a test) may have set ITK's
        # global default since, and a registration run on another count sums its metric
        # in another order (results drift by up to ~0.1 mm; see registration.core)
        if (_threads_set != threads
                or int(_itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()) != threads):
            # maximum first: the default is clamped to the current maximum
            mx = max(int(threads), int(_itk.MultiThreaderBase.GetGlobalMaximumNumberOfThreads()))
            _itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(mx)
            _itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
            _threads_set = threads
        return _itk


def default_thread_count() -> int | None:
    """ITK's global default thread count in this process, None when itk is not loaded yet
    (a record of the compute environment must not pay the ~15 s import)."""
    with _lock:
        if _itk is None:
            return None
        return int(_itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads())


def preload(threads: int = 2) -> None:
    """Import itk and resolve its lazily loaded elastix/transform modules (one-time ~10 s)."""
    itk = itk_module(threads)
    for name in ("ElastixRegistrationMethod", "ParameterObject", "TransformixFilter",
                 "Euler3DTransform", "image_from_array"):
        getattr(itk, name)


def to_itk(array: np.ndarray, grid: Grid, pixel=np.float32):
    """numpy (z, y, x) array on ``grid`` → itk.Image with the same LPS geometry."""
    itk = itk_module(_threads_set or 2)
    img = itk.image_from_array(np.ascontiguousarray(array, dtype=pixel))
    img.SetOrigin([float(v) for v in grid.origin])
    img.SetSpacing([float(v) for v in grid.spacing])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(grid.direction, dtype=np.float64)))
    return img


def parameter_object(maps: list[dict[str, list[str]]]):
    itk = itk_module(_threads_set or 2)
    po = itk.ParameterObject.New()
    for m in maps:
        po.AddParameterMap({k: list(v) for k, v in m.items()})
    return po


def parameter_maps(po) -> list[dict[str, list[str]]]:
    """itk ParameterObject → list of plain dicts (picklable)."""
    return [{k: list(v) for k, v in dict(po.GetParameterMap(i)).items()}
            for i in range(po.GetNumberOfParameterMaps())]


def run_elastix(fixed: np.ndarray, fixed_grid: Grid, moving: np.ndarray, moving_grid: Grid,
                pmap: dict[str, list[str]], fixed_mask: np.ndarray | None = None
                ) -> list[dict[str, list[str]]]:
    """Register ``moving`` to ``fixed`` with one elastix parameter map.

    Returns the resulting transform parameter map(s) as plain dicts. The transform maps
    fixed LPS points to moving LPS points (elastix convention). ``fixed_mask`` (bool/uint8,
    fixed grid) restricts the metric samples; elastix requires 8-bit masks.
    """
    itk = itk_module(_threads_set or 2)
    fimg = to_itk(fixed, fixed_grid)
    mimg = to_itk(moving, moving_grid)
    reg = itk.ElastixRegistrationMethod[type(fimg), type(mimg)].New()
    reg.SetFixedImage(fimg)
    reg.SetMovingImage(mimg)
    if fixed_mask is not None:
        reg.SetFixedMask(to_itk(fixed_mask.astype(np.uint8), fixed_grid, pixel=np.uint8))
    reg.SetParameterObject(parameter_object([pmap]))
    reg.SetLogToConsole(False)
    reg.SetLogToFile(False)
    with tempfile.TemporaryDirectory(prefix="adaptive_elx_") as tmp:
        reg.SetOutputDirectory(tmp)
        try:
            reg.UpdateLargestPossibleRegion()
        except RuntimeError as e:  # elastix raises itk exceptions as RuntimeError
            msg = str(e).strip().splitlines()
            tail = " | ".join(ln.strip() for ln in msg[-6:] if ln.strip())
            raise RegistrationError(f"elastix failed ({pmap.get('Transform', ['?'])[0]}): "
                                    f"{tail}") from e
    return parameter_maps(reg.GetTransformParameterObject())


def euler_to_matrix(tmap: dict[str, list[str]]) -> np.ndarray:
    """elastix EulerTransform parameter map → 4×4 homogeneous matrix (fixed LPS → moving LPS).

    Uses ITK's own Euler3DTransform so the rotation order (ComputeZYX) and the centre of
    rotation follow exactly the semantics elastix used.
    """
    if tmap.get("Transform", [""])[0] != "EulerTransform":
        raise RegistrationError(f"expected an EulerTransform map, got {tmap.get('Transform')}")
    itk = itk_module(_threads_set or 2)
    params = [float(v) for v in tmap["TransformParameters"]]
    center = [float(v) for v in tmap["CenterOfRotationPoint"]]
    t = itk.Euler3DTransform[itk.D].New()
    t.SetComputeZYX(tmap.get("ComputeZYX", ["false"])[0] == "true")
    t.SetCenter(center)
    p = t.GetParameters()
    for i, v in enumerate(params):
        p[i] = v
    t.SetParameters(p)
    m = np.eye(4)
    m[:3, :3] = np.array(t.GetMatrix())
    m[:3, 3] = np.array(t.GetOffset())
    return m


def transform_field(tmaps: list[dict[str, list[str]]], fixed_grid: Grid) -> np.ndarray:
    """Displacement field (nz, ny, nx, 3) float32, LPS mm, of the transform in ``tmaps`` on
    ``fixed_grid``: fixed point x ↦ x + u(x) in the moving frame (transformix)."""
    itk = itk_module(_threads_set or 2)
    maps = []
    for tmap in tmaps:
        m = {k: list(v) for k, v in tmap.items()}
        m["Size"] = [str(s) for s in fixed_grid.size_ijk]
        m["Spacing"] = [repr(float(s)) for s in fixed_grid.spacing]
        m["Origin"] = [repr(float(s)) for s in fixed_grid.origin]
        m["Direction"] = [repr(float(v)) for v in fixed_grid.direction.T.reshape(-1)]
        m["Index"] = ["0", "0", "0"]
        maps.append(m)
    ref = to_itk(np.zeros(fixed_grid.shape, np.float32), fixed_grid)
    tf = itk.TransformixFilter[type(ref)].New()
    tf.SetMovingImage(ref)
    tf.SetTransformParameterObject(parameter_object(maps))
    tf.SetComputeDeformationField(True)
    tf.SetLogToConsole(False)
    tf.SetLogToFile(False)
    with tempfile.TemporaryDirectory(prefix="adaptive_tfx_") as tmp:
        tf.SetOutputDirectory(tmp)
        try:
            tf.UpdateLargestPossibleRegion()
        except RuntimeError as e:
            raise RegistrationError(f"transformix failed: {str(e).strip()[-400:]}") from e
        field = itk.array_from_image(tf.GetOutputDeformationField())
    field = np.asarray(field, dtype=np.float32)
    if field.shape != fixed_grid.shape + (3,):
        raise RegistrationError(f"transformix field shape {field.shape} != "
                                f"{fixed_grid.shape + (3,)}")
    return field


def _bspline3(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel."""
    a = np.abs(t)
    out = np.zeros_like(a)
    m1 = a < 1
    m2 = (a >= 1) & (a < 2)
    out[m1] = (4 - 6 * a[m1] ** 2 + 3 * a[m1] ** 3) / 6
    out[m2] = (2 - a[m2]) ** 3 / 6
    return out


def bspline_factors(tmap: dict[str, list[str]], fixed_grid: Grid
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The separable form of an elastix cubic ``BSplineTransform`` on ``fixed_grid``:
    (coefficients (3, Kz, Ky, Kx), weights (nz, Kz), (ny, Ky), (nx, Kx)) such that the
    displacement is ``u[z, y, x, c] = Σ coef[c, k, j, i] wz[z, k] wy[y, j] wx[x, i]``; None
    when the map is not a plain 3-D cubic B-spline whose grid axes are aligned with the fixed
    grid's axes."""
    if tmap.get("Transform", [""])[0] != "BSplineTransform":
        return None
    if tmap.get("BSplineTransformSplineOrder", ["3"])[0] != "3":
        return None
    if tmap.get("UseCyclicTransform", ["false"])[0] == "true":
        return None
    size = [int(v) for v in tmap["GridSize"]]
    g_origin = np.array([float(v) for v in tmap["GridOrigin"]])
    g_spacing = np.array([float(v) for v in tmap["GridSpacing"]])
    g_dir = np.array([float(v) for v in tmap.get("GridDirection", ["1", "0", "0", "0", "1", "0", "0", "0", "1"])]
                     ).reshape(3, 3)  # elastix writes the direction matrix row by row
    if not np.allclose(g_dir, fixed_grid.direction, atol=1e-6):
        return None
    coef = np.array([float(v) for v in tmap["TransformParameters"]])
    n = int(np.prod(size))
    if coef.size != 3 * n:
        return None
    coef = coef.reshape(3, size[2], size[1], size[0])  # component, k, j, i (x fastest)
    # continuous control-point index of every fixed voxel along each (aligned) axis
    weights = []
    for a in range(3):
        idx = np.arange(fixed_grid.size_ijk[a], dtype=np.float64)
        # position along axis a relative to the grid origin, in the shared direction frame
        off = (fixed_grid.direction.T @ (fixed_grid.origin - g_origin))[a]
        c = (off + idx * fixed_grid.spacing[a]) / g_spacing[a]
        w = _bspline3(c[:, None] - np.arange(size[a])[None, :])
        # ITK/elastix: a point whose 4-point support leaves the control grid is not moved
        start = np.floor(c) - 1
        w[(start < 0) | (start + 3 > size[a] - 1)] = 0.0
        weights.append(w)  # (n_voxels_a, n_control_a)
    wx, wy, wz = weights
    return coef, wz, wy, wx


def bspline_field(tmap: dict[str, list[str]], fixed_grid: Grid) -> np.ndarray | None:
    """Displacement field of an elastix cubic ``BSplineTransform`` map evaluated directly
    (separable tensor product of cubic B-spline weights, :func:`bspline_factors`),
    (nz, ny, nx, 3) float32 LPS mm.

    Exact for the elastix transform (checked against transformix in the tests); returns None
    when the map is not a plain 3-D cubic B-spline whose grid axes are aligned with the fixed
    grid's axes (caller falls back to :func:`transform_field`).
    """
    f = bspline_factors(tmap, fixed_grid)
    if f is None:
        return None
    coef, wz, wy, wx = f
    # contract x and y once, then z slab by slab (bounded memory on a 512 x 512 CBCT)
    t = np.einsum("ckji,yj,xi->ckyx", coef, wy, wx, optimize=True)
    nz, ny, nx = fixed_grid.shape
    out = np.empty((nz, ny, nx, 3), dtype=np.float32)
    step = max(1, 1_000_000 // max(1, ny * nx))
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        out[z0:z1] = np.einsum("ckyx,zk->zyxc", t, wz[z0:z1], optimize=True)
    return out
