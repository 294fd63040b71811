"""Radiological depths shared by the dose calculations on one CT.

A planning stage traces the same exact radiological depths several times: the Dij for its
rows, then each plan-dose calculation (deliverable dose, correction rounds, the independent
check, the scheduled plan on today's anatomy) for the body voxels, per beam direction. On a
clinical-size CT these rays are most of a plan dose's time (1 M voxels x 9 beams through a
512 x 512 x 150 CT: about 10 s on 2 cores). The cache is a plain dict owned by the caller:

* key: :func:`direction_key`: beam direction (gantry, collimator, couch deg; isocenter LPS mm;
  SAD mm; patient position) and :func:`grid_key` (the density values by content, the density
  and dose grids), so an entry never serves another CT, grid or beam;
* value: (flat dose-grid indices, sorted ascending; depths mm, one per index), every depth
  traced exactly (one Siddon ray per point, :func:`adaptive.dose.kernel.beam_depths`; the
  Dij stores its depths only when it traced them that way).

:func:`lookup` serves the requested indices that an entry holds, whether the entry was made
for the same indices or for others (the Dij's rows are a subset of the body), and says which
are missing; the caller traces those and stores the completed set (:func:`store`).

The same dict also keeps what every plan dose on one CT would otherwise derive again from it
(:func:`density_of`: the relative electron density of a CT in HU; :func:`derived`: e.g. the
body on a dose grid), under keys that name the CT by content.
"""

from __future__ import annotations

import zlib

import numpy as np

from adaptive.dose.density import hu_to_density
from adaptive.geometry.volume import Grid, Volume


def array_key(a: np.ndarray) -> tuple:
    """Content key of an array: shape, dtype and CRC-32 of its bytes (~5 ms for 5 MB), so a
    cache entry never serves a CT whose values changed (in place or not)."""
    c = np.ascontiguousarray(a)
    return (c.shape, c.dtype.str, zlib.crc32(memoryview(c).cast("B")))


def _grid_tuple(grid: Grid) -> tuple:
    return (tuple(np.round(grid.origin, 6)), tuple(np.round(grid.spacing, 6)),
            tuple(np.round(np.ravel(grid.direction), 9)), tuple(grid.shape))


def derived(cache: dict | None, key: tuple, make):
    """``make()``, kept in ``cache`` under ``key`` and returned from there by later calls (no
    cache: computed every time). The caller's key must name everything the value depends on."""
    if cache is None:
        return make()
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = make()
    return hit


def density_of(cache: dict | None, ct: Volume) -> Volume:
    """Relative electron density of the CT ``ct`` (HU; :func:`adaptive.dose.density.hu_to_density`
    with the default calibration), converted once per cache and CT content: on a 550 x 550 x
    188 synthetic CT one conversion takes ~2 s and a planning stage made five."""
    return derived(cache, ("density", array_key(ct.array), _grid_tuple(ct.grid)),
                   lambda: hu_to_density(ct))


def grid_key(dens: np.ndarray, density_grid: Grid, dgrid: Grid) -> tuple:
    """Key part of the density values (float32 array) and the density and dose grids."""
    return (array_key(dens), _grid_tuple(density_grid), _grid_tuple(dgrid))


def direction_key(gantry_deg: float, collimator_deg: float, couch_deg: float, isocenter_lps_mm,
                  sad_mm: float, patient_position: str, gkey: tuple, nodes: int = 0) -> tuple:
    """Key of one beam direction's depths on one CT and dose grid (:func:`grid_key`);
    ``nodes``: the stride of a coarse node set (0: dose voxels)."""
    return ("exact_depth", float(gantry_deg), float(collimator_deg), float(couch_deg),
            tuple(np.round(np.asarray(isocenter_lps_mm, dtype=float), 6)), float(sad_mm),
            patient_position, gkey, int(nodes))


def lookup(cache: dict | None, key: tuple, idx: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Depths for the sorted flat indices ``idx`` from the entry under ``key``: None when
    there is no entry or it holds none of them; else (depths, missing), ``missing`` a bool
    mask of the indices still to trace (None when every one is served; their depths are NaN)."""
    if cache is None:
        return None
    hit = cache.get(key)
    if hit is None:
        return None
    cidx, cdepths = hit
    if len(cidx) == len(idx) and np.array_equal(cidx, idx):
        return cdepths, None
    if len(cidx) == 0 or len(idx) == 0:
        return None
    pos = np.minimum(np.searchsorted(cidx, idx), len(cidx) - 1)
    found = cidx[pos] == idx
    if not found.any():
        return None
    depths = np.full(len(idx), np.nan)
    depths[found] = cdepths[pos[found]]
    return depths, (None if found.all() else ~found)


def store(cache: dict | None, key: tuple, idx: np.ndarray, depths: np.ndarray) -> None:
    """Keep the depths of the sorted flat indices ``idx`` under ``key`` (replacing the
    entry: callers store the completed set they looked up)."""
    if cache is None:
        return
    idx = np.asarray(idx)
    if len(idx) > 1 and not np.all(idx[1:] > idx[:-1]):
        raise ValueError("depth cache indices must be sorted ascending and unique")
    cache[key] = (idx, np.asarray(depths, dtype=np.float64))
