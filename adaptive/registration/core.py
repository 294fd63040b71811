"""Deformable registration of the daily CBCT (fixed) to the planning CT (moving).

Convention (identical to the replay truth and to elastix with fixed = CBCT, moving = CT):
the displacement field ``u`` lives on the CBCT grid, in LPS mm, and a CBCT point ``x``
corresponds to the planning-CT point ``x + u(x)``. ``rigid_matrix`` is the 4×4 homogeneous
map of CBCT LPS mm → planning LPS mm found by the rigid stage (including the initial
alignment); for a rigid fallback ``u(x) = A x + t − x``.

Steps: identity and content checks → initial alignment (every candidate - a received
Spatial Registration's matrix, the isocenter convention, identity, image centres, body
centroids - scored at the coarsest level with a ± 10 cm translation search around each, the
best continued: :mod:`adaptive.registration.initialization`) → overlap check → crop the
planning CT to the aligned CBCT extent + margin → rigid (Euler, multi-resolution) → the
setup correction the rigid match implies (against the nearest frame convention) →
B-spline (coarse grid, Mattes MI, ASGD) under a deadline → field → quality measurements
(Jacobian, similarity, body-outline agreement and residual shift of the rigid and of the
final mapping: :mod:`adaptive.registration.validity`; deformation beyond rigid), refusing
folded or diverged results. Whether the result may be *used* is decided from these figures
by :mod:`adaptive.pipeline.safety` (thresholds in ``config/safety.toml``).

Initial alignment is applied by re-expressing the (cropped) planning CT's geometry in the
CBCT frame (origin/direction moved by the inverse of the matrix), so elastix always starts
from the identity and the stages compose exactly: ``x ↦ M (T_elastix(x))``.

Deadline: the rigid stage always runs (it is short and its result is the fallback). The
B-spline stage, which elastix cannot interrupt in-process, runs in a ``fork``-ed worker that
is killed when the budget (minus ``finish_reserve_s`` for the field and checks) runs out;
the rigid result is then returned with ``fallback="rigid"``.

Determinism and threads: elastix's random samplers use the fixed ``RandomSeed`` from the
config, so two runs with the same inputs, settings and thread count give bit-identical
results (tested). ITK's multithreaded metric evaluation splits the samples into per-thread
partial sums, so a different thread count adds them in a different order: the float rounding
differs and the optimiser's path drifts slightly. Measured on the test phantom: 1 vs 2
threads differ by at most 0.10 mm (mean 0.016 mm); the tests bound it at 0.5 mm.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from adaptive.errors import (
    ChildDiedError,
    ChildTimeoutError,
    PatientMismatchError,
    RegistrationError,
)
from adaptive.forked import ChildError, call_in_child
from adaptive.geometry.jacobian import jacobian_determinant
from adaptive.geometry.volume import Grid, Volume
from adaptive.geometry.warp import no_thread_pool
from adaptive.log import get_logger
from adaptive.model.identity import SeriesInfo
from adaptive.registration import elastix_backend as eb
from adaptive.registration import validity as V
from adaptive.registration.evaluate import dilate_mm
from adaptive.registration.field import mapping_field
from adaptive.registration.initialization import (
    InitialAlignment,
    SetupCorrection,
    choose_initial_alignment,
    setup_correction,
)
from adaptive.registration.masks import (
    body_and_gas,
    erode_mask,
    padding_value,
    soft_tissue_mode,
    valid_region_mask,
)
from adaptive.registration.quality import (
    affine_field,
    deformation_beyond_rigid,
    jacobian_stats,
    similarity,
)
from adaptive.registration.settings import RegistrationSettings, load_registration_settings
from adaptive.registration.shading import apply_shading, estimate_shading
from adaptive.registration.working import working_volume

log = get_logger("adaptive.registration")


@dataclass
class RegistrationResult:
    """Outcome of :func:`register`.

    dvf_lps_mm: (nz, ny, nx, 3) float32 on ``fixed_grid`` (CBCT), LPS mm; CBCT point x ↦
        planning-CT point x + u(x).
    rigid_matrix: 4×4, CBCT LPS mm → planning LPS mm (initial alignment ∘ rigid stage).
    fallback: None for a deformable result, "rigid" when the deadline forced the rigid result.
    quality: Jacobian, similarity (before/rigid/final), deformation beyond rigid, overlap.
    timings_s: per-step wall-clock times (s). parameters: settings and run choices.
    """

    dvf_lps_mm: np.ndarray
    fixed_grid: Grid
    rigid_matrix: np.ndarray
    fallback: str | None
    quality: dict
    timings_s: dict
    parameters: dict
    initial_matrix: np.ndarray = field(default_factory=lambda: np.eye(4))
    initial_alignment: str = "identity"
    fixed_mask: np.ndarray | None = None  # valid CBCT region used by the metric
    body_mask: np.ndarray | None = None  # CBCT body (inside the valid region)
    valid_mask: np.ndarray | None = None  # CBCT field of view (not eroded)
    initial: InitialAlignment | None = None  # every candidate's score and the winner
    setup: SetupCorrection | None = None  # rigid match vs the nearest frame convention
    # the working-resolution images everything above was measured on (adaptive.registration.
    # working), the input CBCT's grid and the B-spline transform, to evaluate the mapping there
    fixed_image: Volume | None = None
    moving_image: Volume | None = None
    native_grid: Grid | None = None
    bspline_maps: list | None = None
    jacobian: np.ndarray | None = None  # det of dvf_lps_mm (working grid), float32

    @property
    def ok(self) -> bool:
        return self.fallback is None

    def field_on(self, grid: Grid | None = None) -> np.ndarray:
        """The final mapping's displacement (float32 (z, y, x, 3), LPS mm; CBCT point x ↦
        planning point x + u(x)) on ``grid`` (default: the input CBCT's grid): ``dvf_lps_mm``
        itself on the working grid; elsewhere the rigid matrix composed with the B-spline
        transform evaluated analytically (:func:`adaptive.registration.field.mapping_field`),
        or the rigid match alone for a rigid result."""
        grid = grid or self.native_grid or self.fixed_grid
        if grid.same_as(self.fixed_grid):
            return self.dvf_lps_mm
        return mapping_field(self.rigid_matrix, grid,
                             self.bspline_maps if self.fallback is None else None)


# --- geometry helpers -----------------------------------------------------------------


def _check_matrix(m, what: str) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise RegistrationError(f"{what} must be a finite 4x4 matrix, got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        raise RegistrationError(f"{what}: last row must be (0, 0, 0, 1), got {m[3].tolist()}")
    r = m[:3, :3]
    if not np.allclose(r.T @ r, np.eye(3), atol=1e-3) or np.linalg.det(r) <= 0:
        raise RegistrationError(f"{what}: the 3x3 part is not a proper rotation")
    return m


def grid_in_frame(grid: Grid, matrix: np.ndarray) -> Grid:
    """The same voxels described in another frame: if ``matrix`` maps frame-F points to this
    grid's frame (p = A q + t), the returned grid places voxel ijk at q = A⁻¹(p − t)."""
    a, t = matrix[:3, :3], matrix[:3, 3]
    ainv = np.linalg.inv(a)
    return Grid(shape=grid.shape, origin=ainv @ (grid.origin - t), spacing=grid.spacing,
                direction=ainv @ grid.direction)


def _corners(grid: Grid) -> np.ndarray:
    nx, ny, nz = grid.size_ijk
    c = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], float)
    return grid.ijk_to_lps(c)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:3, :3].T + m[:3, 3]


