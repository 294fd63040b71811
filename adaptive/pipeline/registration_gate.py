"""The registration stage's safety gate: measurements that need the planning structures
(the target region's residual shift, the part of each planned organ inside the CBCT's field
of view), the verdict of :func:`adaptive.pipeline.safety.registration_gate`, and the record
the orchestrator and the planning stage act on.

Record fields (added to the registration stage's record):

* ``validity``: "deformable" (the result passed: an adapted plan may be offered), "rigid"
  (only the rigid match passed: the outputs were made from it, the scheduled plan's metrics
  rest on it, no adapted plan), "none" (no valid registration: the scheduled plan as
  delivered with the linac's own image guidance, no metrics);
* ``registration_checks``: every named check with its numbers (level rigid / deformable);
  ``registration_failed``, ``registration_reviews``: the names of failed / review checks;
* ``roi_fov``: per planning ROI, its planned volume, the part inside the CBCT field of view
  and whether today's ROI touches the field's edge (for the contour checks).
"""

from __future__ import annotations

import time

from adaptive.geometry.volume import Volume
from adaptive.log import get_logger
from adaptive.model.structures import StructureSet
from adaptive.pipeline.safety import SafetySettings, registration_gate
from adaptive.registration import validity as V
from adaptive.registration.evaluate import dilate_mm
from adaptive.registration.propagate import propagate_mask
from adaptive.registration.register_and_write import GateDecision
from adaptive.registration.review import write_review_images

log = get_logger("adaptive.pipeline.registration_gate")

#: the target region whose residual shift is checked: today's target grown by this (mm)
TARGET_REGION_MARGIN_MM = 20.0


def target_roi_name(plan, structures: StructureSet | None) -> str | None:
    """The plan's prescription target, else the structure set's first PTV/CTV/GTV."""
    rx = getattr(plan, "prescription", None)
    if rx is not None and structures is not None and rx.target_roi_name in structures:
        return rx.target_roi_name
    if structures is None:
        return None
    for kind in ("PTV", "CTV", "GTV"):
        for r in structures.rois:
            if (r.interpreted_type or "").upper() == kind:
                return r.name
    return None


def target_residual(result, cbct: Volume, planning_ct: Volume, structures: StructureSet,
                    target: str) -> dict | None:
    """Residual shift of the result in the target region (today's target +
    ``TARGET_REGION_MARGIN_MM`` inside the field of view) with its measurement uncertainty
    (:func:`adaptive.registration.validity.residual_shift_with_uncertainty`)."""
    pm = structures.mask(target, planning_ct.grid)
    if not pm.any():
        return None
    today = propagate_mask(Volume(pm, planning_ct.grid, "mask"), result.dvf_lps_mm,
                           cbct.grid)
    region = dilate_mm(today, cbct.grid, TARGET_REGION_MARGIN_MM) & result.fixed_mask \
        if today.any() else today
    if region.sum() < 200:
        return None
    smp = V.Samples.of(cbct, region)
    r = V.residual_shift_with_uncertainty(smp, planning_ct, V.planning_edges(planning_ct),
                                          dvf=result.dvf_lps_mm)
    r["name"] = target
    return r


def make_gate(target: str | None, settings: SafetySettings | None = None):
    """The gate :func:`adaptive.registration.register_and_write.register_fraction` calls on its result."""
    s = settings or SafetySettings.load()

    def gate(result, cbct: Volume, planning_ct: Volume, structures) -> GateDecision:
        tr = None
        if target is not None and structures is not None and target in structures:
            tr = target_residual(result, cbct, planning_ct, structures, target)
        result.quality["target_residual"] = tr
        v = registration_gate(result.quality, result.fallback, s, tr)
        rec = v.to_record()
        log.info("registration_gate", validity=v.validity, failed=rec["failed"],
                 reviews=rec["reviews"])
        return GateDecision(v.validity, v.summary(), rec)

    return gate


def gate_record(fr, planning_ct: Volume, structures: StructureSet | None, cbct: Volume,
                target: str | None, review_dir=None) -> dict:
    """The gate's fields for the registration stage's record (see the module docstring),
    from a :class:`~adaptive.registration.register_and_write.FractionRegistration`; with
    ``review_dir``, the review images (:mod:`adaptive.registration.review`) are written
    there and listed under ``review_images``."""
    t0 = time.perf_counter()
    d = fr.decision
    r = fr.result
    out = {"validity": d.mapping if d else "deformable",
           "registration_checks": d.record["checks"] if d else [],
           "registration_failed": d.record["failed"] if d else [],
           "registration_reviews": d.record["reviews"] if d else [],
           "registration_summary": d.record["summary"] if d else "",
           "initial_alignment": r.quality.get("initial_alignment"),
           "setup_correction": r.quality.get("setup_correction")}
    if structures is not None and r.valid_mask is not None:
        # on the registration's (working) grids, as the gate measured
        pgrid = (r.moving_image or planning_ct).grid
        out["roi_fov"] = V.roi_field_of_view(structures, pgrid, r.dvf_lps_mm,
                                             r.fixed_grid, r.valid_mask, det=r.jacobian)
    if review_dir is not None:
        out["review_images"] = [str(p) for p in write_review_images(
            review_dir, cbct, fr.synthetic_ct, fr.structures, target,
            title=f"registration: {out['validity']}", verdict=out["registration_summary"])]
    out["gate_time_s"] = round(time.perf_counter() - t0 + fr.timings_s.get("gate", 0.0), 3)
    return out
