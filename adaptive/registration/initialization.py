"""Initial alignment of the CBCT to the planning CT that does not depend on one convention.

Imaging systems disagree on where the CBCT's Frame of Reference puts the patient: some
reconstruct around the treatment isocenter (isocenter at CBCT (0, 0, 0)), some write the
CBCT in coordinates close to the planning CT's (with their own Frame of Reference UID), some
send a rigid Spatial Registration (the image-guidance match), and the patient may be set up
centimetres off. So no single convention is trusted. Candidates (4×4 matrices, CBCT LPS mm →
planning LPS mm):

* frame-of-reference **conventions** - ``spatial_registration`` (the matrix of a received
  Spatial Registration object), ``isocenter`` (CBCT origin = the plan's isocenter),
  ``identity`` (same coordinates);
* **content** guesses - ``image_centres`` (grid centres coincide), ``body_centroids`` (the
  CBCT body's centroid onto the planning body's centroid).

Each is scored at the coarsest level - both images block-averaged to ``coarse_voxel_mm`` and
smoothed, normalised mutual information (Studholme: (H(F) + H(M)) / H(F, M), 1 = independent,
2 = identical) on a fixed, seeded subsample of the CBCT's body (dilated) inside its field of
view - and then a translation search of ± ``search_range_mm`` around every distinct
candidate (coarse-to-fine: ``search_step_mm``, then halved steps around the best few). The
registration continues from the best translation by the metric; every candidate's score,
the winner and the margin to the runner-up go into the registration record.

The conventions are also what :func:`setup_correction` measures a rigid result against: the
translation (at the isocenter) and rotation of the rigid match relative to the nearest
convention is the setup correction the registration implies. A content guess cannot be a
reference for it (it follows the image, so a CBCT whose header is 10 cm off would look
perfectly set up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from adaptive.errors import RegistrationError
from adaptive.geometry.volume import Grid

#: candidate names that are frame-of-reference conventions (a setup correction is measured
#: against the nearest of these)
CONVENTIONS = ("spatial_registration", "isocenter", "identity")
#: order of preference when scores tie (within ``tie_nmi``)
PREFERENCE = ("spatial_registration", "isocenter", "identity", "image_centres", "body_centroids")


@dataclass(frozen=True)
class InitSettings:
    """``[initial_alignment]`` of ``config/registration.toml`` (lengths in mm)."""

    use_isocenter: bool = True
    use_image_centres: bool = True
    use_identity: bool = True
    use_body_centroids: bool = True
    search: bool = True
    search_range_mm: float = 100.0
    search_step_mm: float = 25.0
    final_step_mm: float = 2.5
    refine_best: int = 3
    coarse_voxel_mm: float = 6.0
    samples: int = 2000
    bins: int = 24
    dedupe_mm: float = 40.0
    tie_nmi: float = 1e-4
    random_seed: int = 0


@dataclass
class Candidate:
    """One starting point and what the coarse metric said about it."""

    name: str
    matrix: np.ndarray  # 4×4 CBCT LPS → planning LPS (the candidate itself)
    convention: bool
    nmi: float = float("nan")  # at the candidate itself
    overlap: float = float("nan")  # share of the samples mapped inside the planning CT
    searched: bool = False
    best_nmi: float = float("nan")  # best after the translation search around it
    best_offset_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))  # planning LPS
    searched_with: str = ""  # candidate whose search covered this one (de-duplicated)

    @property
    def best_matrix(self) -> np.ndarray:
        m = self.matrix.copy()
        m[:3, 3] += self.best_offset_mm
        return m

    def to_record(self) -> dict:
        return {"name": self.name, "convention": self.convention,
                "translation_mm": [round(float(v), 2) for v in self.matrix[:3, 3]],
                "nmi": _r(self.nmi), "overlap": _r(self.overlap), "searched": self.searched,
                "searched_with": self.searched_with or None, "best_nmi": _r(self.best_nmi),
                "best_offset_mm": [round(float(v), 2) for v in self.best_offset_mm]}


@dataclass
class InitialAlignment:
    """The chosen start (``matrix``), the winning candidate and every candidate's scores."""

    matrix: np.ndarray
    winner: str
    reason: str
    candidates: list[Candidate]
    time_s: float
    evaluations: int
    n_samples: int

    def conventions(self) -> dict[str, np.ndarray]:
        return {c.name: c.matrix for c in self.candidates if c.convention}

    def to_record(self) -> dict:
        return {"winner": self.winner, "reason": self.reason,
                "matrix": np.round(self.matrix, 6).tolist(), "time_s": round(self.time_s, 3),
                "evaluations": self.evaluations, "samples": self.n_samples,
                "metric": "normalised mutual information (coarse level, body ∩ FOV)",
                "candidates": [c.to_record() for c in self.candidates]}