def _sub(mask: np.ndarray, step: int) -> tuple:
    return (slice(None, None, step),) * 3


def _window(a: np.ndarray, tissue_mode_hu: float, s: RegistrationSettings) -> np.ndarray:
    """The image as given to elastix: clipped to the intensity window about its tissue mode."""
    if s.intensity_window_hu is None:
        return a
    lo, hi = s.intensity_window_hu
    return np.clip(a, tissue_mode_hu + lo, tissue_mode_hu + hi)


def _shading_corrected(fixed: np.ndarray, fgrid: Grid, centres: np.ndarray, planning_ct: Volume,
                       m_rigid: np.ndarray, region: np.ndarray, cbct_mode: float, ct_mode: float,
                       s: RegistrationSettings) -> tuple[np.ndarray, dict]:
    """The CBCT for the deformable stage with its shading removed (see
    :mod:`adaptive.registration.shading`), windowed, and the correction's report.
    ``centres``: the CBCT voxel centres (LPS mm)."""
    ct_r = planning_ct.sample_lps(_apply(m_rigid, centres), order=1,
                                  fill=np.nan).astype(np.float32)
    inside = np.isfinite(ct_r)
    ct_r[~inside] = -1000.0
    shading, rep = estimate_shading(fixed, ct_r, region & inside, fgrid, cbct_tissue_hu=cbct_mode,
                                    ct_tissue_hu=ct_mode, settings=s.shading)
    if not rep["applied"]:
        return _window(fixed, cbct_mode, s), rep
    corrected = apply_shading(fixed, shading)
    # after correction the CBCT is on the planning CT's HU scale
    return _window(corrected, ct_mode, s), rep


