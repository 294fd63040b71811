"""Displacement-field files (MetaImage ``.mha``, via ITK).

A DVF file is a 3-component float32 vector image on the *fixed* (CBCT) grid: origin,
spacing and direction are the CBCT series' (LPS mm), and the components are (x, y, z) =
(L, P, S) displacements in mm, such that the CBCT point x (CBCT Frame of Reference)
corresponds to the planning-CT point x + u(x) (planning Frame of Reference).
In numpy the field is ``(nz, ny, nx, 3)``, matching :class:`~adaptive.geometry.Grid` and
:func:`~adaptive.geometry.displacement_warp`. Written by the registration (its result) and
by the replay builder (ground truth); read by the evaluation, the reports and the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaptive.atomic import atomic_path
from adaptive.errors import ReplayDataError
from adaptive.geometry.volume import Grid


def write_dvf(path: str | Path, dvf: np.ndarray, grid: Grid, *, compress: bool = True,
              quantum_mm: float | None = None) -> Path:
    """Write ``dvf`` (``grid.shape + (3,)``, LPS mm) as a float32 vector ``.mha`` with
    ``grid``'s geometry. Written to a temporary name and renamed (atomic). ``quantum_mm``:
    round every component to a multiple of this first (exact in float32 for a power of 2;
    zeroed low mantissa bits compress well)."""
    import itk  # noqa: PLC0415 - deferred: ITK takes seconds; most importers never touch a DVF

    path = Path(path)
    arr = np.ascontiguousarray(np.asarray(dvf, dtype=np.float32))
    if quantum_mm:
        arr = (np.round(arr / np.float32(quantum_mm)) * np.float32(quantum_mm)).astype(np.float32)
    if arr.shape != tuple(grid.shape) + (3,):
        raise ReplayDataError(f"DVF shape {arr.shape} does not match grid {grid.shape} + (3,) [{path}]")
    if not np.all(np.isfinite(arr)):
        raise ReplayDataError(f"DVF contains non-finite values [{path}]")
    img = itk.image_from_array(arr, is_vector=True)
    img.SetOrigin([float(v) for v in grid.origin])
    img.SetSpacing([float(v) for v in grid.spacing])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(grid.direction, dtype=np.float64)))
    with atomic_path(path) as tmp:
        itk.imwrite(img, str(tmp), compression=compress)
    return path


def read_dvf(path: str | Path) -> tuple[np.ndarray, Grid]:
    """Read a DVF written by :func:`write_dvf` → (float32 array (nz, ny, nx, 3) in LPS mm, Grid)."""
    import itk  # noqa: PLC0415 - deferred: ITK takes seconds; most importers never touch a DVF

    path = Path(path)
    if not path.is_file():
        raise ReplayDataError(f"displacement field not found [{path}]")
    try:
        img = itk.imread(str(path))
    except Exception as e:  # ITK raises RuntimeError with its own message
        raise ReplayDataError(f"cannot read displacement field: {e} [{path}]") from e
    if img.GetImageDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
        raise ReplayDataError(f"displacement field must be a 3-D image with 3 components, got "
                              f"{img.GetImageDimension()}-D with {img.GetNumberOfComponentsPerPixel()} "
                              f"components [{path}]")
    arr = np.asarray(itk.array_from_image(img), dtype=np.float32)
    direction = np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=np.float64)
    grid = Grid(shape=arr.shape[:3], origin=np.asarray(img.GetOrigin(), dtype=np.float64),
                spacing=np.asarray(img.GetSpacing(), dtype=np.float64), direction=direction)
    return arr, grid
