"""Synthetic CT: the planning CT deformed onto today's anatomy (CBCT grid), HU.

Body outline and internal gas come from the CBCT where the CBCT is reconstructed; where the
CBCT's field of view truncates the patient, the deformed planning CT is kept (its body
outline included); beyond the CBCT's grid, :func:`extend_synthetic_ct` completes it with the
rigidly mapped planning CT so that it covers every voxel a dose is computed on. CBCT
thresholds are relative to the CBCT's own soft-tissue mode (robust to offsets and cupping;
see :mod:`adaptive.registration.masks`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import ndimage

from adaptive.dicom.ct_series import completed_series_info, write_ct_series
from adaptive.errors import GeometryError
from adaptive.geometry.volume import Grid, Volume, displacement_warp
from adaptive.geometry.warp import pull_back
from adaptive.model.identity import SeriesInfo, StudyIdentity
from adaptive.registration.masks import body_and_gas, padding_value, valid_region_mask
from adaptive.registration.settings import load_registration_settings
from adaptive.registration.validity import fill_slices
from adaptive.registration.working import block_all, block_factors, block_grid, block_mean


def _upsample(mask: np.ndarray, f: tuple[int, int, int], shape) -> np.ndarray:
    """A working-grid mask back on the native grid (each block's value on its voxels; the
    remainder voxels beyond the last whole block are False)."""
    out = np.zeros(shape, dtype=bool)
    up = mask.repeat(f[0], 0).repeat(f[1], 1).repeat(f[2], 2)
    out[:up.shape[0], :up.shape[1], :up.shape[2]] = up
    return out


def cbct_masks(cbct: Volume, sc: dict, factors=(1, 1, 1)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(body, gas, trusted) of the CBCT on its grid for the synthetic CT (``sc``: the
    ``[synthetic_ct]`` settings): body outline and gas (:func:`body_and_gas`) inside the field
    of view, and the part of the field of view farther than 2 x max(smoothing, voxel) from its
    edge, where the CBCT's outline is trusted (smoothing mixes in the padding near the edge).

    ``factors`` > 1: computed on the CBCT block-averaged by them (the registration's working
    resolution, :mod:`adaptive.registration.working`; the masks come from a CBCT smoothed
    by ``smoothing_mm`` ~ one working voxel anyway) and expanded back to the CBCT's grid."""
    f = tuple(int(v) for v in factors)
    r = 2.0 * max(sc["smoothing_mm"], float(cbct.grid.spacing.max()))
    if f == (1, 1, 1):
        vol, fov = cbct, valid_region_mask(cbct, erode_mm=0.0)
    else:
        pad = padding_value(np.asarray(cbct.array))
        raw = np.isfinite(cbct.array) if pad is None else np.asarray(cbct.array) != pad
        fov = fill_slices(block_all(raw, f))
        arr = block_mean(cbct.array, f)
        arr[~fov] = np.float32(sc["air_hu"] if pad is None else pad)
        vol = Volume(arr, block_grid(cbct.grid, f), cbct.units)
    body, gas, _ = body_and_gas(vol, fov, smoothing_mm=sc["smoothing_mm"],
                                body_offset_hu=sc["body_offset_hu"],
                                gas_offset_hu=sc["gas_offset_hu"],
                                min_gas_volume_mm3=sc["min_gas_volume_mm3"])
    dist = ndimage.distance_transform_edt(fov, sampling=vol.grid.spacing[::-1])
    trusted = fov & (dist > r)
    if f == (1, 1, 1):
        return body, gas, trusted
    shape = cbct.grid.shape
    return _upsample(body, f, shape), _upsample(gas, f, shape), _upsample(trusted, f, shape)


def synthetic_ct(planning_ct: Volume, cbct: Volume, dvf_lps_mm: np.ndarray, *, config=None,
                 return_masks: bool = False, mask_factors=None):
    """Planning CT (HU) pulled back through ``dvf_lps_mm`` (CBCT grid, LPS mm, CBCT x ↦
    planning x + u(x)) onto the CBCT grid, with outside-body and gas voxels (from the CBCT,
    inside its field of view) set to air HU, and planning-CT gas that the CBCT shows as
    tissue set to ``tissue_fill_hu``. Returns a float32 :class:`Volume` on
    ``cbct.grid`` (and the (body, gas, trusted) masks when ``return_masks``).
    ``mask_factors``: block factors of the CBCT masks (:func:`cbct_masks`; default: the
    registration's working resolution, ``working_voxel_mm``)."""
    s = load_registration_settings(config)
    sc = s.synthetic_ct
    air = sc["air_hu"]
    warped = displacement_warp(planning_ct, dvf_lps_mm, cbct.grid, order=1, fill=air)
    out = warped.array.astype(np.float32)
    if mask_factors is None:
        mask_factors = block_factors(cbct.grid.spacing, s.working_voxel_mm)
    body, gas, trusted = cbct_masks(cbct, sc, mask_factors)
    out[trusted & ~body] = air
    # CBCT gas overrides tissue only (lung-like planning values stay as planned)
    planned_low = warped.array < sc["planned_gas_hu"]
    out[gas & ~planned_low] = air
    # gas in the planning CT that today's CBCT shows filled with tissue
    out[trusted & body & ~gas & planned_low] = sc["tissue_fill_hu"]
    vol = Volume(out, cbct.grid, "HU")
    if return_masks:
        return vol, (body, gas, trusted)
    return vol


