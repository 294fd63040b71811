"""TG-119-style IMRT test phantoms: C-shape and prostate (planning cases, no fractions).

Built from the geometry described in AAPM TG-119 (Ezzell et al., "IMRT commissioning:
multiple institution planning and dosimetry comparisons", Med. Phys. 36(11), 2009). The
report distributes its own structure sets; we rebuild the structures analytically.

C-shape (``tg119_cshape``)
    From the report: a central avoidance "core" cylinder of radius 1.0 cm; a C-shaped PTV
    around it with outer radius 3.7 cm and inner radius 1.5 cm (a 0.5 cm gap to the core),
    8 cm long; prescription 50 Gy to the PTV in 25 fractions of 2 Gy.
    Our choices: the core is 10 cm long (1 cm beyond each end of the PTV); the C opens
    towards anterior (−y): the annulus minus the band |x| < 1.5 cm (the inner radius) on the
    anterior side of the axis; the body is a homogeneous water (0 HU) elliptical cylinder
    40 cm (LR) × 30 cm (AP), 20 cm long, the C centred in it.

Prostate (``tg119_prostate``)
    From the report (as we read its text; not re-checked against the original here): the
    prostate (CTV) is roughly elliptical, 4.0 (LR) × 2.6 (AP) × 6.5 (SI) cm; PTV = prostate
    + 0.6 cm; the rectum is a cylinder of 1.5 cm diameter abutting the PTV posteriorly with
    about a third of its cross-section inside the PTV; the bladder is an ellipsoid 5.0 × 4.0 ×
    5.0 cm centred on the superior aspect of the prostate, displaced anteriorly; prescription
    75.6 Gy to the PTV in 42 fractions of 1.8 Gy.
    Our choices: rectum centre 2.1 cm posterior of the prostate centre (its anterior 0.55 cm
    chord inside the PTV, ≈ 1/3 of the area), 12 cm long; bladder centre 1.2 cm anterior and
    3.25 cm superior of the prostate centre; water elliptical body 38 × 26 cm, 20 cm long.

Both are homogeneous water (0 HU) in air (−1000 HU), with partial-volume rendering of the body
surface and no noise. Masks are evaluated at voxel centres; ROIs may overlap (as in the
report: PTV with rectum and bladder). The PTV margin uses a Euclidean distance transform.
"""

from __future__ import annotations

import numpy as np

from adaptive.geometry.volume import Grid, Volume
from adaptive.model.plan import Prescription
from adaptive.phantoms import shapes as S
from adaptive.phantoms.phantom import Phantom, RoiSpec, expand_mask

CSHAPE_ROIS = [RoiSpec("BODY", "EXTERNAL", (0, 255, 0)), RoiSpec("CORE", "ORGAN", (0, 128, 255)),
               RoiSpec("PTV", "PTV", (255, 0, 0))]
PROSTATE_ROIS = [RoiSpec("BODY", "EXTERNAL", (0, 255, 0)), RoiSpec("PROSTATE", "CTV", (255, 0, 255)),
                 RoiSpec("PTV", "PTV", (255, 0, 0)), RoiSpec("RECTUM", "ORGAN", (150, 75, 0)),
                 RoiSpec("BLADDER", "ORGAN", (255, 255, 0))]


def _centered_grid(spacing_mm, extent_mm, center_lps) -> Grid:
    sp = np.asarray(spacing_mm, dtype=np.float64)
    n = np.maximum(1, np.round(np.asarray(extent_mm, dtype=np.float64) / sp).astype(int))
    origin = np.asarray(center_lps, dtype=np.float64) - 0.5 * (n - 1) * sp
    return Grid(shape=(int(n[2]), int(n[1]), int(n[0])), origin=origin, spacing=sp)


def _body(p, semi_lr, semi_ap, length):
    d = S.superellipse_z(p, (0.0, 0.0), semi_lr, semi_ap, 2.0)
    return np.maximum(d, S.slab(p, 2, -0.5 * length, 0.5 * length))


def _finish(grid: Grid, p: np.ndarray, body_sd: np.ndarray, masks: dict, rois, name: str,
            prescription: Prescription, meta: dict) -> Phantom:
    voxel = float(np.mean(grid.spacing))
    hu = (-1000.0 + 1000.0 * S.coverage(body_sd, voxel)).astype(np.float32)
    ordered = {r.name: masks[r.name] for r in rois}
    return Phantom(ct=Volume(hu, grid, "HU"), masks=ordered, rois=list(rois), name=name,
                   prescription=prescription, meta=meta)


