"""Synthetic CT: the planning CT deformed onto today's anatomy (CBCT grid), HU.

Body outline and internal gas come from the CBCT where the CBCT is reconstructed; where the
CBCT's field of view truncates the patient, the deformed planning CT is kept (its body
outline included). CBCT thresholds are relative to the CBCT's own soft-tissue mode (robust
to offsets and cupping; see :mod:`adaptive.registration.masks`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import ndimage

from adaptive.geometry.volume import Volume, displacement_warp
from adaptive.model.identity import SeriesInfo
from adaptive.registration.masks import body_and_gas, valid_region_mask
from adaptive.registration.settings import load_registration_settings


def synthetic_ct(planning_ct: Volume, cbct: Volume, dvf_lps_mm: np.ndarray, *, config=None,
                 return_masks: bool = False):
    """Planning CT (HU) pulled back through ``dvf_lps_mm`` (CBCT grid, LPS mm, CBCT x ↦
    planning x + u(x)) onto the CBCT grid, with outside-body and gas voxels (from the CBCT,
    inside its field of view) set to air HU, and planning-CT gas that the CBCT shows as
    tissue set to ``tissue_fill_hu``. Returns a float32 :class:`Volume` on
    ``cbct.grid`` (and the (body, gas, fov) masks when ``return_masks``)."""
    s = load_registration_settings(config)
    sc = s.synthetic_ct
    air = sc["air_hu"]
    warped = displacement_warp(planning_ct, dvf_lps_mm, cbct.grid, order=1, fill=air)
    out = warped.array.astype(np.float32)
    fov = valid_region_mask(cbct, erode_mm=0.0)
    body, gas, _ = body_and_gas(cbct, fov, smoothing_mm=sc["smoothing_mm"],
                                body_offset_hu=sc["body_offset_hu"],
                                gas_offset_hu=sc["gas_offset_hu"],
                                min_gas_volume_mm3=sc["min_gas_volume_mm3"])
    # trust the CBCT's outline only away from the FOV edge (smoothing mixes in the padding)
    r = 2.0 * max(sc["smoothing_mm"], float(cbct.grid.spacing.max()))
    dist = ndimage.distance_transform_edt(fov, sampling=cbct.grid.spacing[::-1])
    trusted = fov & (dist > r)
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


def write_synthetic_ct(sct: Volume, cbct_info: SeriesInfo, out_dir: str | Path, *,
                       provenance=None, planning_ct_info: SeriesInfo | None = None) -> SeriesInfo:
    """Write the synthetic CT as a CT series on the CBCT's grid, Frame of Reference, patient
    and study, with a new series UID and a derivation description."""
    from adaptive.dicom.ct_series import write_ct_series

    info = dataclasses.replace(cbct_info, series_instance_uid="", sop_instance_uids=[],
                               modality="CT", series_number=(cbct_info.series_number or 0) + 100,
                               series_description="")
    src = f" from CT {planning_ct_info.series_instance_uid}" if planning_ct_info else ""
    derivation = (f"Synthetic CT: planning CT{src} deformed onto CBCT "
                  f"{cbct_info.series_instance_uid} (elastix B-spline); body and gas from CBCT")
    return write_ct_series(sct, info, out_dir, provenance=provenance,
                           description="Synthetic CT (deformed planning CT)",
                           derivation=derivation[:1024])