def _r(x: float, nd: int = 4):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def translation(t) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return m


# --- coarse images ------------------------------------------------------------------------


def _block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Mean over blocks of ``f`` voxels (numpy (z, y, x) order); the remainder is dropped."""
    nz, ny, nx = (s // k * k for s, k in zip(a.shape, f))
    b = a[:nz, :ny, :nx].astype(np.float32)
    return b.reshape(nz // f[0], f[0], ny // f[1], f[1], nx // f[2], f[2]).mean(axis=(1, 3, 5))


def coarse(array: np.ndarray, grid: Grid, voxel_mm: float) -> tuple[np.ndarray, Grid]:
    """The image block-averaged to about ``voxel_mm`` and smoothed by one coarse voxel
    (the coarsest pyramid level), with its grid (same frame)."""
    f = tuple(max(1, round(voxel_mm / s)) for s in grid.spacing[::-1])  # (z, y, x)
    if any(n // k < 2 for n, k in zip(array.shape, f)):
        f = (1, 1, 1)
    c = _block_mean(array, f)
    c = ndimage.gaussian_filter(c, 1.0, mode="nearest")
    fijk = np.asarray(f[::-1], dtype=np.float64)
    origin = grid.ijk_to_lps(0.5 * (fijk - 1.0))  # centre of the first block
    return c, Grid(shape=c.shape, origin=origin, spacing=grid.spacing * fijk,
                   direction=grid.direction)


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi - lo < 1.0:
        hi = lo + 1.0
    return np.linspace(lo, hi, bins + 1)[1:-1]


# --- the metric -----------------------------------------------------------------------------


class CoarseMetric:
    """Normalised mutual information of the CBCT samples against the planning CT mapped by
    ``matrix + offset`` (planning LPS mm), evaluated for many offsets at once."""

    def __init__(self, fixed_pts: np.ndarray, fixed_vals: np.ndarray, moving: np.ndarray,
                 mgrid: Grid, bins: int, air_hu: float = -1000.0):
        self.pts = fixed_pts  # (N, 3) CBCT LPS mm
        self.bins = bins
        self.fb = np.digitize(fixed_vals, _edges(fixed_vals, bins)).astype(np.int64)
        self.moving = np.ascontiguousarray(moving, dtype=np.float32)
        self.mgrid = mgrid
        body = moving[moving > -500.0]
        self.medges = _edges(body if body.size > 100 else moving.ravel(), bins)
        self.air = air_hu
        self.lps_to_ijk = np.linalg.inv(mgrid.affine)
        hf = np.bincount(self.fb, minlength=bins) / self.fb.size
        hf = hf[hf > 0]
        self.h_fixed = float(-(hf * np.log(hf)).sum())
        self.evaluations = 0

    def __call__(self, matrix: np.ndarray, offsets_mm: np.ndarray,
                 chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(NMI, overlap) for each offset (K, 3) added to ``matrix``'s translation."""
        offsets_mm = np.atleast_2d(np.asarray(offsets_mm, dtype=np.float64))
        p0 = self.pts @ matrix[:3, :3].T + matrix[:3, 3]  # (N, 3) planning LPS
        a = self.lps_to_ijk
        i0 = p0 @ a[:3, :3].T + a[:3, 3]  # continuous (i, j, k)
        shape_ijk = np.asarray(self.mgrid.size_ijk, dtype=np.float64)
        nmi = np.empty(len(offsets_mm))
        ovl = np.empty(len(offsets_mm))
        b = self.bins
        for s in range(0, len(offsets_mm), chunk):
            d = offsets_mm[s:s + chunk] @ a[:3, :3].T  # index-space offsets
            ijk = i0[None] + d[:, None, :]  # (K, N, 3)
            coords = ijk.reshape(-1, 3)[:, ::-1].T
            v = ndimage.map_coordinates(self.moving, coords, order=1, mode="constant",
                                        cval=self.air, prefilter=False)
            inside = np.all((ijk >= -0.5) & (ijk <= shape_ijk - 0.5), axis=-1)
            mb = np.digitize(v, self.medges).reshape(len(d), -1)
            k = len(d)
            joint = np.bincount((np.arange(k)[:, None] * b * b + self.fb[None] * b + mb).ravel(),
                                minlength=k * b * b).reshape(k, b * b).astype(np.float64)
            joint /= joint.sum(axis=1, keepdims=True)
            pm = joint.reshape(k, b, b).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                hj = -np.nansum(np.where(joint > 0, joint * np.log(joint), 0.0), axis=1)
                hm = -np.nansum(np.where(pm > 0, pm * np.log(pm), 0.0), axis=1)
            nmi[s:s + k] = (self.h_fixed + hm) / np.maximum(hj, 1e-12)
            ovl[s:s + k] = inside.mean(axis=1)
        self.evaluations += len(offsets_mm)
        return nmi, ovl


