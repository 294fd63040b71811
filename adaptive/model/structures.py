"""Regions of interest: planar contours (DICOM RT Structure Set) and masks on a grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adaptive.geometry.rasterize import rasterize_contours
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.identity import SeriesInfo


@dataclass
class Roi:
    """One ROI.

    ``contours``: closed planar polygons, each an (n, 3) float array of LPS points (mm),
    as in DICOM ROI Contour Sequence (CLOSED_PLANAR). Holes are polygons nested inside
    another polygon on the same plane (even-odd rule, as most TPS export them).
    ``mask``: optional boolean :class:`Volume` (the authoritative representation when
    the ROI was made on a grid, e.g. by a phantom or by propagation).
    """

    number: int
    name: str
    color: tuple[int, int, int] = (255, 0, 0)
    interpreted_type: str = "ORGAN"  # PTV, CTV, GTV, ORGAN, EXTERNAL, AVOIDANCE, ...
    contours: list[np.ndarray] = field(default_factory=list)
    mask: Volume | None = None
    generation_algorithm: str = "MANUAL"  # AUTOMATIC, SEMIAUTOMATIC, MANUAL


@dataclass
class StructureSet:
    """A set of ROIs on one image series (Frame of Reference)."""

    rois: list[Roi]
    referenced_series: SeriesInfo
    label: str = "adaptive"
    sop_instance_uid: str = ""
    name: str = ""

    def names(self) -> list[str]:
        return [r.name for r in self.rois]

    def get(self, name: str) -> Roi:
        for r in self.rois:
            if r.name.lower() == name.lower():
                return r
        raise KeyError(f"no ROI named {name!r} (have {self.names()})")

    def __contains__(self, name: str) -> bool:
        return any(r.name.lower() == name.lower() for r in self.rois)

    def mask(self, name: str, grid: Grid) -> np.ndarray:
        """Boolean mask (numpy (z, y, x)) of ROI ``name`` on ``grid``.

        Uses the ROI's mask when it lives on the same grid, otherwise rasterises its
        contours (see :mod:`adaptive.dicom.rtstruct`).
        """
        roi = self.get(name)
        if roi.mask is not None and roi.mask.grid.same_as(grid):
            return roi.mask.array.astype(bool)

        if roi.contours:
            return rasterize_contours(roi.contours, grid)
        if roi.mask is not None:
            return roi.mask.resample_to(grid, order=1).array.astype(bool)
        return np.zeros(grid.shape, dtype=bool)
