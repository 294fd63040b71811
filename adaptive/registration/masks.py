"""Masks derived from the images themselves: the CBCT's valid (reconstructed) region, the
body outline and internal gas. All masks are boolean numpy (z, y, x) arrays on the image grid.

CBCT grey values are unreliable (offset, cupping, scatter), so thresholds are taken relative
to the image's own soft-tissue mode, not as absolute HU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from adaptive.geometry.volume import Volume


def padding_value(array: np.ndarray) -> float | None:
    """The reconstruction's padding value: the single exact value that fills the volume's
    edge outside the field of view, or None when the edge is not dominated by one value."""
    edge = np.concatenate([array[:, 0, :].ravel(), array[:, -1, :].ravel(),
                           array[:, :, 0].ravel(), array[:, :, -1].ravel()])
    vals, counts = np.unique(edge, return_counts=True)
    i = int(np.argmax(counts))
    # a true padding value occupies a large share of the edge *exactly* (noise never does)
    if counts[i] >= 0.2 * edge.size:
        return float(vals[i])
    return None


def valid_region_mask(vol: Volume, erode_mm: float = 0.0) -> np.ndarray:
    """Voxels of a CBCT inside its reconstructed field of view (cylinder × scan length).

    Voxels equal to the padding value and connected to the volume edge within their axial
    slice are outside; exact-padding pockets enclosed by valid data (e.g. clipped air inside
    the patient) stay inside. Eroded by ``erode_mm`` (mm, in-plane and along z) so the FOV
    edge artefacts do not drive the metric.
    """
    a = vol.array
    pad = padding_value(a)
    if pad is None:
        valid = np.isfinite(a)
    else:
        valid = a != pad
        for k in range(a.shape[0]):
            if valid[k].any():
                valid[k] = ndimage.binary_fill_holes(valid[k])
    return erode_mask(valid, vol.grid.spacing[::-1], erode_mm)


def erode_mask(mask: np.ndarray, spacing_zyx, erode_mm: float) -> np.ndarray:
    """``mask`` eroded by an ellipsoid of ``erode_mm`` (mm) radius (at least one voxel per
    axis); the volume's border counts as outside."""
    if erode_mm <= 0 or not mask.any():
        return mask
    r = np.maximum(1, np.round(erode_mm / np.asarray(spacing_zyx, dtype=float)).astype(int))
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    ball = (zz / r[0]) ** 2 + (yy / r[1]) ** 2 + (xx / r[2]) ** 2 <= 1.0
    return ndimage.binary_erosion(mask, structure=ball, border_value=0)


def _smooth(vol: Volume, sigma_mm: float) -> np.ndarray:
    a = vol.array.astype(np.float32)
    if sigma_mm <= 0:
        return a
    return ndimage.gaussian_filter(a, sigma=sigma_mm / vol.grid.spacing[::-1], mode="nearest")


def soft_tissue_mode(values: np.ndarray) -> float:
    """Mode (HU) of the soft-tissue peak of an image's histogram (10-HU bins, smoothed).

    The global mode is taken; if a sizeable share (> 10 %) of the values lies more than
    500 HU above it, that mode was air (large air region in the field of view) and the mode
    of the values above it + 500 HU is returned instead. Works for CBCTs with a global
    offset or cupping since nothing is compared with absolute HU.
    """
    v = values[np.isfinite(values)].astype(np.float32)
    if v.size < 10 or np.ptp(v) <= 0:
        return float(np.median(v)) if v.size else 0.0

    def mode(w):
        lo, hi = np.percentile(w, [0.5, 99.5])
        if hi - lo < 20:
            return float(np.median(w))
        hist, edges = np.histogram(w, bins=np.arange(lo, hi + 10.0, 10.0))
        hist = ndimage.gaussian_filter1d(hist.astype(float), 1.5)
        i = int(np.argmax(hist))
        return float(0.5 * (edges[i] + edges[i + 1]))

    m = mode(v)
    above = v[v > m + 500.0]
    if above.size > 0.1 * v.size:
        m = mode(above)
    return m


def body_and_gas(vol: Volume, valid: np.ndarray, *, smoothing_mm: float = 2.0,
                 body_offset_hu: float = 500.0, gas_offset_hu: float = 550.0,
                 min_gas_volume_mm3: float = 50.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Body outline and internal gas of an image (CBCT or CT), inside ``valid``.

    body: smoothed value > (soft-tissue mode − ``body_offset_hu``), largest connected
    component, holes filled slice by slice (so internal gas is inside the body).
    gas: inside the body, smoothed value < (mode − ``gas_offset_hu``), components smaller
    than ``min_gas_volume_mm3`` dropped. Returns (body, gas, mode_hu).
    """
    s = _smooth(vol, smoothing_mm)
    if not valid.any():
        z = np.zeros(vol.grid.shape, bool)
        return z, z, float("nan")
    mode = soft_tissue_mode(s[valid][:: max(1, valid.sum() // 200000)])
    body = (s > mode - body_offset_hu) & valid
    lab, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum_labels(body, lab, index=np.arange(1, n + 1))
        body = lab == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[0]):
        if body[k].any():
            body[k] = ndimage.binary_fill_holes(body[k])
    body &= valid
    gas = body & (s < mode - gas_offset_hu)
    if gas.any() and min_gas_volume_mm3 > 0:
        lab, n = ndimage.label(gas)
        sizes = ndimage.sum_labels(gas, lab, index=np.arange(1, n + 1)) * vol.grid.voxel_volume_mm3
        keep = np.concatenate([[False], sizes >= min_gas_volume_mm3])
        gas = keep[lab]
    return body, gas, mode