def _lattice(half_range: float, step: float) -> np.ndarray:
    n = int(np.floor(half_range / step + 1e-9))
    ax = np.arange(-n, n + 1, dtype=np.float64) * step
    g = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    return g


def _search(metric: CoarseMetric, matrix: np.ndarray, s: InitSettings,
            min_overlap: float) -> tuple[float, np.ndarray]:
    """Coarse-to-fine translation search around ``matrix``: (best NMI, best offset mm)."""
    offs = _lattice(s.search_range_mm, s.search_step_mm)
    nmi, ovl = metric(matrix, offs)
    nmi = np.where(ovl >= min_overlap, nmi, -np.inf)
    order = np.argsort(-nmi)[:max(1, s.refine_best)]
    best = [(nmi[i], offs[i]) for i in order if np.isfinite(nmi[i])]
    if not best:
        return float("-inf"), np.zeros(3)
    step = s.search_step_mm / 2.0
    while step >= s.final_step_mm - 1e-9:
        local = _lattice(step, step)
        nxt = []
        for _, o in best:
            cand = o[None] + local
            v, ov = metric(matrix, cand)
            v = np.where(ov >= min_overlap, v, -np.inf)
            i = int(np.argmax(v))
            nxt.append((v[i], cand[i]))
        nxt.sort(key=lambda t: -t[0])
        best = nxt[:max(1, s.refine_best)]
        step /= 2.0
    return float(best[0][0]), np.asarray(best[0][1], dtype=np.float64)


# --- candidates -------------------------------------------------------------------------------


def _centroid(mask: np.ndarray, grid: Grid) -> np.ndarray | None:
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    return grid.ijk_to_lps(idx.mean(axis=0)[::-1])


def candidates(cbct_grid: Grid, planning_grid: Grid, s: InitSettings, *,
               spatial_registration: np.ndarray | None = None,
               isocenter_lps_mm=None, cbct_body_centroid=None,
               planning_body_centroid=None) -> list[Candidate]:
    """The candidate starts (see the module docstring), in order of preference."""
    out = []
    if spatial_registration is not None:
        out.append(Candidate("spatial_registration", np.asarray(spatial_registration, float), True))
    if isocenter_lps_mm is not None and s.use_isocenter:
        iso = np.asarray(isocenter_lps_mm, dtype=np.float64).reshape(-1)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise RegistrationError(f"isocenter must be 3 finite LPS mm values, got {iso}")
        out.append(Candidate("isocenter", translation(iso), True))
    if s.use_identity:
        out.append(Candidate("identity", np.eye(4), True))
    if s.use_image_centres:
        out.append(Candidate("image_centres",
                             translation(planning_grid.center_lps() - cbct_grid.center_lps()),
                             False))
    if (s.use_body_centroids and cbct_body_centroid is not None
            and planning_body_centroid is not None):
        out.append(Candidate("body_centroids", translation(
            np.asarray(planning_body_centroid) - np.asarray(cbct_body_centroid)), False))
    if not out:
        out.append(Candidate("identity", np.eye(4), True))
    return out


