"""A rendered phantom: CT (HU) volume plus boolean ROI masks on the same grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from adaptive.geometry.volume import Grid, Volume
from adaptive.model.identity import SeriesInfo
from adaptive.model.plan import Prescription
from adaptive.model.structures import Roi, StructureSet


@dataclass(frozen=True)
class RoiSpec:
    """Name, DICOM RT ROI Interpreted Type and display colour (RGB) of a phantom ROI."""

    name: str
    interpreted_type: str
    color: tuple[int, int, int]


@dataclass
class Phantom:
    """A phantom rendered on a grid.

    ``ct``: HU volume (float32, water = 0, air = -1000) on ``ct.grid`` (LPS mm).
    ``masks``: ROI name → boolean array of shape ``ct.grid.shape`` (numpy (z, y, x)).
    ``rois``: the ROI specs in display/number order (keys of ``masks``).
    ``prescription``: the case's prescription (None for anatomy without one).
    ``meta``: JSON-serialisable description of the geometry/parameters used.
    """

    ct: Volume
    masks: dict[str, np.ndarray]
    rois: list[RoiSpec]
    name: str = ""
    prescription: Prescription | None = None
    meta: dict = field(default_factory=dict)

    @property
    def grid(self) -> Grid:
        return self.ct.grid

    def volume_cc(self, name: str) -> float:
        """Volume of ROI ``name`` in cm³ (voxel count × voxel volume)."""
        return float(self.masks[name].sum()) * self.grid.voxel_volume_mm3 / 1000.0

    def structure_set(self, series: SeriesInfo, *, label: str = "PHANTOM",
                      name: str = "") -> StructureSet:
        """A :class:`StructureSet` on ``series`` whose ROIs carry the masks (contours are
        derived by the RT Struct writer)."""
        rois = []
        for number, spec in enumerate(self.rois, start=1):
            rois.append(Roi(number=number, name=spec.name, color=spec.color,
                            interpreted_type=spec.interpreted_type,
                            mask=Volume(self.masks[spec.name].astype(bool), self.grid, "mask"),
                            generation_algorithm="AUTOMATIC"))
        return StructureSet(rois=rois, referenced_series=series, label=label, name=name or label)


def expand_mask(mask: np.ndarray, grid: Grid, margin_mm: float) -> np.ndarray:
    """Isotropic expansion of ``mask`` by ``margin_mm`` (voxel centres within the margin of
    the mask, Euclidean distance in mm using the grid spacing)."""

    if margin_mm <= 0:
        return mask.copy()
    if not mask.any():
        return mask.copy()
    sampling = grid.spacing[::-1]  # (z, y, x) order
    dist = ndimage.distance_transform_edt(~mask, sampling=sampling)
    return dist <= margin_mm + 1e-6
