"""Whether a stage result may be used by a session: the orchestrator's boundary for worker
output (the broker has already checked that the result came from the worker holding the
task, :mod:`services.messaging`).

A result is accepted only if

* it is a valid typed record of its stage (:mod:`adaptive.pipeline.records`);
* its ``session_id`` and ``patient_id`` are the session's, and the series it was computed
  from are the session's (registration: the CBCT, planning CT and scheduled plan the task
  named; planning: the scheduled plan and the session's registration outputs);
* every file it names lies under the session's folder ``sessions/<session_id>/`` or is one
  of the session's own planning files, has a SHA-256 in ``files``, and its content has that
  hash now.

Anything else raises :class:`~adaptive.errors.ResultRefusedError` naming the reason; the
session publishes ``result_refused`` and never uses the record.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from adaptive.errors import ResultRefusedError
from adaptive.pipeline.records import (
    RECORDS,
    PlanningRecord,
    RegistrationRecord,
    SealedRecord,
    sha256_file,
)


def _real(p: str | Path) -> str:
    return os.path.realpath(p)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def allowed_inputs(s) -> set[str]:
    """The session's own planning files (real paths): results may name these besides the
    session folder (the scheduled plan travels with the planning record)."""
    out = {_real(p) for p in (s.planning.get("rtplan"), s.planning.get("rtstruct")) if p}
    ct = s.planning.get("ct_dir")
    if ct:
        out |= {_real(p) for p in Path(ct).glob("*.dcm")}
    return out


def check_files(rec: SealedRecord, session_dir: Path, inputs: set[str]) -> None:
    """Every named file under ``session_dir`` (or in ``inputs``), hashed, hash matching."""
    folder = _real(session_dir)
    for f in rec.named_files():
        real = _real(f)
        if not (_under(real, folder) or real in inputs):
            raise ResultRefusedError(f"names {f}, outside the session folder {session_dir}")
        want = rec.files.get(f)
        if want is None:
            raise ResultRefusedError(f"names {f} without its content hash")
        try:
            got = sha256_file(real)
        except OSError as e:
            raise ResultRefusedError(f"names {f}, which cannot be read: {e}") from None
        if got != want:
            raise ResultRefusedError(f"{f}: content hash {got[:16]}... is not the recorded "
                                     f"{want[:16]}...")


def verify_result(s, stage: str, result: dict, sessions_root: Path) -> SealedRecord:
    """The typed record of ``result`` if session ``s`` may use it (see the module doc)."""
    model = RECORDS.get(stage)
    if model is None:
        raise ResultRefusedError(f"unknown stage {stage!r}")
    try:
        rec = model.model_validate(result)
    except ValidationError as e:
        raise ResultRefusedError(f"not a valid {stage} record: {str(e)[:800]}") from None
    if rec.session_id != s.session_id:
        raise ResultRefusedError(f"is for session {rec.session_id!r}, not {s.session_id!r}")
    if rec.patient_id != s.patient_id:
        raise ResultRefusedError(f"is for patient {rec.patient_id!r}, not {s.patient_id!r}")
    if isinstance(rec, RegistrationRecord):
        want = {"cbct_series_uid": (s.cbct or {}).get("series_uid"),
                "planning_ct_series_uid": s.planning.get("ct_series_uid"),
                "scheduled_plan_uid": s.planning.get("rtplan_uid")}
        for k, v in want.items():
            if getattr(rec, k) != v:
                raise ResultRefusedError(f"{k} {getattr(rec, k)!r} is not the session's {v!r}")
        pid = str(rec.study.patient.get("patient_id", "")).strip(" ")
        if pid != s.patient_id.strip(" "):
            raise ResultRefusedError(f"study of patient {pid!r}, not {s.patient_id!r}")
    elif isinstance(rec, PlanningRecord):
        if _real(rec.scheduled.rtplan) != _real(s.planning.get("rtplan", "")):
            raise ResultRefusedError(f"scheduled plan {rec.scheduled.rtplan} is not the "
                                     f"session's {s.planning.get('rtplan')}")
        if rec.scheduled.rtplan_uid not in (None, s.planning.get("rtplan_uid")):
            raise ResultRefusedError(f"scheduled plan UID {rec.scheduled.rtplan_uid} is not "
                                     f"the session's {s.planning.get('rtplan_uid')}")
        reg = s.registration or {}
        for k, rk in (("synthetic_ct_dir", "synthetic_ct_dir"), ("rtstruct", "rtstruct")):
            v = getattr(rec.adapted, k)
            if v is not None and _real(v) != _real(reg.get(rk) or ""):
                raise ResultRefusedError(f"adapted.{k} {v} is not the session's registration "
                                         f"output {reg.get(rk)}")
    check_files(rec, sessions_root / s.session_id, allowed_inputs(s))
    return rec
