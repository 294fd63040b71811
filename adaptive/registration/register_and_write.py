"""Register one fraction end to end (I/O): CBCT + planning CT (+ structures) → DVF, synthetic CT,
propagated RT Struct, Deformable Spatial Registration, registration.json.

Used by the ``adaptive register`` command and by the services' registration worker.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import adaptive.errors as aerr
from adaptive.dicom.ct_series import read_ct_series
from adaptive.dicom.provenance import Provenance
from adaptive.dicom.rtplan import read_rtplan
from adaptive.dicom.rtstruct import read_rtstruct, write_rtstruct
from adaptive.dicom.study import session_study
from adaptive.errors import DicomWriteError, RegistrationError
from adaptive.forked import ChildError, start_in_child
from adaptive.geometry.dvf_io import write_dvf
from adaptive.geometry.volume import Volume
from adaptive.jsonable import write_json_atomic
from adaptive.log import get_logger
from adaptive.model.identity import SeriesInfo
from adaptive.model.structures import StructureSet
from adaptive.registration.core import RegistrationResult, register
from adaptive.registration.dicom_reg import (
    initial_matrix_from_spatial_registration,
    write_deformable_registration,
)
from adaptive.registration.propagate import propagate_structures
from adaptive.registration.quality import affine_field
from adaptive.registration.settings import RegistrationSettings, load_registration_settings
from adaptive.registration.synthetic_ct import (
    extend_synthetic_ct,
    synthetic_ct,
    synthetic_ct_series_info,
    write_synthetic_ct,
)

log = get_logger("adaptive.registration.register_and_write")


#: mappings a gate may allow (see :class:`GateDecision`)
MAPPINGS = ("deformable", "rigid", "none")


@dataclass(frozen=True)
class GateDecision:
    """What a safety gate decided about a registration result: ``mapping`` "deformable" (the
    result may be used), "rigid" (only its rigid match passed: the outputs are made from the
    rigid match) or "none" (no valid registration); ``reason`` and a JSON-able ``record``."""

    mapping: str
    reason: str
    record: dict


Gate = Callable[[RegistrationResult, Volume, Volume, "StructureSet | None"], GateDecision]


def use_rigid_match(result: RegistrationResult, reason: str) -> None:
    """Replace the result's field by its rigid match (``fallback="rigid"``)."""
    centres = result.fixed_grid.voxel_centers_lps()
    result.dvf_lps_mm = affine_field(result.rigid_matrix, centres).astype(np.float32)
    result.jacobian = None  # of the replaced field
    result.fallback = "rigid"
    result.quality["fallback_reason"] = reason


@dataclass
class FractionRegistration:
    """Outputs of :func:`register_fraction` (paths are None when not written)."""

    result: RegistrationResult
    synthetic_ct: Volume  # on the CBCT grid
    synthetic_ct_info: SeriesInfo | None  # the written series (extended, see register_fraction)
    structures: StructureSet | None
    timings_s: dict
    out_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    decision: GateDecision | None = None


