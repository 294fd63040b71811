"""Test doubles for worker services (messaging tests and orchestrator tests without the
compute stages). They do real, checkable work on their inputs; they are NOT stages of the
pipeline and are never configured outside tests."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def array_sum(payload, arrays, ctx):
    """Service 'sum': returns the float64 sum of every array and sleeps payload['sleep_s']."""
    ctx.progress("summing", 0.0)
    time.sleep(float(payload.get("sleep_s", 0.0)))  # deliberate: simulated work of a set length
    sums = {k: float(np.asarray(v, dtype=np.float64).sum()) for k, v in arrays.items()}
    ctx.progress("summing", 1.0)
    doubled = {k: np.asarray(v) * 2 for k, v in arrays.items()}
    return {"sums": sums, "pid": os.getpid(), "attempt": ctx.attempt}, doubled


def failing(payload, arrays, ctx):
    from adaptive.errors import RegistrationError

    raise RegistrationError(f"cannot register: {payload.get('why', 'test')}")


# --- stage doubles for orchestrator tests (no compute stages needed) -----------------
# They return the same typed, sealed records as the real stages (adaptive.pipeline.records
# through services.workers.stages.seal): a double that drifts from the real format fails.


def _sleep_env(name, ctx):
    """Simulated work: ``$name`` seconds (a stage that takes that long, e.g. past its
    budget); stops early, like a real stage, when the broker cancels the task."""
    s = float(os.environ.get(name, "0") or 0)
    end = time.monotonic() + s
    while time.monotonic() < end:
        if ctx.cancelled.wait(0.05):  # deliberate: simulated stage work, in 50 ms steps
            from adaptive.errors import ChildCancelledError

            raise ChildCancelledError(f"{name}: cancelled by the broker")


HOLD_LIMIT_S = 300.0


def _hold_first_attempt(ctx, out_dir: str) -> None:
    """With ADAPTIVE_TEST_PLAN_HOLD=1, the first attempt of the task announces itself
    (file ``held-by-<pid>`` in ``out_dir``) and then holds until its worker is killed, so a
    test can kill the worker while it certainly has the task (no timing window); a
    re-issued attempt runs normally. Bounded: fails after HOLD_LIMIT_S."""
    from pathlib import Path

    if os.environ.get("ADAPTIVE_TEST_PLAN_HOLD") != "1" or ctx.attempt != 1:
        return
    (Path(out_dir) / f"held-by-{os.getpid()}").touch()
    end = time.monotonic() + HOLD_LIMIT_S
    while time.monotonic() < end:
        time.sleep(0.05)  # deliberate: holding the task until the test kills this worker
    raise TimeoutError(f"held task not killed within {HOLD_LIMIT_S:g} s")


def _hold_until_released(ctx, out_dir: str) -> None:
    """With ADAPTIVE_TEST_PLAN_RELEASE=<file>, every planning task announces itself (file
    ``held-by-<pid>`` in ``out_dir``) and waits until ``<file>`` exists, so a test can act
    (e.g. kill the orchestrator) while the stage certainly runs. Bounded: HOLD_LIMIT_S."""
    from pathlib import Path

    release = os.environ.get("ADAPTIVE_TEST_PLAN_RELEASE")
    if not release:
        return
    (Path(out_dir) / f"held-by-{os.getpid()}").touch()
    end = time.monotonic() + HOLD_LIMIT_S
    while not Path(release).exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{release} not created within {HOLD_LIMIT_S:g} s")
        if ctx.cancelled.wait(0.05):  # deliberate: held until the test releases it
            from adaptive.errors import ChildCancelledError

            raise ChildCancelledError("held planning task cancelled")


def _first_slice(folder):
    from pathlib import Path

    import pydicom

    files = sorted(Path(folder).glob("*.dcm"))
    assert files, f"no files in {folder}"
    zs = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return min(zs, key=lambda d: float(d.ImagePositionPatient[2])), len(files)


def registration_double(payload, arrays, ctx):
    """Reads both series' headers and records the translation between their first slice
    positions (mm) as the rigid matrix; writes a "synthetic CT" (the CBCT's slices as a new
    series in the CBCT's study and frame), the planning structure set re-issued in that
    study, and a JSON report; sleeps ADAPTIVE_TEST_REG_SLEEP_S. Not a registration
    algorithm; its record is a real RegistrationRecord."""
    from pathlib import Path

    import pydicom
    from pydicom.uid import generate_uid

    from services.workers.stages import seal

    ctx.progress("reading", 0.1)
    cb, na = _first_slice(payload["cbct_dir"])
    ct, nb = _first_slice(payload["planning_ct_dir"])
    t = (np.array(cb.ImagePositionPatient, float) - np.array(ct.ImagePositionPatient, float))
    _sleep_env("ADAPTIVE_TEST_REG_SLEEP_S", ctx)
    out = Path(payload["out_dir"])
    sct = out / "synthetic_ct"
    sct.mkdir(parents=True, exist_ok=True)
    sct_series = generate_uid()
    for f in sorted(Path(payload["cbct_dir"]).glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = sct_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = "synthetic CT (test double)"
        ds.save_as(sct / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    rs = pydicom.dcmread(payload["rtstruct_path"])
    rs.SOPInstanceUID = rs.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rs.StudyInstanceUID = cb.StudyInstanceUID
    rs.SeriesInstanceUID = generate_uid()
    rs.save_as(out / "RS.dcm", enforce_file_format=True)
    rp = pydicom.dcmread(payload["rtplan_path"], stop_before_pixels=True)
    m = np.eye(4)
    m[:3, 3] = -t
    (out / "registration.json").write_text(json.dumps({"translation_mm": t.tolist()}))
    rec = {"synthetic_ct_dir": str(sct), "rtstruct": str(out / "RS.dcm"),
           "rtstruct_uid": str(rs.SOPInstanceUID),
           "registration_json": str(out / "registration.json"),
           "rigid_matrix": m.tolist(), "frame_of_reference_uid": str(cb.FrameOfReferenceUID),
           "study": {"patient": {"patient_id": str(cb.PatientID)},
                     "study_instance_uid": str(cb.StudyInstanceUID)},
           "cbct_series_uid": str(cb.SeriesInstanceUID), "synthetic_ct_series_uid": sct_series,
           "planning_ct_series_uid": str(ct.SeriesInstanceUID),
           "scheduled_plan_uid": str(rp.SOPInstanceUID),
           "quality": {"translation_mm": t.tolist(), "cbct_slices": na, "ct_slices": nb},
           "fallback": os.environ.get("ADAPTIVE_TEST_REG_FALLBACK") or None,
           "validity": "deformable", "registration_summary": "test double"}
    return seal("registration", rec, payload)


def planning_double(payload, arrays, ctx):
    """Writes an 'adapted' RT Plan derived from the scheduled one (new UID, PREDECESSOR
    reference, the propagated structure set, the session's study and frame) and returns a
    PlanningRecord with checks; sleeps ADAPTIVE_TEST_PLAN_SLEEP_S;
    ADAPTIVE_TEST_FAIL_CHECKS=1 makes the checks fail; ADAPTIVE_TEST_PLAN_HOLD=1 holds the
    first attempt (see _hold_first_attempt)."""
    from pathlib import Path

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    from services.workers.stages import seal

    ctx.progress("optimising", 0.0)
    _hold_first_attempt(ctx, payload["out_dir"])
    _hold_until_released(ctx, payload["out_dir"])
    _sleep_env("ADAPTIVE_TEST_PLAN_SLEEP_S", ctx)
    reg = payload["registration"]
    rp = pydicom.dcmread(payload["rtplan_path"])
    out = Path(payload["out_dir"])
    sched_uid = str(rp.SOPInstanceUID)
    rp.SOPInstanceUID = rp.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rp.SeriesInstanceUID = generate_uid()
    rp.StudyInstanceUID = reg["study"]["study_instance_uid"]
    rp.FrameOfReferenceUID = reg["frame_of_reference_uid"]
    rp.RTPlanLabel = "ADAPTED"
    ref = Dataset()
    ref.ReferencedSOPClassUID = rp.SOPClassUID
    ref.ReferencedSOPInstanceUID = sched_uid
    ref.RTPlanRelationship = "PREDECESSOR"
    rp.ReferencedRTPlanSequence = Sequence([ref])
    rs = Dataset()
    rs.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    rs.ReferencedSOPInstanceUID = reg["rtstruct_uid"]
    rp.ReferencedStructureSetSequence = Sequence([rs])
    p = out / "RP_adapted.dcm"
    rp.save_as(p, enforce_file_format=True)
    ok = os.environ.get("ADAPTIVE_TEST_FAIL_CHECKS", "") != "1"
    ctx.progress("optimising", 1.0)
    rec = {"adapted": {"rtplan": str(p), "rtplan_uid": str(rp.SOPInstanceUID),
                       "rtstruct": reg["rtstruct"], "rtstruct_uid": reg["rtstruct_uid"],
                       "synthetic_ct_dir": reg["synthetic_ct_dir"], "checks_passed": ok,
                       "checks": [{"name": "double", "passed": ok,
                                   "message": "" if ok else "forced failure"}]},
           "scheduled": {"rtplan": payload["rtplan_path"], "rtplan_uid": sched_uid},
           "metrics": {"translation_mm": reg["quality"]["translation_mm"]},
           "protocol": payload.get("protocol")}
    return seal("planning", rec, payload)


# --- process hygiene (tests/test_services_process_hygiene.py) -------------------------


def _sleeper(seconds: float, pid_file: str) -> float:
    from pathlib import Path

    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)  # deliberate: simulated compute of a set length (killed earlier)
    return seconds


def _forked_tree(seconds: float, pid_dir: str) -> float:
    from pathlib import Path

    from adaptive.forked import call_in_child

    Path(pid_dir, "child").write_text(str(os.getpid()))
    return call_in_child(_sleeper, (seconds, str(Path(pid_dir, "grandchild"))))


def forked_tree(payload, arrays, ctx):
    """Service 'tree': like the registration stage, a forked stage child (the worker's)
    that forks its own grandchild (like the B-spline stage), both through
    :func:`adaptive.forked.call_in_child`; both write their pids to ``payload['pid_dir']``
    and sleep ``payload['seconds']``. Cancellable (``ctx.cancelled``)."""
    from adaptive.forked import call_in_child

    ctx.progress("forking", 0.0)
    value = call_in_child(_forked_tree, (float(payload["seconds"]), payload["pid_dir"]),
                          cancelled=ctx.cancelled)
    return {"slept_s": value, "attempt": ctx.attempt}
