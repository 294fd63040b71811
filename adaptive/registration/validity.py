"""Measurements that tell a registration that converged to the right place from one that did
not (pure numpy; the thresholds and the verdict are in :mod:`adaptive.pipeline.safety`).

A registration that converged to the wrong place looks smooth (its Jacobian is fine); what
gives it away is the images themselves (AAPM TG-132 asks for a quantitative check of every
clinical registration):

* :func:`normalised_mi` - Studholme's normalised mutual information (H(F) + H(M)) / H(F, M)
  of the CBCT and the mapped planning CT on the CBCT body (dilated) inside its field of view:
  1 = independent images, 2 = one is a function of the other;
* :func:`body_dice` - the CBCT body outline against the planning body mapped onto the CBCT
  (both inside the field of view);
* :func:`residual_shift` - where the similarity of a region peaks when the result is shifted
  by a few mm (a parabola fitted to the metric along each axis): a converged registration
  sits at its peak; a result left a few mm off (an optimiser stopped early, a local optimum)
  does not, and the vertex says by how much.

Mappings are CBCT LPS mm → planning LPS mm: either ``p = A x + t`` (a 4×4 matrix) or
``p = x + u(x)`` (a displacement field on the CBCT grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from adaptive.geometry.jacobian import jacobian_determinant
from adaptive.geometry.volume import Grid, Volume
from adaptive.geometry.warp import mapped_inside, pull_back


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _bin_edges(values: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi - lo < 1.0:
        hi = lo + 1.0
    return np.linspace(lo, hi, bins + 1)[1:-1]


def normalised_mi(fixed_vals: np.ndarray, moving_vals: np.ndarray, bins: int = 32,
                  fixed_edges=None, moving_edges=None) -> float:
    """Normalised mutual information (H(F) + H(M)) / H(F, M) of paired samples, in [1, 2]."""
    if fixed_vals.size < 10:
        return float("nan")
    fe = _bin_edges(fixed_vals, bins) if fixed_edges is None else fixed_edges
    me = _bin_edges(moving_vals, bins) if moving_edges is None else moving_edges
    fb = np.digitize(fixed_vals, fe)
    mb = np.digitize(moving_vals, me)
    j = np.bincount(fb * bins + mb, minlength=bins * bins).astype(np.float64)
    j /= j.sum()
    j = j.reshape(bins, bins)
    hj = _entropy(j.ravel())
    return (_entropy(j.sum(1)) + _entropy(j.sum(0))) / hj if hj > 0 else float("nan")


def map_points(points: np.ndarray, matrix=None, dvf_at_points=None) -> np.ndarray:
    """CBCT points (N, 3) → planning points by a 4×4 matrix or by displacements (N, 3)."""
    if dvf_at_points is not None:
        return points + dvf_at_points
    m = np.asarray(matrix, dtype=np.float64)
    return points @ m[:3, :3].T + m[:3, 3]


@dataclass
class Samples:
    """Fixed (CBCT) sample points of a region: voxel indices, LPS points and values."""

    index: tuple  # numpy index arrays (k, j, i)
    points: np.ndarray  # (N, 3) CBCT LPS mm
    values: np.ndarray  # (N,) CBCT HU
    edges: np.ndarray  # CBCT histogram bin edges (interior)

    @classmethod
    def of(cls, cbct: Volume, mask: np.ndarray, max_samples: int = 40000, seed: int = 0,
           bins: int = 32) -> Samples:
        idx = np.argwhere(mask)
        if len(idx) > max_samples:
            rng = np.random.default_rng(seed)
            idx = idx[np.sort(rng.choice(len(idx), max_samples, replace=False))]
        index = tuple(idx.T)
        pts = cbct.grid.ijk_to_lps(idx[:, ::-1].astype(np.float64))
        vals = np.asarray(cbct.array, dtype=np.float32)[index]
        return cls(index, pts, vals, _bin_edges(vals, bins) if vals.size else np.zeros(0))

    @property
    def n(self) -> int:
        return int(self.values.size)

    def split(self, k: int) -> list[Samples]:
        """``k`` disjoint interleaved subsets (same histogram edges)."""
        out = []
        for i in range(k):
            sl = slice(i, None, k)
            out.append(Samples(tuple(a[sl] for a in self.index), self.points[sl],
                               self.values[sl], self.edges))
        return out


def planning_edges(planning_ct: Volume, bins: int = 32) -> np.ndarray:
    """Bin edges of the planning CT's values above -900 HU (body and a bit of air), fixed
    for every mapping so that scores of different mappings are comparable."""
    a = np.asarray(planning_ct.array)[::2, ::2, ::2]
    v = a[a > -900.0]
    return _bin_edges(v if v.size > 100 else a.ravel(), bins)


def nmi_of_mapping(samples: Samples, planning_ct: Volume, medges: np.ndarray, *, matrix=None,
                   dvf: np.ndarray | None = None, offset_mm=(0.0, 0.0, 0.0),
                   bins: int = 32) -> float:
    """NMI of the CBCT samples against the planning CT at the mapped points (+ ``offset_mm``
    in planning LPS)."""
    d = None if dvf is None else dvf[samples.index]
    p = map_points(samples.points, matrix, d) + np.asarray(offset_mm, dtype=np.float64)
    mv = planning_ct.sample_lps(p, order=1, fill=-1000.0)
    return normalised_mi(samples.values, mv, bins, samples.edges, medges)


def residual_shift_with_uncertainty(samples: Samples, planning_ct: Volume, medges: np.ndarray,
                                    *, matrix=None, dvf: np.ndarray | None = None,
                                    subsets: int = 4, step_mm: float = 2.0, bins: int = 32
                                    ) -> dict:
    """:func:`residual_shift` plus its measurement uncertainty: the residual is measured
    again on ``subsets`` disjoint subsets of the samples; the spread of those (per axis,
    standard deviation / √subsets) estimates the uncertainty of the full-sample residual.
    Adds ``uncertainty_mm`` (norm of the per-axis uncertainties) and ``lower_bound_mm`` =
    max(0, residual - 2 × uncertainty): the residual that the data show beyond doubt. In a
    low-contrast region (a liver lesion in a noisy CBCT) the residual is noisy and the lower
    bound says how much of it is real."""
    r = residual_shift(samples, planning_ct, medges, matrix=matrix, dvf=dvf, step_mm=step_mm,
                       bins=bins)
    parts = [residual_shift(p, planning_ct, medges, matrix=matrix, dvf=dvf, step_mm=step_mm,
                            bins=bins)["residual_mm"] for p in samples.split(subsets)]
    sd = np.std(np.asarray(parts, dtype=np.float64), axis=0, ddof=1) / np.sqrt(subsets)
    u = float(np.linalg.norm(sd))
    r.update(uncertainty_mm=u, lower_bound_mm=max(0.0, r["residual_norm_mm"] - 2.0 * u),
             subsets=subsets)
    return r


def residual_shift(samples: Samples, planning_ct: Volume, medges: np.ndarray, *, matrix=None,
                   dvf: np.ndarray | None = None, step_mm: float = 2.0, bins: int = 32
                   ) -> dict:
    """Where the NMI of the region peaks around the result, per axis (LPS, mm).

    The metric is evaluated at offsets 0, ±step, ±2·step, ±3·step along each axis (planning
    LPS); the peak is located by the parabola through the best offset and its two neighbours
    (the similarity peak is cusp-like, so a least-squares parabola over all of them would
    overshoot). A best offset at ±3·step means the peak lies beyond the probed range: it is
    reported as ±4·step. The residual is minus the peak: how far the result sits from it. Returns
    ``{"residual_mm": [x, y, z], "residual_norm_mm", "nmi", "gain"}`` where ``gain`` is the
    best metric on the offsets minus the metric at the result (≥ 0)."""
    base = nmi_of_mapping(samples, planning_ct, medges, matrix=matrix, dvf=dvf, bins=bins)
    xs = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]) * step_mm
    lim = 4.0 * step_mm
    vertex = np.zeros(3)
    best = base
    for axis in range(3):
        vals = []
        for o in xs:
            if o == 0.0:
                vals.append(base)
                continue
            e = np.zeros(3)
            e[axis] = o
            vals.append(nmi_of_mapping(samples, planning_ct, medges, matrix=matrix, dvf=dvf,
                                       offset_mm=e, bins=bins))
        f = np.asarray(vals)
        best = max(best, float(f.max()))
        i = int(np.argmax(f))
        if i in (0, len(xs) - 1):
            vertex[axis] = float(np.sign(xs[i])) * lim
            continue
        f0, f1, f2 = f[i - 1], f[i], f[i + 1]
        curv = f2 - 2.0 * f1 + f0
        vertex[axis] = xs[i] - (step_mm * (f2 - f0) / (2.0 * curv) if curv < 0 else 0.0)
    res = -vertex
    return {"residual_mm": [round(float(v), 3) for v in res],
            "residual_norm_mm": float(np.linalg.norm(res)), "nmi": float(base),
            "gain": float(best - base), "step_mm": step_mm, "samples": samples.n}


def fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled slice by slice (axial), as body outlines are drawn."""
    out = mask.copy()
    for k in range(out.shape[0]):
        if out[k].any():
            out[k] = ndimage.binary_fill_holes(out[k])
    return out