def extend_synthetic_ct(sct: Volume, planning_ct: Volume, rigid_matrix, *,
                        air_hu: float = -1000.0) -> Volume:
    """The synthetic CT (CBCT grid, CBCT frame) completed with the rigidly mapped planning CT
    wherever the CBCT grid does not reach, on an axis-aligned grid of the synthetic CT's
    spacing covering both (CBCT frame, LPS mm, HU).

    Why: the CBCT's reconstructed volume is narrower than the pelvis (here 270 mm wide for a
    ~360 mm wide patient), so a dose computed on the synthetic CT alone misses the tissue
    the lateral beams cross outside it (measured: scheduled plan PTV D2 69 Gy instead of
    63 Gy, i.e. MU ~5-10 % too low for the real patient). This extended image is the one the
    dose is computed on and the one handed off as the synthetic CT series. ``rigid_matrix``:
    4×4 CBCT LPS → planning LPS. Raises :class:`GeometryError` for an oblique synthetic CT grid.
    """
    m = np.asarray(rigid_matrix, dtype=float)
    inv = np.linalg.inv(m)
    lo_p, hi_p = planning_ct.grid.bounds_lps()
    corners = np.array([[x, y, z] for x in (lo_p[0], hi_p[0]) for y in (lo_p[1], hi_p[1])
                        for z in (lo_p[2], hi_p[2])])
    c = corners @ inv[:3, :3].T + inv[:3, 3]
    lo_s, hi_s = sct.grid.bounds_lps()
    lo, hi = np.minimum(c.min(axis=0), lo_s), np.maximum(c.max(axis=0), hi_s)
    sp = np.asarray(sct.grid.spacing, dtype=float)
    # keep the synthetic CT's voxel lattice (so its voxels are copied, not interpolated)
    if not np.allclose(sct.grid.direction, np.eye(3), atol=1e-6):
        raise GeometryError("synthetic CT grid must be axis-aligned to be extended")
    o = sct.grid.origin - np.ceil((sct.grid.origin - lo) / sp - 1e-6) * sp
    n = np.floor((hi - o) / sp + 1e-6).astype(int) + 1
    grid = Grid(shape=(n[2], n[1], n[0]), origin=o, spacing=sp)
    # the same voxels seen from the planning frame (m is rigid): one affine resampling
    out = pull_back(planning_ct, grid, matrix=m, fill=air_hu)
    off = np.rint((sct.grid.origin - o) / sp).astype(int)  # (i, j, k) offset
    nz, ny, nx = sct.grid.shape
    out[off[2]:off[2] + nz, off[1]:off[1] + ny, off[0]:off[0] + nx] = sct.array
    return Volume(out, grid, "HU")


SYNTHETIC_CT_DESCRIPTION = "Synthetic CT (deformed planning CT)"


def synthetic_ct_series_info(sct: Volume, cbct_info: SeriesInfo, study: StudyIdentity
                             ) -> SeriesInfo:
    """The complete series identity (new series and SOP Instance UIDs, the CBCT's Frame of
    Reference, ``study``) that :func:`write_synthetic_ct` writes ``sct`` with."""
    info = dataclasses.replace(cbct_info, series_instance_uid="", sop_instance_uids=[],
                               modality="CT", series_number=(cbct_info.series_number or 0) + 100,
                               series_description="")
    return completed_series_info(info, study, sct.grid.shape[0], SYNTHETIC_CT_DESCRIPTION)


def write_synthetic_ct(sct: Volume, cbct_info: SeriesInfo, out_dir: str | Path, *,
                       study: StudyIdentity, provenance=None,
                       planning_ct_info: SeriesInfo | None = None,
                       series: SeriesInfo | None = None) -> SeriesInfo:
    """Write the synthetic CT (on its own grid, e.g. :func:`extend_synthetic_ct`'s) as a CT
    series in the CBCT's Frame of Reference and in ``study`` (the session's: the CBCT's), with
    a new series UID and a derivation description. ``series``: its identity, from
    :func:`synthetic_ct_series_info` (default: made here)."""
    info = series if series is not None else synthetic_ct_series_info(sct, cbct_info, study)
    src = f" from CT {planning_ct_info.series_instance_uid}" if planning_ct_info else ""
    derivation = (f"Synthetic CT: planning CT{src} deformed onto CBCT "
                  f"{cbct_info.series_instance_uid} (elastix B-spline); body and gas from CBCT; "
                  f"beyond the CBCT's volume the rigidly mapped planning CT")
    return write_ct_series(sct, info, out_dir, study=study, provenance=provenance,
                           description=SYNTHETIC_CT_DESCRIPTION,
                           derivation=derivation[:1024])
