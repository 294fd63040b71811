"""Analytic pelvis-like phantom and CBCT simulation for the registration tests.

The phantom is a function of LPS position (mm), so a "daily CBCT" with a *known*
deformation u is exactly ``phantom(x + u(x))`` sampled on the CBCT grid: u is then the true
displacement field in the pipeline's convention (CBCT point x ↦ planning point x + u(x)).
"""

from __future__ import annotations

import numpy as np

from adaptive.geometry.volume import Grid, Volume


def _ell(p, c, r):
    return (((p - np.asarray(c, float)) / np.asarray(r, float)) ** 2).sum(-1)


STRUCTURES = {
    # name: (centre LPS mm, radii mm)
    "Bladder": ((0.0, -35.0, 25.0), (32.0, 26.0, 24.0)),
    "Prostate": ((0.0, -5.0, -12.0), (18.0, 15.0, 16.0)),
    "Rectum": ((0.0, 30.0, 0.0), (14.0, 14.0, 45.0)),
}


_RNG = np.random.default_rng(1234)
_K = _RNG.normal(size=(48, 3))
_K *= (2 * np.pi / _RNG.uniform(12.0, 40.0, size=48) / np.linalg.norm(_K, axis=1))[:, None]
_PHASE = _RNG.uniform(0, 2 * np.pi, size=48)


def texture(p: np.ndarray, amplitude_hu: float = 60.0) -> np.ndarray:
    """Smooth random tissue texture (HU, zero mean, ~``amplitude_hu``/2 std) at LPS points."""
    out = np.zeros(p.shape[:-1])
    for k, ph in zip(_K, _PHASE):
        out += np.cos(p @ k + ph)
    return amplitude_hu * out / np.sqrt(2 * len(_K))


EDGE_MM = 1.5  # width of the soft edges: the phantom is band-limited, so sampling it on
#               differently placed grids gives consistent images (no aliasing bias)


def _soft(p, c, r):
    """Soft indicator (0..1) of the ellipsoid (centre c, radii r, mm) with ~EDGE_MM edges."""
    lvl = np.sqrt(_ell(p, c, r))
    d = (1.0 - lvl) * float(np.min(r))  # ~ signed distance to the surface, mm
    return 1.0 / (1.0 + np.exp(-np.clip(d / (EDGE_MM / 4), -40, 40)))


def phantom_hu(p: np.ndarray, rectal_gas: bool = False) -> np.ndarray:
    """HU of the phantom at LPS points p (..., 3)."""
    def put(hu, w, value):
        return hu * (1 - w) + value * w

    hu = np.full(p.shape[:-1], -1000.0)
    zero = (0.0, 0.0, 0.0)
    body = _soft(p * [1, 1, 0], zero, (150, 105, 1e9))
    inner = _soft(p * [1, 1, 0], zero, (138, 94, 1e9))
    hu = put(hu, body, -100.0)  # subcutaneous fat
    # muscle / soft tissue with texture (fat/muscle interleaving, vessels): a fixed random
    # sum of plane waves with 12-40 mm wavelengths, so it deforms exactly with the anatomy
    hu = put(hu, inner, 40.0 + texture(p))
    for c in ((-95.0, 5.0, -10.0), (95.0, 5.0, -10.0)):  # femoral heads
        hu = put(hu, _soft(p, c, (26, 26, 28)), 700.0)
    hu = put(hu, _soft(p, (0, -80, 0), (30, 10, 18)), 600.0)  # pubic symphysis
    hu = put(hu, _soft(p, (0, 75, 20), (40, 14, 40)), 550.0)  # sacrum
    for c in ((-85.0, 45.0, 55.0), (85.0, 45.0, 55.0)):  # iliac wings
        hu = put(hu, _soft(p, c, (20, 35, 18)), 500.0)
    hu = put(hu, _soft(p, *STRUCTURES["Bladder"]), 5.0)
    hu = put(hu, _soft(p, *STRUCTURES["Prostate"]), 55.0)
    hu = put(hu, _soft(p, *STRUCTURES["Rectum"]), 25.0)
    if rectal_gas:
        hu = put(hu, _soft(p, (0.0, 30.0, 0.0), (7, 7, 20)), -950.0)
    return put(np.full_like(hu, -1000.0), body, hu)


