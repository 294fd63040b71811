"""An analytic upper-abdomen phantom (liver target) with simulated daily CBCTs and their truth.

A second anatomy beside the pelvis, so that registration choices and safety thresholds can be
checked on a body site they were not calibrated on (and used as "a CBCT of another body
site" against a pelvis plan). Phantom frame: mm, axes along LPS, origin at the vertebral
body's centre at the level of the lesion; ``AbdomenAnatomy.origin_lps_mm`` places it in the
planning CT's Frame of Reference.

=====================  ========  ==============================================
tissue                 HU        shape
=====================  ========  ==============================================
soft tissue / muscle   40        body: superellipse cylinder ≈ 33 × 23 cm
subcutaneous fat       -100      12-20 mm shell
visceral fat           -90       ellipsoid around the bowel
liver                  60        large ellipsoid, right side (patient right = -x)
lesion (GTV)           30        sphere in the liver, hypodense
spleen                 50        ellipsoid, left posterior
kidneys                30        two ellipsoids beside the spine
aorta                  45        tube left-anterior of the spine
stomach                25 / gas  ellipsoid, left anterior, gas cap (-900) anteriorly
vertebrae              250/1000  vertebral bodies every 32 mm (discs 40 HU), cortex 2 mm
ribs                   900       elliptic bands every 26 mm, superior half of the volume
=====================  ========  ==============================================

ROIs: BODY, LIVER, GTV, PTV (GTV + ``ptv_margin_mm``), KIDNEY_L, KIDNEY_R, SPINAL_CANAL.

Daily anatomy (:class:`AbdomenVariation`): a rigid setup error plus a respiratory-like shift
of the liver, lesion, kidneys and spleen (superior-inferior, smooth fall-off), so a CBCT point
``x`` images the planning point ``Phi(iso + t + R (x - c))`` (``c``: the isocenter's CBCT-frame
coordinates, the imaging system's convention) with ``Phi(q) = q + w(q) d``; the truth is
``u(x) = Phi(...) - x`` on the CBCT grid, like the pelvis case's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from adaptive.geometry.volume import Grid, Volume, displacement_warp
from adaptive.phantoms import shapes as S
from adaptive.phantoms.cbct import CbctDegradation, CbctGeometry, SimulatedFraction, degrade
from adaptive.phantoms.phantom import Phantom, RoiSpec, expand_mask

ABDOMEN_ROIS = [
    RoiSpec("BODY", "EXTERNAL", (0, 255, 0)),
    RoiSpec("LIVER", "ORGAN", (150, 75, 0)),
    RoiSpec("KIDNEY_L", "ORGAN", (255, 255, 0)),
    RoiSpec("KIDNEY_R", "ORGAN", (200, 200, 0)),
    RoiSpec("SPINAL_CANAL", "ORGAN", (0, 200, 255)),
    RoiSpec("GTV", "GTV", (255, 0, 255)),
    RoiSpec("PTV", "PTV", (255, 0, 0)),
]

HU = {"air": -1000.0, "soft": 40.0, "fat": -100.0, "visceral_fat": -90.0, "liver": 60.0,
      "lesion": 30.0, "spleen": 50.0, "kidney": 30.0, "aorta": 45.0, "stomach": 25.0,
      "gas": -900.0, "cortical": 1000.0, "cancellous": 250.0, "disc": 40.0, "rib": 900.0,
      "csf": 15.0}


@dataclass(frozen=True)
class AbdomenAnatomy:
    """Parameters of the abdomen phantom (phantom frame, mm)."""

    origin_lps_mm: tuple[float, float, float] = (-5.0, 80.0, -150.0)
    body_semi_lr_mm: float = 165.0
    body_semi_ap_mm: float = 115.0
    body_center_y_mm: float = -60.0
    fat_mm: float = 16.0
    liver_center_mm: tuple[float, float, float] = (-65.0, -20.0, 25.0)
    liver_semi_mm: tuple[float, float, float] = (85.0, 75.0, 80.0)
    lesion_center_mm: tuple[float, float, float] = (-60.0, -30.0, 10.0)
    lesion_radius_mm: float = 20.0
    kidney_x_mm: float = 62.0
    kidney_semi_mm: tuple[float, float, float] = (28.0, 22.0, 52.0)
    ptv_margin_mm: float = 5.0

    @classmethod
    def sample(cls, seed: int, **overrides) -> AbdomenAnatomy:
        """A seeded variant (sizes ±8 %, lesion position ±12 mm)."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xAB])).uniform
        b = cls()
        lc = tuple(float(v + rng(-12, 12)) for v in b.lesion_center_mm)
        kw = {"body_semi_lr_mm": b.body_semi_lr_mm * rng(0.92, 1.08),
              "body_semi_ap_mm": b.body_semi_ap_mm * rng(0.92, 1.08),
              "fat_mm": rng(12.0, 20.0),
              "liver_semi_mm": tuple(float(a * rng(0.92, 1.08)) for a in b.liver_semi_mm),
              "lesion_center_mm": lc, "lesion_radius_mm": rng(15.0, 24.0),
              "kidney_x_mm": rng(56.0, 68.0)}
        return dataclasses.replace(b, **{**kw, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _evaluate(a: AbdomenAnatomy, pts_lps: np.ndarray, voxel_mm: float, gas: bool = True
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    p = (np.asarray(pts_lps, dtype=np.float64) - np.asarray(a.origin_lps_mm)).astype(np.float32)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    body = S.superellipse_z(p, (0.0, a.body_center_y_mm), a.body_semi_lr_mm,
                            a.body_semi_ap_mm, 2.4)
    liver = S.ellipsoid(p, a.liver_center_mm, a.liver_semi_mm)
    lesion = S.sphere(p, a.lesion_center_mm, a.lesion_radius_mm)
    spleen = S.ellipsoid(p, (90.0, 10.0, 40.0), (30.0, 40.0, 55.0))
    kid_l = S.ellipsoid(p, (a.kidney_x_mm, 25.0, -25.0), a.kidney_semi_mm)
    kid_r = S.ellipsoid(p, (-a.kidney_x_mm, 25.0, -35.0), a.kidney_semi_mm)
    aorta = np.hypot(x - 15.0, y + 36.0) - 12.0
    stomach = S.ellipsoid(p, (55.0, -45.0, 55.0), (45.0, 35.0, 45.0))
    gas_cap = np.maximum(stomach, y + 65.0)
    canal = np.hypot(x, y - 30.0) - 8.0
    # vertebral bodies (r 22 mm) every 32 mm separated by 6 mm discs, posterior arch
    zz = np.mod(z + 16.0, 32.0) - 16.0
    vb = np.maximum(np.hypot(x, y) - 22.0, np.abs(zz) - 13.0)
    arch = np.maximum(np.maximum(np.abs(np.hypot(x, y - 30.0) - 14.0) - 5.0, 28.0 - y),
                      np.abs(zz) - 11.0)
    spinous = np.maximum(np.maximum(np.abs(x) - 5.0, np.abs(y - 44.0) - 10.0), np.abs(zz) - 10.0)
    spine = np.minimum(np.minimum(vb, arch), spinous)
    disc = np.maximum(np.hypot(x, y) - 22.0, 3.0 - np.abs(zz))
    # ribs: elliptic bands (8 mm thick, 10 mm high) every 26 mm above z = -30
    rib_ring = np.abs(((x / (a.body_semi_lr_mm - 22.0)) ** 2 + ((y - a.body_center_y_mm)
                                                              / (a.body_semi_ap_mm - 20.0)) ** 2)
                      ** 0.5 - 1.0) * 140.0 - 4.0
    rz = np.mod(z + 13.0, 26.0) - 13.0
    ribs = np.maximum.reduce([rib_ring, np.abs(rz) - 5.0, -30.0 - z, y + 0.3 * a.body_semi_ap_mm])
    def cov(sd):
        return S.coverage(sd, voxel_mm)
    hu = np.full(p.shape[:-1], HU["air"], dtype=np.float32)

    def paint(value, sd):
        nonlocal hu
        hu += cov(sd) * (value - hu)

    paint(HU["soft"], body)
    paint(HU["fat"], np.maximum(body, -body - a.fat_mm))
    paint(HU["visceral_fat"], S.ellipsoid(p, (20.0, -40.0, -40.0), (90.0, 55.0, 70.0)))
    paint(HU["kidney"], kid_l)
    paint(HU["kidney"], kid_r)
    paint(HU["spleen"], spleen)
    paint(HU["stomach"], stomach)
    if gas:
        paint(HU["gas"], gas_cap)
    paint(HU["liver"], liver)
    paint(HU["lesion"], np.maximum(lesion, liver))
    paint(HU["aorta"], aorta)
    paint(HU["cortical"], spine)
    paint(HU["cancellous"], spine + 2.0)
    paint(HU["disc"], disc)
    paint(HU["csf"], canal)
    paint(HU["rib"], ribs)
    in_body = body <= 0
    masks = {"BODY": in_body, "LIVER": in_body & (liver <= 0), "KIDNEY_L": kid_l <= 0,
             "KIDNEY_R": kid_r <= 0, "SPINAL_CANAL": canal <= 0,
             "GTV": (lesion <= 0) & (liver <= 0)}
    return hu, masks


def render_abdomen(a: AbdomenAnatomy, points_lps: np.ndarray, voxel_mm: float,
                   chunk: int = 400_000) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Noise-free HU and organ masks at planning-frame LPS points (..., 3), mm."""
    pts = np.asarray(points_lps, dtype=np.float64)
    shape, flat = pts.shape[:-1], pts.reshape(-1, 3)
    hu = np.empty(flat.shape[0], np.float32)
    masks: dict[str, np.ndarray] = {}
    for s in range(0, flat.shape[0], chunk):
        h, m = _evaluate(a, flat[s:s + chunk], voxel_mm)
        hu[s:s + chunk] = h
        for n, v in m.items():
            masks.setdefault(n, np.empty(flat.shape[0], bool))[s:s + chunk] = v
    return hu.reshape(shape), {n: v.reshape(shape) for n, v in masks.items()}


def abdomen_phantom(seed: int = 0, spacing_mm=(3.0, 3.0, 3.0), size_ijk=(130, 100, 70), *,
                    anatomy: AbdomenAnatomy | None = None, noise_hu: float = 12.0) -> Phantom:
    """Render the abdomen phantom on an axial grid centred on the lesion laterally/SI and on
    the body AP (HU float32 with seeded Gaussian noise, masks of :data:`ABDOMEN_ROIS`)."""
    a = anatomy or AbdomenAnatomy.sample(seed)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    n = np.asarray(size_ijk)
    centre = np.asarray(a.origin_lps_mm) + np.array([0.0, a.body_center_y_mm, 0.0])
    grid = Grid(shape=(int(n[2]), int(n[1]), int(n[0])),
                origin=np.round((centre - 0.5 * (n - 1) * sp) * 2.0) / 2.0, spacing=sp)
    hu, masks = render_abdomen(a, grid.voxel_centers_lps(), float(np.mean(sp)))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xAB, 0xC7]))
    if noise_hu > 0:
        hu += rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    masks["PTV"] = expand_mask(masks["GTV"], grid, a.ptv_margin_mm) & masks["BODY"]
    ordered = {r.name: masks[r.name] for r in ABDOMEN_ROIS}
    return Phantom(ct=Volume(hu, grid, "HU"), masks=ordered, rois=list(ABDOMEN_ROIS),
                   name="abdomen", meta={"anatomy": "upper_abdomen", "seed": int(seed),
                                         "noise_hu": float(noise_hu),
                                         "parameters": a.to_dict()})


@dataclass(frozen=True)
class AbdomenVariation:
    """A day: rigid setup error (mm, deg; Rz·Ry·Rx) and a respiratory shift of the liver and
    its neighbours (``breathing_mm`` along LPS, full inside the liver, smoothly 0 beyond 1.8
    liver radii)."""

    setup_translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    setup_rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    breathing_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def sample(cls, seed: int, fraction: int) -> AbdomenVariation:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xAB1, int(fraction)]))
        def n(sd, lim):
            return float(np.clip(rng.normal(0, sd), -lim, lim))
        return cls((n(3, 8), n(3, 8), n(3, 8)), (n(1, 2.5), n(1, 2.5), n(1, 2.5)),
                   (n(1, 3), n(2, 5), float(rng.uniform(-10, 10))))

    @property
    def setup_rotation_matrix(self) -> np.ndarray:
        return S.rotation_matrix(*self.setup_rotation_deg)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


def breathing_map(a: AbdomenAnatomy, v: AbdomenVariation, q: np.ndarray) -> np.ndarray:
    """Phi(q) = q + w(q) d: daily anatomy point → planning point (planning LPS mm)."""
    p = q - np.asarray(a.origin_lps_mm)
    rho = S.normalised_radius(p.reshape(-1, 3), a.liver_center_mm,
                              np.asarray(a.liver_semi_mm) + 15.0).reshape(q.shape[:-1])
    w = S.smooth_window(rho, 1.0, 1.8)
    return q - w[..., None] * np.asarray(v.breathing_mm, dtype=np.float64)


def simulate_abdomen_fraction(planning: Phantom, anatomy: AbdomenAnatomy, isocenter_lps_mm,
                              fraction: int, seed: int, *,
                              variation: AbdomenVariation | None = None,
                              geometry: CbctGeometry | None = None,
                              degradation: CbctDegradation | None = None,
                              frame_origin_lps_mm=(0.0, 0.0, 0.0)) -> SimulatedFraction:
    """A daily CBCT of the abdomen phantom with its truth (see the module docstring;
    ``frame_origin_lps_mm`` as in :func:`adaptive.phantoms.cbct.simulate_fraction`)."""
    geometry = geometry or CbctGeometry()
    variation = variation or AbdomenVariation.sample(seed, fraction)
    degradation = degradation or CbctDegradation.sample(seed + 0xAB, fraction)
    c = np.asarray(frame_origin_lps_mm, dtype=np.float64).reshape(3)
    grid = geometry.grid(c)
    x = grid.voxel_centers_lps()
    iso = np.asarray(isocenter_lps_mm, dtype=np.float64).reshape(3)
    q = iso + np.asarray(variation.setup_translation_mm) + (x - c) @ variation.setup_rotation_matrix.T
    dvf = (breathing_map(anatomy, variation, q) - x).astype(np.float32)
    clean, _ = render_abdomen(anatomy, x + dvf, float(np.mean(grid.spacing)))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xAB, 0xC0, int(fraction)]))
    hu = degrade(clean, grid, geometry, degradation, rng, axis_lps_mm=c)
    truth = {n: displacement_warp(Volume(m, planning.grid, "mask"), dvf, grid, order=1).array
             for n, m in planning.masks.items()}
    return SimulatedFraction(fraction=fraction, cbct=Volume(hu, grid, "HU"), dvf=dvf,
                             truth_masks=truth, clean_hu=clean, variation=variation,
                             degradation=degradation, geometry=geometry, isocenter_lps_mm=iso,
                             seed=int(seed), frame_origin_lps_mm=c)
