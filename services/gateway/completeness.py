"""Is a received CT series a complete slice stack? (pure; used by the series tracker)

A series is reported complete only when its slices, projected on the slice normal
n = row × column of Image Orientation (Patient), form a stack that the CT series reader
(:func:`adaptive.dicom.ct_series.read_ct_series`) accepts, with the same tolerances:

* one orientation for all slices (within 1e-4 per direction cosine);
* no two slices at the same position along n (difference < 0.01 mm);
* every step between neighbouring positions equal to the median step within
  max(0.01 mm, 1 %); a larger step is a **gap** (round(step / median) - 1 slices
  missing), a smaller one an extra or irregular slice;
* when the sender states how many images the acquisition has (Images in Acquisition
  (0020,1002) or Number of Slices (0054,0081), see
  :data:`services.gateway.validation.EXPECTED_COUNT_KEYWORDS`), the same value on every
  slice and exactly that many slices. With that count met and uniform steps, the first
  and last positions are (count - 1) median steps apart by construction; without it, a
  stack missing slices only at its ends cannot be told from a complete one, and the
  idle timeout (after the last association from the sender closed) is the only guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adaptive.dicom.ct_series import SPACING_ABS_TOL_MM, SPACING_REL_TOL

ORIENTATION_TOL = 1e-4


@dataclass(frozen=True)
class SliceGeometry:
    """Of one received slice: Image Position (Patient) (LPS mm), Image Orientation
    (Patient) (6 direction cosines), and the expected count its sender stated, if any."""

    position: tuple[float, ...]
    orientation: tuple[float, ...]
    expected_count: int | None = None
    expected_count_source: str = ""


@dataclass(frozen=True)
class StackCheck:
    complete: bool
    reason: str = ""             # "", gap, duplicate_position, irregular_spacing,
    detail: str = ""             # orientation_mismatch, count_mismatch
    slice_spacing_mm: float | None = None
    expected_count: int | None = None
    missing: int | None = None   # slices known to be missing (gap or count), if known


def check_slice_stack(slices: Sequence[SliceGeometry]) -> StackCheck:
    """Check the slices of one series (any order) as described in the module docstring."""
    if not slices:
        return StackCheck(False, "empty", "no slices")
    counts = sorted({(s.expected_count, s.expected_count_source) for s in slices
                     if s.expected_count})
    expected = counts[0][0] if len(counts) == 1 else None
    o0 = np.asarray(slices[0].orientation, dtype=np.float64)
    for s in slices[1:]:
        if not np.allclose(np.asarray(s.orientation), o0, atol=ORIENTATION_TOL):
            return StackCheck(False, "orientation_mismatch",
                              f"Image Orientation {list(s.orientation)} differs from "
                              f"{o0.tolist()}", expected_count=expected)
    normal = np.cross(o0[:3], o0[3:])
    along = np.sort(np.asarray([s.position for s in slices], dtype=np.float64) @ normal)
    spacing = None
    if len(along) > 1:
        d = np.diff(along)
        spacing = float(np.median(d))
        dup = np.nonzero(d < SPACING_ABS_TOL_MM)[0]
        if dup.size:
            return StackCheck(False, "duplicate_position",
                              f"two slices at {along[dup[0]]:.3f} mm along the normal",
                              spacing, expected)
        bad = np.nonzero(np.abs(d - spacing) > max(SPACING_ABS_TOL_MM,
                                                   SPACING_REL_TOL * spacing))[0]
        if bad.size:
            k = int(bad[0])
            if d[k] > spacing:
                missing = round(float(d[k]) / spacing) - 1
                return StackCheck(False, "gap",
                                  f"{d[k]:.3f} mm between slices at {along[k]:.3f} and "
                                  f"{along[k + 1]:.3f} mm along the normal, median step "
                                  f"{spacing:.3f} mm: about {max(missing, 1)} slice(s) "
                                  f"missing", spacing, expected, max(missing, 1))
            return StackCheck(False, "irregular_spacing",
                              f"{d[k]:.3f} mm between slices at {along[k]:.3f} and "
                              f"{along[k + 1]:.3f} mm, median step {spacing:.3f} mm",
                              spacing, expected)
    if len(counts) > 1:
        return StackCheck(False, "count_mismatch",
                          "slices state different expected counts: "
                          + ", ".join(f"{n} ({src})" for n, src in counts), spacing)
    if expected is not None and len(slices) != expected:
        return StackCheck(False, "count_mismatch",
                          f"{len(slices)} slices received from {along[0]:.3f} to "
                          f"{along[-1]:.3f} mm along the normal, {counts[0][1]} says "
                          f"{expected}", spacing, expected,
                          expected - len(slices) if expected > len(slices) else None)
    return StackCheck(True, slice_spacing_mm=spacing, expected_count=expected)
