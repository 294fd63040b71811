"""Ground-truth displacement fields (MetaImage ``.mha``, via ITK) and truth records.

A DVF file is a 3-component float32 vector image on the *fixed* (CBCT) grid: origin,
spacing and direction are the CBCT series' (LPS mm), and the components are (x, y, z) =
(L, P, S) displacements in mm, such that the CBCT point x (CBCT Frame of Reference)
corresponds to the planning-CT point x + u(x) (planning Frame of Reference).
In numpy the field is ``(nz, ny, nx, 3)``, matching :class:`~adaptive.geometry.Grid` and
:func:`~adaptive.geometry.displacement_warp`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adaptive.errors import ReplayDataError
from adaptive.geometry.volume import Grid

#: the replay truth fields are stored rounded to this (mm): ≤ 0.0005 mm from the computed
#: field, 1/5000 of a voxel, and compressed to ~60 % of the size (the repository carries them)
TRUTH_QUANTUM_MM = 1.0 / 1024.0


def write_dvf(path: str | Path, dvf: np.ndarray, grid: Grid, *, compress: bool = True,
              quantum_mm: float | None = None) -> Path:
    """Write ``dvf`` (``grid.shape + (3,)``, LPS mm) as a float32 vector ``.mha`` with
    ``grid``'s geometry. Written to a temporary name and renamed (atomic). ``quantum_mm``:
    round every component to a multiple of this first (exact in float32 for a power of 2;
    zeroed low mantissa bits compress well)."""
    import itk

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    itk.imwrite(img, str(tmp), compression=compress)
    tmp.replace(path)
    return path


def read_dvf(path: str | Path) -> tuple[np.ndarray, Grid]:
    """Read a DVF written by :func:`write_dvf` → (float32 array (nz, ny, nx, 3) in LPS mm, Grid)."""
    import itk

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


def write_truth_json(path: str | Path, record: dict) -> Path:
    """Write a truth record (``truth.json``) with sorted keys, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_truth_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ReplayDataError(f"truth record not found [{path}]") from e
    except json.JSONDecodeError as e:
        raise ReplayDataError(f"truth record is not valid JSON: {e} [{path}]") from e