def choose_initial_alignment(fixed: np.ndarray, fixed_grid: Grid, region: np.ndarray,
                             body: np.ndarray, moving: np.ndarray, moving_grid: Grid,
                             s: InitSettings, *, spatial_registration=None,
                             isocenter_lps_mm=None, min_overlap: float = 0.3
                             ) -> InitialAlignment:
    """Score every candidate at the coarsest level, search translations around each
    distinct one, and return the best start (see the module docstring).

    ``fixed``: CBCT (HU-like) on ``fixed_grid``; ``region``: its valid field of view;
    ``body``: its body mask (inside the region); ``moving``: planning CT (HU) on
    ``moving_grid``. ``min_overlap``: share of the samples that must map inside the planning
    CT for a position to count."""
    t0 = time.perf_counter()
    fc, fgc = coarse(np.where(region, fixed, np.float32(-1000.0)), fixed_grid,
                     s.coarse_voxel_mm)
    mc, mgc = coarse(moving, moving_grid, s.coarse_voxel_mm)
    # samples: CBCT body dilated by ~2 coarse voxels (the skin edge counts from both sides),
    # inside the field of view (eroded by one coarse voxel: no padding edge in the blocks)
    reg_c = _coarse_mask(region, fixed_grid, fgc) >= 0.999
    body_c = _coarse_mask(body, fixed_grid, fgc) > 0.5
    sample_mask = ndimage.binary_dilation(body_c, iterations=2) & reg_c
    if sample_mask.sum() < 50:
        sample_mask = reg_c
    idx = np.argwhere(sample_mask)
    if len(idx) < 50:
        raise RegistrationError("CBCT field of view too small to align "
                                f"({len(idx)} coarse samples)")
    rng = np.random.default_rng(s.random_seed)
    if len(idx) > s.samples:
        idx = idx[np.sort(rng.choice(len(idx), s.samples, replace=False))]
    pts = fgc.ijk_to_lps(idx[:, ::-1].astype(np.float64))
    vals = fc[tuple(idx.T)]
    metric = CoarseMetric(pts, vals, mc, mgc, s.bins)

    pbody = mc > -500.0
    lab, n = ndimage.label(pbody)
    if n > 1:
        sizes = ndimage.sum_labels(pbody, lab, index=np.arange(1, n + 1))
        pbody = lab == (1 + int(np.argmax(sizes)))
    cands = candidates(fixed_grid, moving_grid, s, spatial_registration=spatial_registration,
                       isocenter_lps_mm=isocenter_lps_mm,
                       cbct_body_centroid=_centroid(body_c, fgc),
                       planning_body_centroid=_centroid(pbody, mgc))
    centre = fixed_grid.center_lps()
    for c in cands:
        v, ov = metric(c.matrix, np.zeros((1, 3)))
        c.nmi, c.overlap = float(v[0]), float(ov[0])
        c.best_nmi = c.nmi if ov[0] >= min_overlap else float("-inf")
    if s.search:
        _search_distinct(cands, metric, centre, s, min_overlap)
    valid = [c for c in cands if np.isfinite(c.best_nmi)]
    if not valid:
        raise RegistrationError(
            "no initial alignment brings the CBCT over the planning CT: candidates "
            + ", ".join(f"{c.name} (overlap {100 * c.overlap:.0f}%)" for c in cands)
            + f"; at least {100 * min_overlap:.0f}% of the CBCT body must map inside it")
    top = max(c.best_nmi for c in valid)
    tied = [c for c in valid if c.best_nmi >= top - s.tie_nmi]
    win = min(tied, key=lambda c: PREFERENCE.index(c.name))
    others = sorted((c for c in valid if c is not win), key=lambda c: -c.best_nmi)
    off = np.linalg.norm(win.best_offset_mm)
    reason = (f"highest coarse NMI {win.best_nmi:.4f} after the translation search "
              f"(offset {off:.1f} mm from the {win.name} start)")
    if others:
        reason += f"; runner-up {others[0].name} {others[0].best_nmi:.4f}"
    return InitialAlignment(matrix=win.best_matrix, winner=win.name, reason=reason,
                            candidates=cands, time_s=time.perf_counter() - t0,
                            evaluations=metric.evaluations, n_samples=len(pts))


