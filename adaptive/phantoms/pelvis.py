"""A deterministic analytic male pelvis phantom with realistic CT numbers.

The anatomy is a set of analytic shapes (approximate signed distance functions, see
:mod:`adaptive.phantoms.shapes`) in the *phantom frame*: mm, axes along LPS
(x = patient Left, y = Posterior, z = Superior), origin midway between the femoral head
centres. ``PelvisAnatomy.origin_lps_mm`` places that origin in the planning CT's Frame of
Reference, so the same anatomy can be rendered on any grid, and under any deformation (by
evaluating it at mapped points, see :func:`render_hu` / :func:`render_masks`).

Tissues and CT numbers (HU; water 0, air -1000), roughly as in adult pelvic CT:

=====================  ========  ==========================================
tissue                 HU        shape
=====================  ========  ==========================================
muscle / soft tissue   40        body: superellipse cylinder ≈ 38 × 24 cm
subcutaneous fat       -100      15-25 mm shell under the skin
pelvic (perivesical,   -90       ellipsoid cavity above the pelvic floor
mesorectal) fat
urine (bladder)        10        ellipsoid, 3 mm wall at 40 HU
rectum                 40 / 25   tube along a curved path, 4 mm wall, content 25 HU,
                                 optional gas pockets (-900 HU) in the lumen
prostate               45        tilted ellipsoid (~30 cm³), 3 mm periprostatic
                                 layer at -40 HU
seminal vesicles       30        two ellipsoids postero-superior to the prostate
cortical bone          1100      2 mm (pelvis) / 3-5 mm (femur) rims
cancellous bone        220       inside the cortex; femoral shaft marrow 30 HU
=====================  ========  ==========================================

Pelvic bones: iliac wings (a bowl-shaped ellipsoidal shell, open anteriorly), acetabular
bodies (cups around the femoral heads), ischia, superior and inferior pubic rami, pubic
bodies with a 4 mm symphysis gap, and a curved sacrum/coccyx plate. Femora: heads
(r = 24 mm), necks, greater trochanters, shafts.

ROIs (boolean masks at voxel centres, mutually exclusive organs):
BODY (EXTERNAL), BLADDER, RECTUM, SEMINAL_VESICLES, FEMUR_L, FEMUR_R (ORGAN; femur =
head + neck + trochanter + proximal shaft down to 70 mm below the head centre),
PROSTATE (CTV), PTV (= PROSTATE expanded isotropically by ``ptv_margin_mm`` with a
Euclidean distance transform, clipped to BODY).

Everything random (organ sizes, body size, planning rectal gas, CT noise) comes from
``numpy.random.default_rng(seed)``: the same seed gives identical arrays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from adaptive.geometry.volume import Grid, Volume
from adaptive.phantoms import shapes as S
from adaptive.phantoms.phantom import Phantom, RoiSpec, expand_mask

#: CT numbers (HU) of the tissues.
HU = {
    "air": -1000.0,
    "muscle": 40.0,
    "fat": -100.0,
    "pelvic_fat": -90.0,
    "urine": 10.0,
    "bladder_wall": 40.0,
    "rectal_wall": 40.0,
    "rectal_content": 25.0,
    "gas": -900.0,
    "prostate": 45.0,
    "periprostatic": -40.0,
    "seminal_vesicle": 30.0,
    "cortical": 1100.0,
    "cancellous": 220.0,
    "marrow": 30.0,
}

PELVIS_ROIS = [
    RoiSpec("BODY", "EXTERNAL", (0, 255, 0)),
    RoiSpec("BLADDER", "ORGAN", (255, 255, 0)),
    RoiSpec("RECTUM", "ORGAN", (150, 75, 0)),
    RoiSpec("PROSTATE", "CTV", (255, 0, 255)),
    RoiSpec("SEMINAL_VESICLES", "ORGAN", (255, 150, 200)),
    RoiSpec("FEMUR_L", "ORGAN", (0, 200, 255)),
    RoiSpec("FEMUR_R", "ORGAN", (0, 120, 255)),
    RoiSpec("PTV", "PTV", (255, 0, 0)),
]

#: Organ masks computed analytically (PTV is derived on the grid).
ANALYTIC_ROIS = ("BODY", "BLADDER", "RECTUM", "PROSTATE", "SEMINAL_VESICLES", "FEMUR_L", "FEMUR_R")


@dataclass(frozen=True)
class GasPocket:
    """An ellipsoidal gas pocket (phantom frame, mm); only its part inside the rectal lumen
    is gas."""

    center_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"center_mm": list(self.center_mm), "semi_axes_mm": list(self.semi_axes_mm)}


@dataclass(frozen=True)
class PelvisAnatomy:
    """Parameters of the analytic pelvis (phantom frame, mm; see module docstring).

    ``origin_lps_mm``: where the phantom-frame origin lies in the planning CT's LPS frame.
    """

    origin_lps_mm: tuple[float, float, float] = (12.0, 95.0, -410.0)
    body_semi_lr_mm: float = 190.0
    body_semi_ap_mm: float = 120.0
    body_center_y_mm: float = 5.0
    body_exponent: float = 2.6
    fat_thickness_mm: float = 20.0
    bladder_center_mm: tuple[float, float, float] = (0.0, -28.0, 38.0)
    bladder_semi_mm: tuple[float, float, float] = (46.0, 36.0, 36.0)
    bladder_wall_mm: float = 3.0
    prostate_center_mm: tuple[float, float, float] = (0.0, -2.0, -22.0)
    prostate_semi_mm: tuple[float, float, float] = (22.0, 17.0, 19.0)
    prostate_tilt_deg: float = -15.0  # about the L (x) axis
    sv_center_mm: tuple[float, float, float] = (17.0, 9.0, 3.0)  # left one; right mirrored
    sv_semi_mm: tuple[float, float, float] = (18.0, 6.0, 8.0)
    sv_angle_deg: float = 25.0
    rectum_y0_mm: float = 32.0  # centreline y at z = rectum_zc
    rectum_zc_mm: float = -20.0
    rectum_curvature_per_mm: float = 0.0025  # y(z) = y0 + k (z - zc)^2
    rectum_radius_mm: float = 15.0
    rectum_wall_mm: float = 4.0
    rectum_z_range_mm: tuple[float, float] = (-75.0, 60.0)
    femoral_head_x_mm: float = 92.0
    femoral_head_radius_mm: float = 24.0
    ptv_margin_mm: float = 6.0
    gas_pockets: tuple[GasPocket, ...] = ()

    @classmethod
    def sample(cls, seed: int, **overrides) -> PelvisAnatomy:
        """A seeded anatomical variant (organ and body sizes ±5-12 %, optional rectal gas)."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9E1]))
        def u(lo, hi):
            return float(rng.uniform(lo, hi))
        base = cls()
        bs = u(0.9, 1.12)
        ps = u(0.9, 1.1)
        body = u(0.95, 1.05)
        kw = {
            "body_semi_lr_mm": base.body_semi_lr_mm * body,
            "body_semi_ap_mm": base.body_semi_ap_mm * u(0.96, 1.04),
            "fat_thickness_mm": u(15.0, 25.0),
            "bladder_semi_mm": tuple(float(a * bs * u(0.96, 1.04)) for a in base.bladder_semi_mm),
            "prostate_semi_mm": tuple(float(a * ps) for a in base.prostate_semi_mm),
            "prostate_tilt_deg": u(-20.0, -10.0),
            "rectum_radius_mm": u(13.5, 16.0),
        }
        anat = dataclasses.replace(base, **kw)
        if rng.uniform() < 0.35:  # a small planning gas pocket
            anat = dataclasses.replace(anat, gas_pockets=(anat.rectal_gas_pocket(u(-10, 40), 6.0),))
        return dataclasses.replace(anat, **overrides)

    # --- derived geometry --------------------------------------------------------
    def rectum_centerline(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rectal centreline (x, y) in mm at height z (phantom frame)."""
        z = np.asarray(z)
        if not np.issubdtype(z.dtype, np.floating):
            z = z.astype(np.float64)
        y = self.rectum_y0_mm + self.rectum_curvature_per_mm * (z - self.rectum_zc_mm) ** 2
        return np.zeros_like(z), y

    def rectal_gas_pocket(self, z_mm: float, size_mm: float) -> GasPocket:
        """A gas pocket in the anterior (non-dependent, patient supine) part of the lumen at
        height ``z_mm``; ``size_mm`` is its half-width (LR)."""
        _, yc = self.rectum_centerline(np.array(z_mm))
        lumen = self.rectum_radius_mm - self.rectum_wall_mm
        return GasPocket((0.0, float(yc) - 0.35 * lumen, float(z_mm)),
                         (float(size_mm), float(min(0.75 * size_mm, lumen)), float(1.6 * size_mm)))

    @property
    def prostate_rotation(self) -> np.ndarray:
        return S.rotation_matrix(rx_deg=self.prostate_tilt_deg)

    def isocenter_lps_mm(self) -> np.ndarray:
        """Analytic prostate centre in planning LPS (the PTV centroid is used for the plan)."""
        return np.asarray(self.origin_lps_mm) + np.asarray(self.prostate_center_mm)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gas_pockets"] = [g.to_dict() for g in self.gas_pockets]
        return d


# --- the shapes ----------------------------------------------------------------------


def _body_sd(a: PelvisAnatomy, p: np.ndarray) -> np.ndarray:
    z = p[..., 2]
    semi_lr = a.body_semi_lr_mm * (1.0 - 4e-6 * (z - 10.0) ** 2)
    return S.superellipse_z(p, (0.0, a.body_center_y_mm), semi_lr, a.body_semi_ap_mm, a.body_exponent)


def _rectum_sd(a: PelvisAnatomy, p: np.ndarray) -> np.ndarray:
    xc, yc = a.rectum_centerline(p[..., 2])
    d = np.hypot(p[..., 0] - xc, p[..., 1] - yc) - a.rectum_radius_mm
    return np.maximum(d, S.slab(p, 2, *a.rectum_z_range_mm))


def _prostate_sd(a: PelvisAnatomy, p: np.ndarray) -> np.ndarray:
    return S.ellipsoid(p, a.prostate_center_mm, a.prostate_semi_mm, a.prostate_rotation)


def _sv_sd(a: PelvisAnatomy, p: np.ndarray) -> np.ndarray:
    out = None
    for s in (1.0, -1.0):
        c = (s * a.sv_center_mm[0], a.sv_center_mm[1], a.sv_center_mm[2])
        rot = S.rotation_matrix(rx_deg=-20.0, rz_deg=-s * a.sv_angle_deg)
        d = S.ellipsoid(p, c, a.sv_semi_mm, rot)
        out = d if out is None else np.minimum(out, d)
    return out


def _bladder_sd(a: PelvisAnatomy, p: np.ndarray) -> np.ndarray:
    return S.ellipsoid(p, a.bladder_center_mm, a.bladder_semi_mm)


def _femur_sd(a: PelvisAnatomy, p: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray]:
    """(femur solid SDF, shaft SDF) for side +1 (patient left) or -1 (right)."""
    hx = side * a.femoral_head_x_mm
    head_c = (hx, -5.0, 0.0)
    head = S.sphere(p, head_c, a.femoral_head_radius_mm)
    neck = S.capsule(p, head_c, (side * (a.femoral_head_x_mm + 36.0), 0.0, -35.0), 14.0)
    troch = S.ellipsoid(p, (side * (a.femoral_head_x_mm + 46.0), 8.0, -40.0), (18.0, 22.0, 25.0))
    shaft = S.capsule(p, (side * (a.femoral_head_x_mm + 38.0), 3.0, -45.0),
                      (side * (a.femoral_head_x_mm + 26.0), 5.0, -400.0), 15.0)
    return np.minimum(np.minimum(head, neck), np.minimum(troch, shaft)), shaft


def _pelvic_bone_sd(a: PelvisAnatomy, p: np.ndarray) -> np.ndarray:
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    parts = []
    for s in (1.0, -1.0):
        hx = s * a.femoral_head_x_mm
        acet = np.maximum(S.ellipsoid(p, (hx - s * 4.0, -2.0, 8.0), (30.0, 38.0, 42.0)),
                          -S.sphere(p, (hx, -5.0, 0.0), a.femoral_head_radius_mm + 2.5))
        bowl = S.ellipsoid(p, (0.0, 15.0, 140.0), (150.0, 70.0, 150.0))
        ilium = np.maximum.reduce([S.shell(bowl, 12.0), S.slab(p, 2, 15.0, 130.0),
                                   40.0 - s * x, -45.0 - y])
        ischium = S.ellipsoid(p, (s * 62.0, 35.0, -45.0), (16.0, 26.0, 30.0))
        sup_ramus = S.capsule(p, (s * 80.0, -25.0, -5.0), (s * 14.0, -60.0, -28.0), 10.0)
        inf_ramus = S.capsule(p, (s * 14.0, -58.0, -50.0), (s * 55.0, 30.0, -68.0), 8.0)
        pubis = S.ellipsoid(p, (s * 11.0, -62.0, -38.0), (9.0, 13.0, 20.0))
        parts += [acet, ilium, ischium, sup_ramus, inf_ramus, pubis]
    # sacrum + coccyx: a plate curved in the sagittal plane (concave anteriorly)
    ys = 92.0 - 0.0025 * (z - 40.0) ** 2
    t = 12.0 + 18.0 * np.clip((z + 45.0) / 165.0, 0.0, 1.0)
    w = 12.0 + 40.0 * np.clip((z + 50.0) / 180.0, 0.0, 1.0)
    sacrum = np.maximum.reduce([np.abs(y - ys) - 0.5 * t, np.abs(x) - w, S.slab(p, 2, -50.0, 130.0)])
    parts.append(sacrum)
    return np.minimum.reduce(parts)


def _pelvic_fat_sd(a: PelvisAnatomy, p: np.ndarray) -> np.ndarray:
    return np.maximum(S.ellipsoid(p, (0.0, 20.0, 25.0), (62.0, 55.0, 75.0)), -12.0 - p[..., 2])


def _gas_sd(a: PelvisAnatomy, p: np.ndarray, pockets, lumen_sd: np.ndarray) -> np.ndarray | None:
    if not pockets:
        return None
    g = np.minimum.reduce([S.ellipsoid(p, pk.center_mm, pk.semi_axes_mm) for pk in pockets]) \
        if len(pockets) > 1 else S.ellipsoid(p, pockets[0].center_mm, pockets[0].semi_axes_mm)
    return np.maximum(g, lumen_sd)


def _evaluate(a: PelvisAnatomy, pts_lps: np.ndarray, voxel_mm: float, gas_pockets,
              want_hu: bool, want_masks: bool) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """HU (noise-free, partial-volume rendered) and organ masks at LPS points (N, 3)."""
    # phantom-frame coordinates (|p| < 1 m): float32 is ample (< 0.1 µm) and twice as fast
    p = (np.asarray(pts_lps, dtype=np.float64) - np.asarray(a.origin_lps_mm)).astype(np.float32)
    body = _body_sd(a, p)
    bladder = _bladder_sd(a, p)
    rectum = _rectum_sd(a, p)
    prostate = _prostate_sd(a, p)
    sv = _sv_sd(a, p)
    pelvis = _pelvic_bone_sd(a, p)
    fem_l, shaft_l = _femur_sd(a, p, 1.0)
    fem_r, shaft_r = _femur_sd(a, p, -1.0)
    hu = None
    if want_hu:
        def cov(sd):
            return S.coverage(sd, voxel_mm)
        hu = np.full(p.shape[:-1], HU["air"], dtype=np.float32)

        def paint(value, sd):
            nonlocal hu
            hu += cov(sd) * (value - hu)

        paint(HU["muscle"], body)
        fat_t = a.fat_thickness_mm - 5.0 * (p[..., 1] - a.body_center_y_mm) / a.body_semi_ap_mm
        paint(HU["fat"], np.maximum(body, -body - fat_t))
        paint(HU["pelvic_fat"], _pelvic_fat_sd(a, p))
        paint(HU["bladder_wall"], bladder)
        paint(HU["urine"], bladder + a.bladder_wall_mm)
        paint(HU["rectal_wall"], rectum)
        lumen = rectum + a.rectum_wall_mm
        paint(HU["rectal_content"], lumen)
        gas = _gas_sd(a, p, gas_pockets, lumen)
        if gas is not None:
            paint(HU["gas"], gas)
        paint(HU["periprostatic"], prostate - 3.0)
        paint(HU["seminal_vesicle"], sv)
        paint(HU["prostate"], prostate)
        paint(HU["cortical"], pelvis)
        paint(HU["cancellous"], pelvis + 2.0)
        for fem, shaft in ((fem_l, shaft_l), (fem_r, shaft_r)):
            paint(HU["cortical"], fem)
            paint(HU["cancellous"], fem + 3.0)
            paint(HU["marrow"], shaft + 5.0)
    masks: dict[str, np.ndarray] = {}
    if want_masks:
        in_body = body <= 0
        bone = (pelvis <= 0) | (fem_l <= 0) | (fem_r <= 0)
        soft = in_body & ~bone
        m_pro = soft & (prostate <= 0)
        m_sv = soft & (sv <= 0) & ~m_pro
        m_rect = soft & (rectum <= 0) & ~m_pro & ~m_sv
        m_bla = soft & (bladder <= 0) & ~m_pro & ~m_sv & ~m_rect
        femur_z = p[..., 2] >= -70.0
        masks = {"BODY": in_body, "BLADDER": m_bla, "RECTUM": m_rect, "PROSTATE": m_pro,
                 "SEMINAL_VESICLES": m_sv, "FEMUR_L": in_body & (fem_l <= 0) & femur_z,
                 "FEMUR_R": in_body & (fem_r <= 0) & femur_z}
    return hu, masks


def render_points(anatomy: PelvisAnatomy, points_lps: np.ndarray, *, voxel_mm: float,
                  gas_pockets=None, want_hu: bool = True, want_masks: bool = True,
                  chunk: int = 400_000) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """Noise-free HU and analytic organ masks at planning-frame LPS points (..., 3), in mm.

    ``voxel_mm``: size of the partial-volume smoothing (the voxel size of the target image).
    ``gas_pockets``: rectal gas pockets to render (default: the anatomy's own, i.e. the
    planning CT's gas). Points are processed in chunks of ``chunk`` to bound memory.
    """
    pts = np.asarray(points_lps, dtype=np.float64)
    shape = pts.shape[:-1]
    flat = pts.reshape(-1, 3)
    gas = anatomy.gas_pockets if gas_pockets is None else tuple(gas_pockets)
    hu = np.empty(flat.shape[0], dtype=np.float32) if want_hu else None
    masks = {n: np.empty(flat.shape[0], dtype=bool) for n in ANALYTIC_ROIS} if want_masks else {}
    for s in range(0, flat.shape[0], chunk):
        h, m = _evaluate(anatomy, flat[s:s + chunk], voxel_mm, gas, want_hu, want_masks)
        if want_hu:
            hu[s:s + chunk] = h
        for n, v in m.items():
            masks[n][s:s + chunk] = v
    return (hu.reshape(shape) if want_hu else None), {n: v.reshape(shape) for n, v in masks.items()}


def default_planning_grid(anatomy: PelvisAnatomy | None = None, spacing_mm=(3.0, 3.0, 3.0),
                          size_ijk=(160, 120, 70)) -> Grid:
    """An axial (HFS, identity direction) planning grid centred laterally on the phantom,
    its AP centre on the body centre and its SI centre on the femoral heads (+5 mm)."""
    a = anatomy or PelvisAnatomy()
    sp = np.asarray(spacing_mm, dtype=np.float64)
    n = np.asarray(size_ijk)
    centre = np.asarray(a.origin_lps_mm) + np.array([0.0, a.body_center_y_mm, 5.0])
    origin = centre - 0.5 * (n - 1) * sp
    # round to a 0.5 mm lattice, as scanners report table positions
    origin = np.round(origin * 2.0) / 2.0
    return Grid(shape=(int(n[2]), int(n[1]), int(n[0])), origin=origin, spacing=sp)


def pelvis_phantom(grid: Grid | None = None, seed: int = 0, *, anatomy: PelvisAnatomy | None = None,
                   noise_hu: float = 12.0) -> Phantom:
    """Render the male pelvis phantom on ``grid`` (default :func:`default_planning_grid`).

    Returns a :class:`Phantom` with the planning CT (HU, float32, Gaussian noise of
    ``noise_hu`` HU standard deviation, seeded) and the ROI masks of :data:`PELVIS_ROIS`.
    ``anatomy`` defaults to ``PelvisAnatomy.sample(seed)``.
    """
    anat = anatomy or PelvisAnatomy.sample(seed)
    grid = grid or default_planning_grid(anat)
    voxel_mm = float(np.mean(grid.spacing))
    nz = grid.shape[0]
    hu = np.empty(grid.shape, dtype=np.float32)
    masks = {n: np.empty(grid.shape, dtype=bool) for n in ANALYTIC_ROIS}
    nx, ny = grid.size_ijk[0], grid.size_ijk[1]
    jj, ii = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    step = max(1, 400_000 // (nx * ny))
    for k0 in range(0, nz, step):
        ks = np.arange(k0, min(nz, k0 + step), dtype=np.float64)
        ijk = np.stack(np.broadcast_arrays(ii[None], jj[None], ks[:, None, None]), axis=-1)
        pts = grid.ijk_to_lps(ijk)
        h, m = _evaluate(anat, pts, voxel_mm, anat.gas_pockets, True, True)
        hu[k0:k0 + len(ks)] = h
        for n_, v in m.items():
            masks[n_][k0:k0 + len(ks)] = v
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC7]))
    if noise_hu > 0:
        hu += rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    masks["PTV"] = expand_mask(masks["PROSTATE"], grid, anat.ptv_margin_mm) & masks["BODY"]
    meta = {"anatomy": "male_pelvis", "seed": int(seed), "noise_hu": float(noise_hu),
            "ptv_margin_mm": anat.ptv_margin_mm, "parameters": anat.to_dict()}
    ordered = {spec.name: masks[spec.name] for spec in PELVIS_ROIS}
    return Phantom(ct=Volume(hu, grid, "HU"), masks=ordered, rois=list(PELVIS_ROIS),
                   name="pelvis", meta=meta)


def isocenter_from_ptv(phantom: Phantom) -> np.ndarray:
    """Planning isocenter = PTV centroid (LPS mm, planning Frame of Reference)."""
    idx = np.argwhere(phantom.masks["PTV"])  # (k, j, i)
    if idx.size == 0:
        raise ValueError("empty PTV")
    c = idx.mean(axis=0)[::-1]
    return phantom.grid.ijk_to_lps(c)


__all__ = [
    "HU",
    "PELVIS_ROIS",
    "GasPocket",
    "PelvisAnatomy",
    "default_planning_grid",
    "isocenter_from_ptv",
    "pelvis_phantom",
    "render_points",
]
