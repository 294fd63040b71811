"""Contour propagation: planning structures pulled back through the DVF onto the CBCT grid."""

from __future__ import annotations

import numpy as np

from adaptive.geometry.volume import Grid, Volume
from adaptive.geometry.warp import field_bounds, pull_back
from adaptive.model.identity import SeriesInfo
from adaptive.model.structures import Roi, StructureSet


def propagate_mask(mask: Volume, dvf_lps_mm: np.ndarray, fixed_grid: Grid,
                   threshold: float = 0.5, dvf_bounds: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask on ``fixed_grid``: the planning mask (bool Volume on its own grid) sampled
    at x + u(x) with trilinear interpolation of the 0/1 mask, then ``>= threshold``.
    ``dvf_bounds``: the field's per-axis (min, max) when the caller has it (see
    :func:`adaptive.geometry.warp.pull_back`)."""
    m = Volume(np.asarray(mask.array).astype(bool, copy=False), mask.grid, "mask")
    return pull_back(m, fixed_grid, dvf_lps_mm=dvf_lps_mm, dvf_bounds=dvf_bounds) >= threshold


def propagate_structures(structures: StructureSet, dvf_lps_mm: np.ndarray, fixed_grid: Grid,
                         cbct_info: SeriesInfo, *, planning_grid: Grid | None = None,
                         threshold: float = 0.5, names: list[str] | None = None) -> StructureSet:
    """Every ROI (or those in ``names``) of ``structures`` on the CBCT grid, as a
    :class:`StructureSet` referencing the CBCT series (ROIs carry masks; contours are made
    from them when written with :func:`adaptive.dicom.rtstruct.write_rtstruct`).

    ROIs without a mask are rasterised on ``planning_grid`` (required then) first.
    """
    rois = []
    bounds = field_bounds(dvf_lps_mm)
    for roi in structures.rois:
        if names is not None and roi.name not in names:
            continue
        if roi.mask is not None:
            src = Volume(roi.mask.array.astype(bool), roi.mask.grid, "mask")
        elif planning_grid is not None and roi.contours:
            src = Volume(structures.mask(roi.name, planning_grid), planning_grid, "mask")
        else:
            continue
        out = propagate_mask(src, dvf_lps_mm, fixed_grid, threshold, bounds)
        if not out.any():
            continue
        rois.append(Roi(number=roi.number, name=roi.name, color=roi.color,
                        interpreted_type=roi.interpreted_type, contours=[],
                        mask=Volume(out, fixed_grid, "mask"), generation_algorithm="AUTOMATIC"))
    return StructureSet(rois=rois, referenced_series=cbct_info,
                        label=(structures.label or "adaptive")[:16],
                        name="Propagated (deformable registration)")