def tg119_cshape(spacing_mm=(3.0, 3.0, 3.0), center_lps_mm=(0.0, 0.0, 0.0)) -> Phantom:
    """TG-119 C-shape phantom on an axial grid of ``spacing_mm`` centred on ``center_lps_mm``
    (LPS mm; the C's axis is the z axis through that point)."""
    body_lr, body_ap, length = 200.0, 150.0, 200.0
    grid = _centered_grid(spacing_mm, (2 * body_lr + 20, 2 * body_ap + 20, length), center_lps_mm)
    p = grid.voxel_centers_lps() - np.asarray(center_lps_mm, dtype=np.float64)
    body = _body(p, body_lr, body_ap, length + 2 * float(grid.spacing[2]))
    r = np.hypot(p[..., 0], p[..., 1])
    core = (r <= 10.0) & (np.abs(p[..., 2]) <= 50.0)
    ring = (r <= 37.0) & (r >= 15.0) & (np.abs(p[..., 2]) <= 40.0)
    opening = (p[..., 1] < 0.0) & (np.abs(p[..., 0]) < 15.0)
    ptv = ring & ~opening
    in_body = body <= 0
    masks = {"BODY": in_body, "CORE": core & in_body, "PTV": ptv & in_body}
    meta = {"anatomy": "tg119_cshape", "core_radius_mm": 10.0, "core_length_mm": 100.0,
            "ptv_inner_radius_mm": 15.0, "ptv_outer_radius_mm": 37.0, "ptv_length_mm": 80.0,
            "opening": "anterior (-y), |x| < 15 mm", "body_semi_axes_mm": [body_lr, body_ap],
            "body_length_mm": length, "center_lps_mm": list(map(float, center_lps_mm))}
    return _finish(grid, p, body, masks, CSHAPE_ROIS, "tg119_cshape",
                   Prescription(2.0, 25, "PTV"), meta)


def tg119_prostate(spacing_mm=(3.0, 3.0, 3.0), center_lps_mm=(0.0, 0.0, 0.0),
                   ptv_margin_mm: float = 6.0) -> Phantom:
    """TG-119 prostate phantom on an axial grid of ``spacing_mm``; the prostate centre is at
    ``center_lps_mm`` (LPS mm)."""
    body_lr, body_ap, length = 190.0, 130.0, 200.0
    grid = _centered_grid(spacing_mm, (2 * body_lr + 20, 2 * body_ap + 20, length), center_lps_mm)
    p = grid.voxel_centers_lps() - np.asarray(center_lps_mm, dtype=np.float64)
    body = _body(p, body_lr, body_ap, length + 2 * float(grid.spacing[2]))
    in_body = body <= 0
    prostate = (S.ellipsoid(p, (0.0, 0.0, 0.0), (20.0, 13.0, 32.5)) <= 0) & in_body
    ptv = expand_mask(prostate, grid, ptv_margin_mm) & in_body
    rect_y = 13.0 + ptv_margin_mm + 7.5 - 5.5  # = 21 mm for the 6 mm margin
    rectum = (S.cylinder_z(p, (0.0, rect_y), 7.5, -60.0, 60.0) <= 0) & in_body
    # Bladder (5 x 4 x 5 cm) superior-anterior, its base resting on the PTV's superior pole:
    # ~8 % of the bladder inside the PTV, like the rectum (~9 %). (A centre level with the
    # prostate's pole, z = 32.5 mm, put 25 % of the bladder inside the PTV: then bladder
    # D10 <= 75 Gy and PTV D95 >= 75.6 Gy cannot both hold, whereas TG-119's participants met
    # the bladder goals, so that placement contradicted the report.)
    bladder_c = (0.0, -12.0, 45.0)
    bladder = (S.ellipsoid(p, bladder_c, (25.0, 20.0, 25.0)) <= 0) & in_body
    masks = {"BODY": in_body, "PROSTATE": prostate, "PTV": ptv, "RECTUM": rectum, "BLADDER": bladder}
    meta = {"anatomy": "tg119_prostate", "prostate_diameters_mm": [40.0, 26.0, 65.0],
            "ptv_margin_mm": ptv_margin_mm, "rectum_diameter_mm": 15.0, "rectum_center_y_mm": rect_y,
            "rectum_length_mm": 120.0, "bladder_diameters_mm": [50.0, 40.0, 50.0],
            "bladder_center_mm": list(bladder_c), "body_semi_axes_mm": [body_lr, body_ap],
            "body_length_mm": length, "center_lps_mm": list(map(float, center_lps_mm))}
    return _finish(grid, p, body, masks, PROSTATE_ROIS, "tg119_prostate",
                   Prescription(1.8, 42, "PTV"), meta)
