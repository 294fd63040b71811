"""The day's anatomy: a smooth, invertible deformation of the planning pelvis plus a setup error.

Frames and the ground-truth convention
--------------------------------------
* Planning frame: the planning CT's Frame of Reference, LPS mm.
* CBCT frame: the day's CBCT Frame of Reference, LPS mm, with (0, 0, 0) at the treatment
  isocenter (the CBCT is reconstructed around it).

A CBCT point ``x`` (mm) images the planning-frame point ``p = x + u(x)``, built in two steps:

1. *Setup* (rigid): ``q = iso + t_setup + R_setup @ x``: the patient's planned isocenter
   ``iso`` would sit at the CBCT origin if set up perfectly; on this day the planning point
   imaged at the CBCT origin is ``iso + t_setup`` and the patient is rotated by ``R_setup``
   (Rz·Ry·Rx of ``setup_rotation_deg``) about the isocenter.
2. *Organ deformation* (smooth, invertible): ``p = Phi(q)``, the time-1 flow of a stationary
   velocity field ``v`` on planning-frame points (integrated with RK4). A flow of a smooth
   field is a diffeomorphism, so the map never folds (Jacobian determinant > 0). The field is
   the sum of

   * bladder filling: uniform scaling by ``bladder_scale`` (linear factor, daily / planning)
     about the bladder's inferior-posterior pole inside the bladder (normalised ellipsoidal
     radius ≤ 1.3), decaying smoothly to 0 at radius 2.2;
   * rectal filling: in-plane radial scaling by ``rectum_scale`` about the rectal centreline
     within the segment ``rectum_segment_z_mm`` (phantom frame), decaying to 0 at 2.4 rectal
     radii and 25 mm beyond the segment ends;
   * prostate + seminal vesicles: a local rigid motion (rotation vector
     ``prostate_rotation_deg`` about the prostate centre, then translation
     ``prostate_translation_mm``, both planning → daily), blended with a weight that is 1
     over the prostate/SV envelope and falls to 0 at 1.9 envelope radii.

   The velocity fields are written daily → planning, so the daily organs are the planning
   organs scaled / moved *by* the stated parameters (exactly for the rigid and the scaling
   parts where the weight is 1; the neighbourhood is compressed/stretched smoothly).

So ``u(x) = Phi(iso + t_setup + R_setup @ x) - x``: it includes the Frame of Reference offset
(the isocenter), the setup error and the organ deformation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from adaptive.geometry.volume import Grid
from adaptive.phantoms import shapes as S
from adaptive.phantoms.pelvis import GasPocket, PelvisAnatomy


@dataclass(frozen=True)
class DailyVariation:
    """One fraction's anatomy change (see the module docstring for exact meanings; mm, deg)."""

    setup_translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    setup_rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bladder_scale: float = 1.0
    rectum_scale: float = 1.0
    rectum_segment_z_mm: tuple[float, float] = (-40.0, 45.0)
    prostate_translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    prostate_rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gas_pockets: tuple[GasPocket, ...] = ()

    @classmethod
    def sample(cls, seed: int, fraction: int, anatomy: PelvisAnatomy) -> DailyVariation:
        """A seeded, plausible day: setup error σ 3 mm / 1°, bladder ×0.82-1.2 (linear),
        rectum ×0.9-1.3 (distended when gas is present, gas in ~50 % of days), prostate
        translation σ 1-2.5 mm, rotation σ 4° about LR and 1.5° otherwise."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xDA1, int(fraction)]))

        def n(sd, lim):
            return float(np.clip(rng.normal(0.0, sd), -lim, lim))

        setup_t = (n(3.0, 8.0), n(3.0, 8.0), n(3.0, 8.0))
        setup_r = (n(1.0, 2.5), n(1.0, 2.5), n(1.0, 2.5))
        bladder = float(rng.uniform(0.82, 1.2))
        gas_today = bool(rng.uniform() < 0.5)
        rectum = float(rng.uniform(1.05, 1.3) if gas_today else rng.uniform(0.9, 1.1))
        zc = float(rng.uniform(-20.0, 25.0))
        segment = (zc - 30.0, zc + 30.0)
        pro_t = (n(1.0, 3.0), n(2.5, 6.0), n(2.5, 6.0))
        pro_r = (n(4.0, 8.0), n(1.5, 3.0), n(1.5, 3.0))
        gas: tuple[GasPocket, ...] = ()
        if gas_today:
            gas = (anatomy.rectal_gas_pocket(float(rng.uniform(zc - 15.0, zc + 15.0)),
                                             float(rng.uniform(6.0, 10.0))),)
        return cls(setup_t, setup_r, bladder, rectum, segment, pro_t, pro_r, gas)

    @property
    def setup_rotation_matrix(self) -> np.ndarray:
        return S.rotation_matrix(*self.setup_rotation_deg)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gas_pockets"] = [g.to_dict() for g in self.gas_pockets]
        d["rectal_gas"] = bool(self.gas_pockets)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


class OrganMotionField:
    """The stationary velocity field ``v`` (mm per unit time) on planning-frame LPS points and
    its time-1 flow ``Phi`` (daily anatomy point → planning anatomy point)."""

    def __init__(self, anatomy: PelvisAnatomy, variation: DailyVariation):
        a = anatomy
        self.origin = np.asarray(a.origin_lps_mm, dtype=np.float64)
        self.anatomy = a
        self.var = variation
        bc = np.asarray(a.bladder_center_mm)
        bs = np.asarray(a.bladder_semi_mm)
        self.bladder_center, self.bladder_semi = bc, bs
        self.bladder_anchor = bc + np.array([0.0, 0.25 * bs[1], -bs[2]])
        self.k_bladder = -np.log(variation.bladder_scale)
        self.k_rectum = -np.log(variation.rectum_scale)
        pc = np.asarray(a.prostate_center_mm)
        ps = np.asarray(a.prostate_semi_mm)
        self.prostate_center = pc
        svc = np.asarray(a.sv_center_mm)
        # envelope of prostate + SVs (axis-aligned ellipsoid)
        lo = np.minimum(pc - ps, np.array([-svc[0] - a.sv_semi_mm[0], svc[1] - 8, pc[2] - ps[2]]))
        hi = np.maximum(pc + ps, np.array([svc[0] + a.sv_semi_mm[0], svc[1] + 8, svc[2] + 14]))
        self.env_center = 0.5 * (lo + hi)
        self.env_semi = 0.5 * (hi - lo) + 4.0
        self.theta = np.deg2rad(np.asarray(variation.prostate_rotation_deg, dtype=np.float64))
        self.tau = np.asarray(variation.prostate_translation_mm, dtype=np.float64)

    def velocity(self, p: np.ndarray) -> np.ndarray:
        """v at phantom-frame points p (N, 3), mm."""
        v = np.zeros_like(p)
        if self.k_bladder != 0.0:
            rho = S.normalised_radius(p, self.bladder_center, self.bladder_semi)
            g = S.smooth_window(rho, 1.3, 2.2)
            v += (self.k_bladder * g)[:, None] * (p - self.bladder_anchor)
        if self.k_rectum != 0.0:
            a = self.anatomy
            xc, yc = a.rectum_centerline(p[:, 2])
            dx, dy = p[:, 0] - xc, p[:, 1] - yc
            rho = np.hypot(dx, dy) / a.rectum_radius_mm
            z0, z1 = self.var.rectum_segment_z_mm
            zc, half = 0.5 * (z0 + z1), 0.5 * (z1 - z0)
            g = S.smooth_window(rho, 1.2, 2.4) * S.smooth_window(np.abs(p[:, 2] - zc), half, half + 25.0)
            v[:, 0] += self.k_rectum * g * dx
            v[:, 1] += self.k_rectum * g * dy
        if np.any(self.theta) or np.any(self.tau):
            rho = S.normalised_radius(p, self.env_center, self.env_semi)
            w = S.smooth_window(rho, 1.0, 1.9)
            rigid = np.cross(self.theta, p - self.prostate_center) + self.tau
            v -= w[:, None] * rigid
        return v

    def flow(self, points_lps: np.ndarray, steps: int = 8, chunk: int = 300_000) -> np.ndarray:
        """Phi(q): integrate dp/dt = v(p) from t = 0 to 1 (RK4, ``steps`` steps) for
        planning-frame LPS points (..., 3) in mm."""
        q = np.asarray(points_lps, dtype=np.float64)
        shape = q.shape
        flat = q.reshape(-1, 3) - self.origin
        out = np.empty_like(flat)
        h = 1.0 / steps
        for s in range(0, flat.shape[0], chunk):
            p = flat[s:s + chunk].copy()
            for _ in range(steps):
                k1 = self.velocity(p)
                k2 = self.velocity(p + 0.5 * h * k1)
                k3 = self.velocity(p + 0.5 * h * k2)
                k4 = self.velocity(p + h * k3)
                p += (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
            out[s:s + chunk] = p
        return (out + self.origin).reshape(shape)


def daily_dvf(cbct_grid: Grid, anatomy: PelvisAnatomy, variation: DailyVariation,
              isocenter_lps_mm, *, steps: int = 8, stride: int = 2) -> np.ndarray:
    """Ground-truth displacement field on the CBCT grid, float32 (nz, ny, nx, 3), LPS mm.

    CBCT point x (CBCT frame) ↔ planning point x + u(x) (planning frame); see the module
    docstring for the composition (isocenter + setup + organ motion). The organ flow is
    integrated exactly on a lattice of every ``stride``-th voxel (extended past the last
    voxel where needed) and trilinearly interpolated in between; the returned array *is*
    the ground truth (images and truth structures are derived from it).
    """
    iso = np.asarray(isocenter_lps_mm, dtype=np.float64).reshape(3)
    rot = variation.setup_rotation_matrix
    shift = iso + np.asarray(variation.setup_translation_mm, dtype=np.float64)
    motion = OrganMotionField(anatomy, variation)
    stride = max(1, int(stride))
    nz, ny, nx = cbct_grid.shape
    axes = [np.arange(0, (np.ceil((s - 1) / stride) * stride) + 1, stride, dtype=np.float64)
            for s in (nx, ny, nz)]
    kk, jj, ii = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    xc = cbct_grid.ijk_to_lps(np.stack([ii, jj, kk], axis=-1))
    uc = motion.flow(shift + xc @ rot.T, steps=steps) - xc
    if stride == 1:
        return uc.astype(np.float32)
    k, j, i = np.meshgrid(np.arange(nz) / stride, np.arange(ny) / stride, np.arange(nx) / stride,
                          indexing="ij")
    coords = np.stack([k.ravel(), j.ravel(), i.ravel()])
    out = np.empty(cbct_grid.shape + (3,), dtype=np.float32)
    for c in range(3):
        out[..., c] = ndimage.map_coordinates(uc[..., c], coords, order=1,
                                              mode="nearest").reshape(cbct_grid.shape)
    return out
