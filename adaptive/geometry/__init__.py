"""Grids, volumes and resampling in DICOM patient coordinates (LPS, mm)."""

from adaptive.geometry.volume import Grid, Volume, displacement_warp, resample_array, sample_array

__all__ = ["Grid", "Volume", "displacement_warp", "resample_array", "sample_array"]