def _validity_samples(cbct: Volume, fmask: np.ndarray, body: np.ndarray, planning_ct: Volume
                      ) -> tuple[V.Samples, np.ndarray]:
    """CBCT samples of the body (dilated 10 mm, so the outline counts from both sides) inside
    the eroded field of view, and the planning CT's histogram edges."""
    region = dilate_mm(body, cbct.grid, 10.0) & fmask if body.any() else fmask
    return V.Samples.of(cbct, region), V.planning_edges(planning_ct)


def _validity(vs, cbct: Volume, planning_ct: Volume, valid: np.ndarray, body: np.ndarray, *,
              matrix=None, dvf=None) -> dict:
    """Similarity (NMI), body-outline Dice and residual shift of one mapping."""
    samples, medges = vs
    out = {"nmi": V.nmi_of_mapping(samples, planning_ct, medges, matrix=matrix, dvf=dvf),
           "body_dice": V.body_dice(body, planning_ct, cbct.grid, valid, matrix=matrix,
                                    dvf=dvf),
           "samples": samples.n}
    out["residual"] = V.residual_shift(samples, planning_ct, medges, matrix=matrix, dvf=dvf)
    return out


# --- the B-spline worker ----------------------------------------------------------------


def _run_bspline(args: tuple, timeout_s: float | None, in_subprocess: bool):
    """Run the B-spline elastix stage; returns transform maps or None on timeout. In a
    subprocess it is a forked child with a parent-death signal (:mod:`adaptive.forked`):
    killed at the deadline, and with whatever process runs this registration."""
    if not in_subprocess:
        return eb.run_elastix(*args)
    try:
        return call_in_child(eb.run_elastix, args, timeout_s=timeout_s)
    except ChildTimeoutError:
        return None
    except ChildDiedError as e:
        raise RegistrationError(f"B-spline worker died: {e}") from None
    except ChildError as e:
        raise RegistrationError(f"B-spline stage failed: {e}") from None


# --- main entry point -----------------------------------------------------------------------


def check_same_patient(cbct_info: SeriesInfo | None, ct_info: SeriesInfo | None) -> None:
    """Raise :class:`PatientMismatchError` when both identities are known and the CBCT is
    not the planning CT's patient, by the rule the writers apply later
    (:meth:`~adaptive.model.identity.PatientInfo.mismatches`: ID and name, birth date and sex
    when both known): before the registration, not after it."""
    if cbct_info is None or ct_info is None:
        return
    bad = ct_info.patient.mismatches(cbct_info.patient)
    if bad:
        raise PatientMismatchError(
            f"CBCT series {cbct_info.series_instance_uid} is not the patient of the planning CT "
            f"series {ct_info.series_instance_uid}: {'; '.join(bad)}")