def mapped_planning_body(planning_ct: Volume, grid: Grid, region: np.ndarray, *, matrix=None,
                         dvf: np.ndarray | None = None, threshold_hu: float = -500.0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The planning body (> ``threshold_hu``, holes filled per slice) mapped onto the CBCT
    ``grid`` inside ``region`` (the planning CT sampled at the mapped voxel centres), and the
    part of ``region`` that maps inside the planning CT at all."""
    # the mapped planning CT on the whole grid (numba kernel; same values as sampling it at
    # the mapped points), the coverage from the mapped points of the region
    v = pull_back(planning_ct, grid, matrix=None if dvf is not None else matrix,
                  dvf_lps_mm=dvf, fill=-1000.0)
    body = (v > threshold_hu) & region
    del v
    covered = mapped_inside(planning_ct.grid, grid, region,
                            matrix=None if dvf is not None else matrix, dvf_lps_mm=dvf)
    return fill_slices(body) & region, covered


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else float("nan")


def body_dice(cbct_body: np.ndarray, planning_ct: Volume, grid: Grid, region: np.ndarray, *,
              matrix=None, dvf: np.ndarray | None = None) -> float:
    """Dice of the CBCT body and the mapped planning body, both inside ``region`` and where
    the mapping lands inside the planning CT (a CBCT that reaches beyond the planning CT's
    scan - a large setup error - must not count as a body-outline mismatch there)."""
    pb, covered = mapped_planning_body(planning_ct, grid, region, matrix=matrix, dvf=dvf)
    return dice(cbct_body & region & covered, pb & covered)


def roi_field_of_view(structures, planning_grid: Grid, dvf: np.ndarray, grid: Grid,
                      fov: np.ndarray, names=None, det: np.ndarray | None = None
                      ) -> dict[str, dict]:
    """Per planning ROI: its planned volume, the part of it that maps into the CBCT field of
    view, and whether today's (propagated) ROI touches the edge of that field of view.

    The planned part inside the field of view is measured in planning space as
    ``∫_FOV m(x + u(x)) J(x) dx`` (``m``: the planning mask interpolated trilinearly, ``J``:
    the Jacobian determinant of x ↦ x + u(x)), so it is exact for any deformation; today's
    ROI is ``m(x + u(x)) ≥ 0.5``. Volumes in cm³. ``det``: the Jacobian determinant of
    ``dvf`` when the caller has it."""
    if det is None:
        det = jacobian_determinant(dvf, grid)
    edge = fov & ~ndimage.binary_erosion(fov, border_value=0)
    dv_cbct = grid.voxel_volume_mm3 / 1000.0
    out = {}
    for roi in structures.rois:
        if names is not None and roi.name not in names:
            continue
        m = structures.mask(roi.name, planning_grid)
        planned = float(m.sum()) * planning_grid.voxel_volume_mm3 / 1000.0
        # m(x + u(x)) on the grid (trilinear, computed only near the ROI: numba kernel)
        w = pull_back(Volume(m, planning_grid), grid, dvf_lps_mm=dvf)
        w[~fov] = 0.0
        in_fov = float((w * det).sum(dtype=np.float64)) * dv_cbct
        today = w >= 0.5
        out[roi.name] = {"planned_cc": round(planned, 3), "planned_in_fov_cc": round(in_fov, 3),
                         "share_in_fov": round(min(1.0, in_fov / planned), 4) if planned else 0.0,
                         "touches_fov_edge": bool((today & edge).any())}
    return out

