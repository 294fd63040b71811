"""Simulated daily cone-beam CT of the pelvis phantom, with its ground truth.

The CBCT has its own Frame of Reference. Where the treatment isocenter lies in it is the
imaging system's *convention* (``frame_origin_lps_mm`` = the isocenter's CBCT-frame
coordinates): (0, 0, 0) for systems that reconstruct around the isocenter (the default), the
planning isocenter's own coordinates for systems that write the CBCT in coordinates close
to the planning CT's, anything else for a scanner-specific frame. See
:mod:`adaptive.phantoms.deformation` for the mapping to the planning frame. The grid is
axial (identity direction), centred on the isocenter, with a smaller transverse extent and
a shorter scan length than the planning CT. The image is the day's anatomy
(analytic pelvis evaluated at ``x + u(x)``, with the day's rectal gas), then degraded:

* cupping: ``HU -= cupping_hu * (1 - (r/R)^2) * (HU + 1000) / 1000`` (r: distance from the
  rotation axis, R: FOV radius) - a radial, low-frequency, attenuation-proportional deficit
  (scatter), so air stays air and the centre of the body is ``cupping_hu`` darker than its
  periphery;
* a global HU offset ``offset_hu`` (calibration);
* noise: Gaussian, slightly correlated (smoothed with σ = ``noise_corr_vox`` voxels, then
  rescaled to a standard deviation of ``noise_hu`` HU);
* a cylindrical field of view of diameter ``fov_diameter_mm`` about the z axis through the
  isocenter: outside it voxels are ``outside_value`` (-1000 HU, as reconstructed padding),
  truncating the body laterally.

Truth: the displacement field and the planning ROI masks pulled back through it
(``displacement_warp`` with trilinear interpolation, threshold 0.5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from adaptive.geometry.volume import Grid, Volume, displacement_warp
from adaptive.phantoms.deformation import DailyVariation, daily_dvf
from adaptive.phantoms.pelvis import PelvisAnatomy, render_points
from adaptive.phantoms.phantom import Phantom


@dataclass(frozen=True)
class CbctGeometry:
    """CBCT grid (centred on the isocenter) and field of view. Sizes (i, j, k), mm."""

    size_ijk: tuple[int, int, int] = (100, 100, 45)
    spacing_mm: tuple[float, float, float] = (2.7, 2.7, 3.0)
    fov_diameter_mm: float = 264.0

    def grid(self, centre_lps_mm=(0.0, 0.0, 0.0)) -> Grid:
        """Axial grid centred on ``centre_lps_mm`` (CBCT frame; the isocenter's CBCT-frame
        coordinates, (0, 0, 0) by default)."""
        n = np.asarray(self.size_ijk, dtype=np.float64)
        sp = np.asarray(self.spacing_mm, dtype=np.float64)
        c = np.asarray(centre_lps_mm, dtype=np.float64).reshape(3)
        return Grid(shape=(int(n[2]), int(n[1]), int(n[0])), origin=c - 0.5 * (n - 1) * sp,
                    spacing=sp)

    def fov_mask(self, grid: Grid | None = None, axis_lps_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
        """Boolean (nz, ny, nx): voxel centres inside the cylindrical reconstruction FOV
        (axis along z through ``axis_lps_mm``, CBCT frame)."""
        g = grid or self.grid(axis_lps_mm)
        x = g.voxel_centers_lps()
        return np.hypot(x[..., 0] - axis_lps_mm[0],
                        x[..., 1] - axis_lps_mm[1]) <= 0.5 * self.fov_diameter_mm


@dataclass(frozen=True)
class CbctDegradation:
    """Image degradation parameters (HU)."""

    noise_hu: float = 30.0
    noise_corr_vox: float = 0.7
    cupping_hu: float = 75.0
    offset_hu: float = 0.0
    outside_value: float = -1000.0

    @classmethod
    def sample(cls, seed: int, fraction: int) -> CbctDegradation:
        """Seeded: noise 20-40 HU, cupping 50-100 HU, offset -40..40 HU."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCB, int(fraction)]))
        return cls(noise_hu=float(rng.uniform(20, 40)), cupping_hu=float(rng.uniform(50, 100)),
                   offset_hu=float(rng.uniform(-40, 40)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def degrade(hu: np.ndarray, grid: Grid, geometry: CbctGeometry, deg: CbctDegradation,
            rng: np.random.Generator, axis_lps_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Apply cupping, offset, noise and the FOV cut to a noise-free HU array on ``grid``
    (CBCT frame; the rotation axis is parallel to z through ``axis_lps_mm``). Returns
    float32 HU."""
    x = grid.voxel_centers_lps(dtype=np.float32)
    r = np.hypot(x[..., 0] - np.float32(axis_lps_mm[0]), x[..., 1] - np.float32(axis_lps_mm[1]))
    radius = 0.5 * geometry.fov_diameter_mm
    inside = r <= radius
    out = hu.astype(np.float32).copy()
    profile = np.clip(1.0 - (r / radius) ** 2, 0.0, 1.0)
    out -= deg.cupping_hu * profile * np.clip(out + 1000.0, 0.0, None) / 1000.0
    out += deg.offset_hu
    if deg.noise_hu > 0:
        noise = rng.normal(0.0, 1.0, size=out.shape).astype(np.float32)
        if deg.noise_corr_vox > 0:
            noise = ndimage.gaussian_filter(noise, deg.noise_corr_vox)
            noise /= max(float(noise.std()), 1e-6)
        out += deg.noise_hu * noise
    out[~inside] = deg.outside_value
    np.clip(out, -1024.0, 3071.0, out=out)
    return out


@dataclass
class SimulatedFraction:
    """One simulated fraction.

    ``cbct``: degraded CBCT (HU) on the CBCT grid (CBCT frame; the isocenter is at
    ``frame_origin_lps_mm``).
    ``dvf``: float32 (nz, ny, nx, 3), CBCT point x ↔ planning point x + dvf(x) (LPS mm).
    ``truth_masks``: planning ROI masks pulled back onto the CBCT grid.
    ``clean_hu``: the day's anatomy before degradation (for tests/diagnostics).
    """

    fraction: int
    cbct: Volume
    dvf: np.ndarray
    truth_masks: dict[str, np.ndarray]
    clean_hu: np.ndarray
    variation: DailyVariation
    degradation: CbctDegradation
    geometry: CbctGeometry
    isocenter_lps_mm: np.ndarray
    seed: int
    frame_origin_lps_mm: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(3))

    def truth_dict(self, planning: Phantom) -> dict:
        """JSON-ready record of the parameters and measured facts (see ``truth.json``)."""
        g = self.cbct.grid
        vox_cc = g.voxel_volume_mm3 / 1000.0

        def centroid(mask, grid):
            idx = np.argwhere(mask)
            return grid.ijk_to_lps(idx.mean(axis=0)[::-1]).tolist() if idx.size else None

        organs = {}
        for name in ("PROSTATE", "BLADDER", "RECTUM", "SEMINAL_VESICLES", "PTV"):
            organs[name] = {
                "planning_volume_cc": planning.volume_cc(name),
                "daily_volume_cc": float(self.truth_masks[name].sum()) * vox_cc,
                "planning_centroid_lps_mm": centroid(planning.masks[name], planning.grid),
                "daily_centroid_cbct_lps_mm": centroid(self.truth_masks[name], g),
            }
        return {
            "fraction": self.fraction,
            "seed": self.seed,
            "convention": ("CBCT point x (CBCT frame, LPS mm) corresponds to planning point "
                           "x + u(x) (planning frame, LPS mm); u = truth/dvf.mha on the CBCT grid, "
                           "components (x, y, z) = LPS. The treatment isocenter is at "
                           "isocenter_cbct_lps_mm (c) in the CBCT frame; x maps to "
                           "Phi(isocenter + setup_translation + R_setup (x - c))."),
            "isocenter_planning_lps_mm": np.asarray(self.isocenter_lps_mm).tolist(),
            "isocenter_cbct_lps_mm": np.asarray(self.frame_origin_lps_mm, float).tolist(),
            "variation": self.variation.to_dict(),
            "degradation": self.degradation.to_dict(),
            "cbct_geometry": {"size_ijk": list(self.geometry.size_ijk),
                              "spacing_mm": list(self.geometry.spacing_mm),
                              "fov_diameter_mm": self.geometry.fov_diameter_mm},
            "organs": organs,
        }


def simulate_fraction(planning: Phantom, anatomy: PelvisAnatomy, isocenter_lps_mm, fraction: int,
                      seed: int, *, variation: DailyVariation | None = None,
                      geometry: CbctGeometry | None = None,
                      degradation: CbctDegradation | None = None,
                      frame_origin_lps_mm=(0.0, 0.0, 0.0)) -> SimulatedFraction:
    """Simulate fraction ``fraction`` (1-based) of the pelvis case: the day's anatomy, its
    CBCT and the ground truth. Parameters default to seeded samples
    (:meth:`DailyVariation.sample`, :meth:`CbctDegradation.sample`).

    ``frame_origin_lps_mm``: CBCT-frame coordinates (mm) of the treatment isocenter, i.e. the
    imaging system's frame convention: (0, 0, 0) = reconstructed around the isocenter; the
    planning isocenter itself = written in (nominally) planning coordinates. The grid and the
    reconstruction axis are centred there; the truth includes the frame offset."""
    geometry = geometry or CbctGeometry()
    variation = variation or DailyVariation.sample(seed, fraction, anatomy)
    degradation = degradation or CbctDegradation.sample(seed, fraction)
    c = np.asarray(frame_origin_lps_mm, dtype=np.float64).reshape(3)
    grid = geometry.grid(c)
    # daily_dvf maps x to Phi(iso + t + R x); this frame puts the isocenter at c, so
    # Phi(iso + t + R (x - c)) = Phi((iso - R c) + t + R x)
    iso = np.asarray(isocenter_lps_mm, dtype=np.float64).reshape(3)
    dvf = daily_dvf(grid, anatomy, variation, iso - variation.setup_rotation_matrix @ c)
    pts = grid.voxel_centers_lps() + dvf
    voxel_mm = float(np.mean(grid.spacing))
    clean, _ = render_points(anatomy, pts, voxel_mm=voxel_mm, gas_pockets=variation.gas_pockets,
                             want_masks=False)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0, int(fraction)]))
    hu = degrade(clean, grid, geometry, degradation, rng, axis_lps_mm=c)
    truth = {}
    for name, mask in planning.masks.items():
        truth[name] = displacement_warp(Volume(mask, planning.grid, "mask"), dvf, grid, order=1).array
    return SimulatedFraction(fraction=fraction, cbct=Volume(hu, grid, "HU"), dvf=dvf,
                             truth_masks=truth, clean_hu=clean, variation=variation,
                             degradation=degradation, geometry=geometry,
                             isocenter_lps_mm=iso, seed=int(seed), frame_origin_lps_mm=c)