def register(cbct: Volume, planning_ct: Volume, *, config=None, initial_matrix=None,
             isocenter_lps_mm=None, budget_s: float | None = None,
             cbct_info: SeriesInfo | None = None, ct_info: SeriesInfo | None = None
             ) -> RegistrationResult:
    """Register today's CBCT (fixed, HU-like) to the planning CT (moving, HU).

    ``config``: path/dict/:class:`RegistrationSettings` (default ``config/registration.toml``).
    ``initial_matrix``: 4×4 CBCT LPS → planning LPS (e.g. from a Spatial Registration object).
    ``isocenter_lps_mm``: planning isocenter (planning LPS mm); the CBCT frame's origin is taken
    to be this point. ``budget_s``: wall-clock budget in s for the whole call, counted after
    the one-time itk import (None/0: no deadline unless the config sets one). Raises :class:`RegistrationError` on empty or
    non-overlapping images, failure, divergence or folding; :class:`PatientMismatchError` when
    the two series belong to different patients.
    """
    s = load_registration_settings(config)
    eb.preload(s.threads)  # one-time itk import: not charged to the budget
    t_start = time.perf_counter()
    if budget_s is None and s.default_budget_s > 0:
        budget_s = s.default_budget_s
    deadline = t_start + budget_s if budget_s else None
    timings: dict[str, float] = {}
    q: dict = {}
    check_same_patient(cbct_info, ct_info)

    # --- working resolution (adaptive.registration.working) ----------------------------
    native_grid = cbct.grid
    with _clock(timings, "working_images"):
        cbct, planning_ct, valid = _working_images(cbct, planning_ct, s, q)

    # --- content checks ---------------------------------------------------------------
    fgrid = cbct.grid
    with _clock(timings, "prepare"):
        prep = _checked_content(cbct, planning_ct, valid, s, q)

    # --- initial alignment: every candidate scored at the coarsest level -------------------
    with _clock(timings, "initial_alignment"):
        if initial_matrix is not None:
            initial_matrix = _check_matrix(initial_matrix, "initial_matrix")
        ia = choose_initial_alignment(prep.fixed, fgrid, valid, prep.body, prep.moving_all,
                                      planning_ct.grid, s.init,
                                      spatial_registration=initial_matrix,
                                      isocenter_lps_mm=isocenter_lps_mm,
                                      min_overlap=s.quality["min_overlap_fraction"])
        m0, how = ia.matrix, ia.winner
        q["initial_alignment"] = ia.to_record()
    with _clock(timings, "prepare"):
        smp = _Sampler(fgrid, prep.fmask, prep.fixed, planning_ct, s.quality["subsample"],
                       s.quality["mi_bins"])
        crop, moving, fixed_reg, mm = _cropped_moving(planning_ct, fgrid, m0, how, smp, prep,
                                                      s, q)

    # --- rigid ----------------------------------------------------------------------------
    with _clock(timings, "rigid"):
        rmaps = eb.run_elastix(fixed_reg, fgrid, moving, grid_in_frame(crop.grid, m0),
                               s.parameter_map("rigid"), prep.fmask)
        m_rigid = m0 @ eb.euler_to_matrix(rmaps[-1])
    sc, vs = _rigid_quality(m_rigid, m0, ia, isocenter_lps_mm, smp, cbct, planning_ct, valid,
                            prep, s, q)

    # --- CBCT shading correction (planning CT as prior), for the deformable stage -------------
    if s.shading.enabled:
        fixed_reg = _shading_stage(prep, fgrid, smp, planning_ct, m_rigid, mm, s, q, timings)

    # --- B-spline under the deadline ----------------------------------------------------------
    with _clock(timings, "deformable"):
        bmaps, fallback = _deformable_stage(fixed_reg, fgrid, moving,
                                            grid_in_frame(crop.grid, m_rigid), prep.fmask,
                                            deadline, budget_s, s, q)

    # --- field --------------------------------------------------------------------------------
    with _clock(timings, "field"):
        dvf = _displacement_field(bmaps, m_rigid, fgrid, smp.centres)

    # --- quality ------------------------------------------------------------------------------
    with _clock(timings, "quality"):
        det = _final_quality(dvf, m_rigid, fgrid, valid, prep.body, smp, vs, cbct, planning_ct,
                             q)
    timings["total"] = time.perf_counter() - t_start
    _refuse_folded_or_diverged(q, s)
    log.info("registration_done", fallback=fallback, initial_alignment=how,
             jacobian_min=round(q["jacobian_min"], 3),
             deformation_mean_mm=round(q["deformation_mean_mm"], 2),
             **{f"t_{k}_s": round(v, 3) for k, v in timings.items()})
    return RegistrationResult(dvf_lps_mm=dvf, fixed_grid=fgrid, rigid_matrix=m_rigid,
                              fallback=fallback, quality=q, timings_s=timings,
                              parameters=_parameters(s, how, m0, budget_s, bmaps),
                              initial_matrix=m0, initial_alignment=how, fixed_mask=prep.fmask,
                              body_mask=prep.body, valid_mask=valid, initial=ia, setup=sc,
                              fixed_image=cbct, moving_image=planning_ct,
                              native_grid=native_grid, bspline_maps=bmaps, jacobian=det)