def _search_distinct(cands: list[Candidate], metric: CoarseMetric, centre: np.ndarray,
                     s: InitSettings, min_overlap: float) -> None:
    """Translation search around each distinct candidate (same rotation and a CBCT-centre
    image within ``s.dedupe_mm`` mm: searched once, with the first in preference order);
    updates each candidate's best NMI and offset (mm) in place."""
    searched: list[Candidate] = []
    for c in cands:  # preference order: a duplicate is searched with the first
        pc = c.matrix[:3, :3] @ centre + c.matrix[:3, 3]
        twin = next((d for d in searched if np.allclose(d.matrix[:3, :3], c.matrix[:3, :3],
                                                       atol=1e-6) and np.linalg.norm(
            d.matrix[:3, :3] @ centre + d.matrix[:3, 3] - pc) < s.dedupe_mm), None)
        if twin is not None:
            c.searched_with = twin.name
            continue
        best, off = _search(metric, c.matrix, s, min_overlap)
        c.searched = True
        if best > c.best_nmi:
            c.best_nmi, c.best_offset_mm = best, off
        searched.append(c)


def _coarse_mask(mask: np.ndarray, grid: Grid, cgrid: Grid) -> np.ndarray:
    """Share of each coarse voxel covered by ``mask`` (block mean on the same lattice)."""
    f = tuple(round(c / s) for c, s in zip(cgrid.spacing[::-1], grid.spacing[::-1]))
    return _block_mean(mask, f) if f != (1, 1, 1) else mask.astype(np.float32)


# --- the setup correction a rigid result implies ------------------------------------------------


@dataclass(frozen=True)
class SetupCorrection:
    """The rigid match relative to the nearest frame-of-reference convention.

    ``translation_mm``: where the planned isocenter is found in the CBCT minus where the
    convention puts it (CBCT LPS mm); ``rotation_deg``: angle of the rotation between them;
    ``couch_rotation_deg``: its component about the vertical (AP, LPS y) axis."""

    convention: str
    translation_mm: np.ndarray
    rotation_deg: float
    couch_rotation_deg: float
    per_convention: dict

    @property
    def translation_norm_mm(self) -> float:
        return float(np.linalg.norm(self.translation_mm))

    def to_record(self) -> dict:
        return {"convention": self.convention,
                "translation_mm": [round(float(v), 2) for v in self.translation_mm],
                "translation_norm_mm": round(self.translation_norm_mm, 2),
                "rotation_deg": round(self.rotation_deg, 2),
                "couch_rotation_deg": round(self.couch_rotation_deg, 2),
                "per_convention": self.per_convention}


def rotation_angle_deg(r: np.ndarray) -> float:
    c = (np.trace(r) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def setup_correction(rigid: np.ndarray, conventions: dict[str, np.ndarray],
                     point_lps_mm) -> SetupCorrection | None:
    """Translation/rotation of ``rigid`` (CBCT LPS → planning LPS) relative to each
    convention, at the planning point ``point_lps_mm`` (the isocenter); the nearest wins."""
    if not conventions:
        return None
    p = np.asarray(point_lps_mm, dtype=np.float64).reshape(3)
    inv = np.linalg.inv(rigid)
    found = inv[:3, :3] @ p + inv[:3, 3]  # the point in the CBCT per the rigid match
    per = {}
    best = None
    for name, m in conventions.items():
        mi = np.linalg.inv(m)
        expected = mi[:3, :3] @ p + mi[:3, 3]
        t = found - expected
        r = rigid[:3, :3] @ m[:3, :3].T  # residual rotation in planning axes
        ang = rotation_angle_deg(r)
        couch = float(np.degrees(np.arctan2(r[0, 2] - r[2, 0], r[0, 0] + r[2, 2])))
        per[name] = {"translation_mm": [round(float(v), 2) for v in t],
                     "translation_norm_mm": round(float(np.linalg.norm(t)), 2),
                     "rotation_deg": round(ang, 2)}
        if best is None or np.linalg.norm(t) < np.linalg.norm(best.translation_mm):
            best = SetupCorrection(name, t, ang, couch, per)
    return SetupCorrection(best.convention, best.translation_mm, best.rotation_deg,
                           best.couch_rotation_deg, per)