def register_fraction(cbct, planning_ct, *, structures=None, isocenter_lps_mm=None,
                      initial_matrix=None, plan=None, spatial_registration=None,
                      budget_s: float | None = None, out_dir: str | Path | None = None,
                      config=None, gate: Gate | None = None) -> FractionRegistration:
    """Register a fraction and (optionally) write its outputs to ``out_dir``.

    ``cbct`` / ``planning_ct``: a DICOM series folder or a ``(Volume, SeriesInfo)`` pair.
    ``structures``: planning RT Struct path or :class:`StructureSet` (planning frame).
    ``plan``: RT Plan path (its first beam's isocenter is used when no isocenter is given).
    ``spatial_registration``: a rigid Spatial Registration file relating the CBCT and planning
    frames.
    ``spatial_registration`` is one candidate of the initial alignment, not an override.
    ``gate``: a safety gate called on the result before anything is derived from it; when it
    allows only the rigid match, the outputs are made from the rigid match
    (:func:`use_rigid_match`). Writes ``dvf.mha`` (3-component float32, CBCT grid, LPS mm),
    ``synthetic_ct/`` (the synthetic CT completed beyond the CBCT's volume with the rigidly
    mapped planning CT, :func:`~adaptive.registration.synthetic_ct.extend_synthetic_ct`: the
    image doses are computed on), ``RS.dcm`` (with structures; it references that synthetic CT
    series), ``REG.dcm`` and ``registration.json``. Every object is written in the session's
    study, the CBCT's (:func:`adaptive.dicom.study.session_study`), in the CBCT's Frame of
    Reference.
    """
    s = load_registration_settings(config)
    T: dict[str, float] = {}
    t0 = time.perf_counter()
    (cb, cb_info), (ct, ct_info), ss = _inputs(cbct, planning_ct, structures)
    if initial_matrix is None and spatial_registration is not None:
        initial_matrix = initial_matrix_from_spatial_registration(
            spatial_registration, cb_info.frame_of_reference_uid, ct_info.frame_of_reference_uid)
    if isocenter_lps_mm is None and plan is not None:
        p = read_rtplan(plan) if isinstance(plan, (str, Path)) else plan
        isocenter_lps_mm = p.beams[0].isocenter_lps_mm
    T["load"] = time.perf_counter() - t0

    result = register(cb, ct, config=s, initial_matrix=initial_matrix,
                      isocenter_lps_mm=isocenter_lps_mm, budget_s=budget_s, cbct_info=cb_info,
                      ct_info=ct_info)
    T["registration"] = result.timings_s["total"]
    decision = None
    if gate is not None:
        t = time.perf_counter()
        decision = _gate_result(gate, result, cb, ct, ss)
        T["gate"] = time.perf_counter() - t
    # outputs on the CBCT's own grid: the mapping evaluated there (analytic B-spline + rigid)
    t = time.perf_counter()
    field = result.field_on(cb.grid)
    T["native_field"] = time.perf_counter() - t
    t = time.perf_counter()
    sct = synthetic_ct(ct, cb, field, config=s)
    T["synthetic_ct"] = time.perf_counter() - t
    today = None
    if ss is not None:
        t = time.perf_counter()
        today = propagate_structures(ss, field, cb.grid, cb_info,
                                     planning_grid=ct.grid, threshold=s.propagation_threshold)
        T["propagation"] = time.perf_counter() - t
    del field
    out = FractionRegistration(result=result, synthetic_ct=sct, synthetic_ct_info=None,
                               structures=today, timings_s=T, decision=decision)
    if out_dir is None:
        return out

    _write_outputs(out, Path(out_dir), cb_info, ct, ct_info, ss, s)
    return out


def _inputs(cbct, planning_ct, structures):
    """((CBCT, info), (planning CT, info), planning structures or None), reading what is given
    as a path (a series folder, an RT Struct file)."""
    cb, cb_info = read_ct_series(cbct) if isinstance(cbct, (str, Path)) else cbct
    ct, ct_info = (read_ct_series(planning_ct) if isinstance(planning_ct, (str, Path))
                   else planning_ct)
    ss = structures
    if isinstance(structures, (str, Path)):
        ss = read_rtstruct(structures, series=ct_info, grid=ct.grid)
    return (cb, cb_info), (ct, ct_info), ss


def _gate_result(gate: Gate, result: RegistrationResult, cb: Volume, ct: Volume, ss):
    """The gate's decision on ``result``; a rigid-only decision turns the result into its
    rigid match (:func:`use_rigid_match`)."""
    # the gate measures on the images the registration measured on (working resolution)
    decision = gate(result, result.fixed_image or cb, result.moving_image or ct, ss)
    if decision.mapping not in MAPPINGS:
        raise RegistrationError(f"gate returned unknown mapping {decision.mapping!r}")
    if decision.mapping == "rigid" and result.fallback is None:
        use_rigid_match(result, f"deformable result failed its checks: {decision.reason}")
    return decision


def _child_result(running, what: str):
    """The result of a child started with :func:`adaptive.forked.start_in_child`; its error
    raised again as the same :mod:`adaptive.errors` class (else :class:`DicomWriteError`)."""
    try:
        return running.result()
    except ChildError as e:
        err = e.as_adaptive_error(f"{what}: ")
        if err is not None:
            raise err from None
        raise DicomWriteError(f"{what}: {e.type_name}: {e.message}") from None
    except aerr.AdaptiveError as e:   # the child died or was killed
        raise DicomWriteError(f"{what}: {e}") from None