@contextlib.contextmanager
def _clock(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time (s) to ``timings[name]``."""
    t = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


def _working_images(cbct: Volume, planning_ct: Volume, s: RegistrationSettings, q: dict
                    ) -> tuple[Volume, Volume, np.ndarray]:
    """(CBCT, planning CT) at the working resolution and the CBCT's valid (field-of-view)
    mask on its working grid; records the factors and spacing (mm) in ``q``."""
    native_valid = valid_region_mask(cbct, erode_mm=0.0)
    pad = padding_value(np.asarray(cbct.array))
    cbct, valid, fac = working_volume(cbct, s.working_voxel_mm, native_valid,
                                      outside=-1000.0 if pad is None else pad)
    planning_ct, _, fac_ct = working_volume(planning_ct, s.working_voxel_mm)
    del native_valid
    q["working_grid"] = {"cbct_factors_zyx": list(fac), "planning_factors_zyx": list(fac_ct),
                         "cbct_spacing_mm": [round(float(v), 4) for v in cbct.grid.spacing],
                         "working_voxel_mm": s.working_voxel_mm}
    return cbct, planning_ct, valid


@dataclass
class _Prepared:
    """The checked images (HU, float32) and the CBCT masks on its working grid."""

    fixed: np.ndarray
    moving_all: np.ndarray
    fmask: np.ndarray
    body: np.ndarray
    tissue_mode: float

    @property
    def metric_mask(self) -> np.ndarray:
        """The metric mask inside the body (the metric mask when no body was found)."""
        return self.fmask & self.body if self.body.any() else self.fmask


def _checked_content(cbct: Volume, planning_ct: Volume, valid: np.ndarray,
                     s: RegistrationSettings, q: dict) -> _Prepared:
    """Refuse non-finite, empty or constant images; the eroded metric mask, the body and the
    CBCT's soft-tissue mode (HU)."""
    fgrid = cbct.grid
    fixed = np.asarray(cbct.array, dtype=np.float32)
    moving_all = np.asarray(planning_ct.array, dtype=np.float32)
    for name, a in (("CBCT", fixed), ("planning CT", moving_all)):
        if not np.all(np.isfinite(a)):
            raise RegistrationError(f"{name} contains non-finite voxel values")
    min_std = s.quality["min_intensity_std"]
    if valid.mean() < s.min_valid_fraction or float(fixed[valid].std()) < min_std:
        raise RegistrationError(
            f"CBCT is empty or constant (valid fraction {valid.mean():.3f}, std "
            f"{float(fixed[valid].std()) if valid.any() else 0.0:.2f} HU)")
    if float(moving_all.std()) < min_std:
        raise RegistrationError(f"planning CT is constant (std {float(moving_all.std()):.2f} HU)")
    fmask = erode_mask(valid, fgrid.spacing[::-1], s.mask_erode_mm)
    if fmask.mean() < s.min_valid_fraction:
        fmask = valid
    body, _, tissue_mode = body_and_gas(cbct, valid, smoothing_mm=s.body_smoothing_mm,
                                        body_offset_hu=s.synthetic_ct["body_offset_hu"],
                                        gas_offset_hu=s.synthetic_ct["gas_offset_hu"])
    q["fixed_valid_fraction"] = float(valid.mean())
    # tissue (> -500 HU: air stays air under CBCT offsets and cupping) in the field of view
    q["tissue_fraction_fov"] = float((fixed[valid] > -500.0).mean())
    q["cbct_tissue_mode_hu"] = tissue_mode
    return _Prepared(fixed, moving_all, fmask, body, tissue_mode)


class _Sampler:
    """The subsampled CBCT metric points (LPS mm) and their HU, for overlap and similarity
    checks of a matrix (CBCT LPS -> planning LPS) or a displacement field on the CBCT grid."""

    def __init__(self, fgrid: Grid, fmask: np.ndarray, fixed: np.ndarray, planning_ct: Volume,
                 step: int, mi_bins: int) -> None:
        self.sub = _sub(fmask, step)
        self.centres = fgrid.voxel_centers_lps()  # CBCT voxel centres, LPS mm
        self.fm_sub = fmask[self.sub]
        self.pts = self.centres[self.sub][self.fm_sub]
        self.fvals = fixed[self.sub][self.fm_sub]
        self.planning_ct = planning_ct
        self.mi_bins = mi_bins

    def mapped(self, m: np.ndarray | None = None, dvf: np.ndarray | None = None) -> np.ndarray:
        """The points mapped to planning LPS mm by ``dvf`` (when given) or ``m``."""
        return self.pts + dvf[self.sub][self.fm_sub] if dvf is not None else _apply(m, self.pts)

    def overlap(self, m: np.ndarray | None = None, dvf: np.ndarray | None = None) -> float:
        """Fraction of the points that map inside the planning CT."""
        return float(self.planning_ct.grid.contains_lps(self.mapped(m, dvf)).mean())

    def similarity(self, m: np.ndarray | None = None, dvf: np.ndarray | None = None) -> float:
        """Similarity of the CBCT and the mapped planning CT (outside: -1000 HU)."""
        mv = self.planning_ct.sample_lps(self.mapped(m, dvf), order=1, fill=-1000.0)
        return similarity(self.fvals, mv, self.mi_bins)


def _cropped_moving(planning_ct: Volume, fgrid: Grid, m0: np.ndarray, how: str,
                    smp: _Sampler, prep: _Prepared, s: RegistrationSettings, q: dict
                    ) -> tuple[Volume, np.ndarray, np.ndarray, float]:
    """After the initial alignment ``m0`` (``how``): refuse too little overlap, record it and
    the similarity; the planning CT cropped to the aligned CBCT extent + margin (mm), both
    images windowed for the metric, and the planning CT's soft-tissue mode (HU)."""
    q["overlap_initial"] = _required_overlap(smp.overlap(m0), how, s)
    q["similarity_initial"] = smp.similarity(m0)
    # crop the planning CT to the aligned CBCT extent + margin
    c = _apply(m0, _corners(fgrid))
    margin = s.moving_crop_margin_mm
    try:
        crop = planning_ct.crop_to_box(c.min(0) - margin, c.max(0) + margin)
    except Exception as e:
        raise RegistrationError(f"CBCT does not overlap the planning CT: {e}") from e
    moving = np.asarray(crop.array, dtype=np.float32)
    mm = soft_tissue_mode(moving[:: 2, :: 2, :: 2].ravel())
    q["planning_tissue_mode_hu"] = mm
    fixed_reg = _window(prep.fixed, prep.tissue_mode, s)
    moving = _window(moving, mm, s)
    return crop, moving, fixed_reg, mm


def _rigid_quality(m_rigid: np.ndarray, m0: np.ndarray, ia, isocenter_lps_mm, smp: _Sampler,
                   cbct: Volume, planning_ct: Volume, valid: np.ndarray, prep: _Prepared,
                   s: RegistrationSettings, q: dict):
    """Refuse a diverged rigid stage; record its overlap, correction (mm), similarity and
    validity; returns (the setup correction it implies, the validity samples)."""
    fgrid = cbct.grid
    q["overlap_rigid"] = smp.overlap(m_rigid)
    q["rigid_correction_mm"] = float(np.linalg.norm(
        _apply(m_rigid, fgrid.center_lps()[None]) - _apply(m0, fgrid.center_lps()[None])))
    if q["overlap_rigid"] < s.quality["min_overlap_fraction"]:
        raise RegistrationError(
            f"rigid stage diverged: only {100 * q['overlap_rigid']:.1f}% of the CBCT maps inside "
            f"the planning CT (correction {q['rigid_correction_mm']:.1f} mm)")
    q["similarity_rigid"] = smp.similarity(m_rigid)
    sc = setup_correction(m_rigid, ia.conventions(), isocenter_lps_mm
                          if isocenter_lps_mm is not None else
                          _apply(m_rigid, fgrid.center_lps()[None])[0])
    q["setup_correction"] = sc.to_record() if sc is not None else None
    vs = _validity_samples(cbct, prep.fmask, prep.body, planning_ct)
    q["validity_rigid"] = _validity(vs, cbct, planning_ct, valid, prep.body, matrix=m_rigid)
    return sc, vs


def _shading_stage(prep: _Prepared, fgrid: Grid, smp: _Sampler, planning_ct: Volume,
                   m_rigid: np.ndarray, planning_mode_hu: float, s: RegistrationSettings,
                   q: dict, timings: dict[str, float]) -> np.ndarray:
    """The CBCT corrected for shading with the rigidly mapped planning CT as prior, windowed
    for the deformable stage; records the correction in ``q`` and its time (s)."""
    with _clock(timings, "shading"):
        fixed_reg, q["shading"] = _shading_corrected(
            prep.fixed, fgrid, smp.centres, planning_ct, m_rigid, prep.metric_mask,
            prep.tissue_mode, planning_mode_hu, s)
    return fixed_reg


def _deformable_stage(fixed_reg: np.ndarray, fgrid: Grid, moving: np.ndarray, moving_grid: Grid,
                      fmask: np.ndarray, deadline: float | None, budget_s: float | None,
                      s: RegistrationSettings, q: dict) -> tuple[list | None, str | None]:
    """The B-spline stage's parameter maps, or None and ``fallback="rigid"`` (reason in
    ``q``) when the time left before ``deadline`` (perf_counter s) is too short or runs out."""
    remaining = None if deadline is None else deadline - time.perf_counter() - s.finish_reserve_s
    if remaining is not None and remaining < s.min_deformable_s:
        q["fallback_reason"] = (f"no time left for the deformable stage ({remaining:.2f} s after "
                                f"rigid, need {s.min_deformable_s} s)")
        return None, "rigid"
    args = (fixed_reg, fgrid, moving, moving_grid, s.parameter_map("bspline"), fmask)
    bmaps = _run_bspline(args, remaining, s.deformable_in_subprocess and remaining is not None)
    if bmaps is None:
        q["fallback_reason"] = f"deformable stage exceeded the budget ({budget_s} s)"
        return None, "rigid"
    return bmaps, None


def _displacement_field(bmaps: list | None, m_rigid: np.ndarray, fgrid: Grid,
                        centres: np.ndarray) -> np.ndarray:
    """The displacement (LPS mm, float32, on the CBCT grid) of rigid ∘ B-spline, or of the
    rigid matrix alone when there is no B-spline result."""
    if bmaps is None:
        return affine_field(m_rigid, centres).astype(np.float32)
    ub = eb.bspline_field(bmaps[-1], fgrid) if len(bmaps) == 1 else None
    if ub is None:
        ub = eb.transform_field(bmaps, fgrid)
    ub = ub.astype(np.float64)
    return (affine_field(m_rigid, centres + ub) + ub).astype(np.float32)


def _final_quality(dvf: np.ndarray, m_rigid: np.ndarray, fgrid: Grid, valid: np.ndarray,
                   body: np.ndarray, smp: _Sampler, vs, cbct: Volume, planning_ct: Volume,
                   q: dict) -> np.ndarray:
    """Record the Jacobian, deformation beyond rigid (mm), similarity, validity and overlap
    of the final field in ``q``; returns the Jacobian determinant on the CBCT grid."""
    if not np.all(np.isfinite(dvf)):
        raise RegistrationError("registration diverged: non-finite displacement")
    det = jacobian_determinant(dvf, fgrid)
    q.update(jacobian_stats(det, valid))
    q.update(deformation_beyond_rigid(dvf, m_rigid, fgrid, body if body.any() else valid))
    q["similarity_final"] = smp.similarity(dvf=dvf)
    q["validity_final"] = _validity(vs, cbct, planning_ct, valid, body, dvf=dvf)
    q["overlap_final"] = smp.overlap(dvf=dvf)
    return det


def _required_overlap(overlap: float, how: str, s: RegistrationSettings) -> float:
    """``overlap`` (share of the CBCT samples mapped inside the planning CT by the initial
    alignment ``how``); raises :class:`RegistrationError` below the minimum."""
    if overlap < s.quality["min_overlap_fraction"]:
        raise RegistrationError(
            f"CBCT and planning CT do not overlap after initial alignment ({how}): only "
            f"{100 * overlap:.1f}% of the CBCT field of view maps inside the "
            f"planning CT (minimum {100 * s.quality['min_overlap_fraction']:.0f}%)")
    return overlap


def _parameters(s: RegistrationSettings, how: str, m0: np.ndarray, budget_s: float | None,
                bmaps: list | None) -> dict:
    """The parameters record of a result: settings, initial alignment and matrix, budget (s),
    threads and the B-spline transform's parameters (without its coefficients)."""
    return {"settings": s.to_dict(), "initial_alignment": how,
            "initial_matrix": m0.tolist(), "budget_s": budget_s, "threads": s.threads,
            "bspline_transform": None if bmaps is None else
            {k: v for k, v in bmaps[-1].items() if k != "TransformParameters"}}


def _refuse_folded_or_diverged(q: dict, s: RegistrationSettings) -> None:
    """Raise :class:`RegistrationError` when the field folds or deforms beyond the limits."""
    if q["jacobian_fraction_nonpositive"] > s.quality["max_fraction_folded"]:
        raise RegistrationError(
            f"registration folds: {100 * q['jacobian_fraction_nonpositive']:.3f}% of the CBCT "
            f"field of view has Jacobian determinant <= 0 (min {q['jacobian_min']:.3f}; "
            f"allowed {100 * s.quality['max_fraction_folded']:.3f}%)")
    if q["deformation_max_mm"] > s.quality["max_deformation_mm"]:
        raise RegistrationError(
            f"registration diverged: deformation beyond rigid reaches "
            f"{q['deformation_max_mm']:.1f} mm inside the body (limit "
            f"{s.quality['max_deformation_mm']} mm)")


_warm = False


def warm_up(config=None) -> float:
    """Run one tiny registration (rigid + B-spline) so a long-lived worker pays the itk import
    and lazy-loading cost (~10-15 s) before the first patient. Returns the time taken (s)."""
    global _warm
    t0 = time.perf_counter()
    g = Grid(shape=(16, 24, 24), origin=(-46.0, -46.0, -30.0), spacing=(4.0, 4.0, 4.0))
    c = g.voxel_centers_lps()
    r = np.sqrt((c[..., 0] / 35) ** 2 + (c[..., 1] / 25) ** 2)
    a = np.where(r < 1, 40.0, -1000.0) + np.where(np.linalg.norm(c - [10, 0, 0], axis=-1) < 10,
                                                  600.0, 0.0)
    rng = np.random.default_rng(0)
    fixed = Volume((a + rng.normal(0, 10, a.shape)).astype(np.float32), g, "HU")
    moving = Volume(a.astype(np.float32), g, "HU")
    s = load_registration_settings(config)
    try:
        # no numba thread pool in the warmed-up process: its stages run in forked children
        # that use the parallel kernels (adaptive.geometry.warp.no_thread_pool)
        with no_thread_pool():
            register(fixed, moving, config=s)
    except RegistrationError as e:  # a tiny featureless pair may fold; loading is the point
        log.info("warm_up_result_refused", error=str(e))
    _warm = True
    return time.perf_counter() - t0