def structure_masks(grid: Grid, dvf: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """True masks on ``grid`` (optionally of the anatomy deformed by ``dvf``)."""
    p = grid.voxel_centers_lps()
    if dvf is not None:
        p = p + dvf
    return {n: _ell(p, c, r) < 1 for n, (c, r) in STRUCTURES.items()}


def planning_grid(spacing=(4.0, 4.0, 4.0), shape=(36, 64, 84)) -> Grid:
    nz, ny, nx = shape
    sp = np.asarray(spacing, float)
    origin = -sp * (np.array([nx, ny, nz]) - 1) / 2
    return Grid(shape=shape, origin=origin, spacing=sp)


def cbct_grid(spacing=(4.0, 4.0, 4.0), shape=(30, 60, 60), center=(0.0, 0.0, 0.0)) -> Grid:
    nz, ny, nx = shape
    sp = np.asarray(spacing, float)
    origin = np.asarray(center, float) - sp * (np.array([nx, ny, nz]) - 1) / 2
    return Grid(shape=shape, origin=origin, spacing=sp)


def planning_ct(grid: Grid | None = None, rectal_gas: bool = False) -> Volume:
    grid = grid or planning_grid()
    return Volume(phantom_hu(grid.voxel_centers_lps(), rectal_gas).astype(np.float32), grid, "HU")


def smooth_dvf(grid: Grid, amplitude=(3.0, -4.0, 2.5), sigma_mm=45.0, centre=(0.0, -20.0, 10.0),
               shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A smooth Gaussian bump deformation (+ optional uniform shift), LPS mm, float32."""
    p = grid.voxel_centers_lps()
    w = np.exp(-_ell(p, centre, (sigma_mm,) * 3) / 2)[..., None]
    return (w * np.asarray(amplitude) + np.asarray(shift)).astype(np.float32)


def simulate_cbct(grid: Grid, dvf: np.ndarray, *, frame_shift=(0.0, 0.0, 0.0), noise_hu=15.0,
                  cupping_hu=0.0, offset_hu=0.0, fov_radius_mm=None, pad_value=-1000.0,
                  gas_bubble=None, rectal_gas=False, seed=0) -> Volume:
    """A CBCT on ``grid`` showing the phantom deformed by ``dvf`` (CBCT x ↦ phantom x + dvf).

    ``frame_shift``: the CBCT's Frame of Reference differs by this translation: CBCT point q
    is anatomy point q + frame_shift (so the true DVF in CBCT coordinates is dvf + shift).
    ``cupping_hu``: centre darker by this much (quadratic in radius), ``fov_radius_mm``:
    outside the reconstruction cylinder (axis through the grid centre) voxels are
    ``pad_value`` exactly. ``gas_bubble``: (centre LPS in CBCT frame, radius mm) of gas
    present only in the CBCT.
    """
    q = grid.voxel_centers_lps()
    p = q + np.asarray(frame_shift) + dvf
    hu = phantom_hu(p, rectal_gas)
    if gas_bubble is not None:
        c, r = gas_bubble
        inside = np.linalg.norm(q - np.asarray(c), axis=-1) < r
        hu[inside] = -950.0
    rng = np.random.default_rng(seed)
    hu = hu + offset_hu + rng.normal(0, noise_hu, hu.shape)
    cen = grid.center_lps()
    rr = np.hypot(q[..., 0] - cen[0], q[..., 1] - cen[1])
    if cupping_hu:
        rmax = fov_radius_mm or rr.max()
        hu = hu - cupping_hu * np.clip(1 - (rr / rmax) ** 2, 0, 1)
    if fov_radius_mm is not None:
        hu[rr > fov_radius_mm] = pad_value
    return Volume(hu.astype(np.float32), grid, "HU")