def _write_outputs(out: FractionRegistration, od: Path, cb_info: SeriesInfo, ct: Volume,
                   ct_info: SeriesInfo, ss, s: RegistrationSettings) -> None:
    """Write ``dvf.mha``, ``synthetic_ct/``, ``RS.dcm``, ``REG.dcm`` and
    ``registration.json`` into ``od`` (see :func:`register_fraction`); fills ``out.paths``,
    ``out.synthetic_ct_info`` and ``out.out_dir``."""
    T, result, today = out.timings_s, out.result, out.structures
    t = time.perf_counter()
    od.mkdir(parents=True, exist_ok=True)
    inputs = {"cbct_series": cb_info.series_instance_uid,
              "planning_ct_series": ct_info.series_instance_uid}
    if ss is not None and getattr(ss, "sop_instance_uid", ""):
        inputs["planning_rtstruct"] = ss.sop_instance_uid
    prov = Provenance(input_uids=inputs, parameters={"registration": result.parameters,
                                                     "fallback": result.fallback},
                      timings_s={**result.timings_s, **T}, description="adaptive register")
    study = session_study(cb_info)
    # the field on the registration's grid (the CBCT's, block-averaged to the working
    # resolution: the mapping is smooth on that scale); uncompressed (a session output)
    out.paths["dvf"] = write_dvf(od / "dvf.mha", result.dvf_lps_mm, result.fixed_grid,
                                 compress=False)
    full = extend_synthetic_ct(out.synthetic_ct, ct, result.rigid_matrix,
                               air_hu=s.synthetic_ct["air_hu"])
    # the synthetic CT's slices are written by a forked child while this process writes the
    # structure set and the registration that name it (pydicom encoding is single-threaded
    # Python: this puts the second core to work; 188 slices of 550 x 550 take ~3 s)
    # A daemonic process (a Dask worker replaying an archive) may not have children
    # (multiprocessing refuses): there the slices are written here, after the others.
    sct_info = synthetic_ct_series_info(full, cb_info, study)
    write_sct = functools.partial(write_synthetic_ct, full, cb_info, od / "synthetic_ct",
                                  study=study, provenance=prov, planning_ct_info=ct_info,
                                  series=sct_info)
    writing = None if mp.current_process().daemon else start_in_child(write_sct)
    try:
        if today is not None:
            today.referenced_series = sct_info
            write_rtstruct(today, od / "RS.dcm", study=study, provenance=prov, grid=full.grid)
            out.paths["rtstruct"] = od / "RS.dcm"
        write_deformable_registration(od / "REG.dcm", result, cb_info, ct_info, study=study,
                                      registered_series=(sct_info,), provenance=prov)
        out.paths["reg"] = od / "REG.dcm"
    except BaseException:
        if writing is not None:
            with contextlib.suppress(Exception):   # end the child; this error is the one raised
                writing.result()
        raise
    written = (write_sct() if writing is None
               else _child_result(writing, "writing the synthetic CT"))
    if written != sct_info:
        raise DicomWriteError(f"{od / 'synthetic_ct'}: synthetic CT written as "
                              f"{written.series_instance_uid}, not as the series "
                              f"{sct_info.series_instance_uid} its references name")
    out.synthetic_ct_info = written
    out.paths["synthetic_ct"] = od / "synthetic_ct"
    T["write"] = time.perf_counter() - t
    record = {"research_use": "RESEARCH USE ONLY - NOT FOR CLINICAL USE",
              "inputs": inputs, "fallback": result.fallback,
              "initial_alignment": result.initial_alignment,
              "initial_matrix": result.initial_matrix, "rigid_matrix": result.rigid_matrix,
              "quality": result.quality, "timings_s": {**T, "registration_stages": result.timings_s},
              "gate": None if out.decision is None else out.decision.record,
              "parameters": result.parameters,
              "dvf_convention": "CBCT point x (CBCT frame, LPS mm) <-> planning point x + u(x)",
              "outputs": {k: str(v) for k, v in out.paths.items()}}
    write_json_atomic(od / "registration.json", record, sort_keys=True)
    out.paths["json"] = od / "registration.json"
    out.out_dir = od
    log.info("fraction_registered", out_dir=str(od), fallback=result.fallback,
             **{f"t_{k}_s": round(v, 3) for k, v in T.items()})
