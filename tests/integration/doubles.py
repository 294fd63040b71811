"""Test doubles for worker services (messaging tests and orchestrator tests without the
compute stages). They do real, checkable work on their inputs; they are NOT stages of the
pipeline and are never configured outside tests."""

from __future__ import annotations

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

def _sleep_env(name):
    """Simulated work: ``$name`` seconds (a stage that takes that long, e.g. past its
    budget); the tests assert what the services do meanwhile or afterwards."""
    s = float(os.environ.get(name, "0") or 0)
    end = time.monotonic() + s
    while time.monotonic() < end:
        time.sleep(0.05)  # deliberate: simulated stage work, in 50 ms steps


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


def registration_double(payload, arrays, ctx):
    """Reads both series' headers and returns the translation between their first slice
    positions (mm); sleeps ADAPTIVE_TEST_REG_SLEEP_S. Not a registration algorithm."""
    from pathlib import Path

    import pydicom

    def first_pos(folder):
        files = sorted(Path(folder).glob("*.dcm"))
        assert files, f"no files in {folder}"
        zs = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        return np.array(min(zs, key=lambda d: float(d.ImagePositionPatient[2]))
                        .ImagePositionPatient, float), len(files)

    ctx.progress("reading", 0.1)
    a, na = first_pos(payload["cbct_dir"])
    b, nb = first_pos(payload["planning_ct_dir"])
    _sleep_env("ADAPTIVE_TEST_REG_SLEEP_S")
    return {"translation_mm": (a - b).tolist(), "cbct_slices": na, "ct_slices": nb,
            "fallback": os.environ.get("ADAPTIVE_TEST_REG_FALLBACK") or None}


def planning_double(payload, arrays, ctx):
    """Writes an 'adapted' RT Plan derived from the scheduled one (new UID, PREDECESSOR
    reference, same structure set) and returns it with checks and the attempt number; sleeps
    ADAPTIVE_TEST_PLAN_SLEEP_S; ADAPTIVE_TEST_FAIL_CHECKS=1 makes the checks fail;
    ADAPTIVE_TEST_PLAN_HOLD=1 holds the first attempt (see _hold_first_attempt)."""
    from pathlib import Path

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    ctx.progress("optimising", 0.0)
    _hold_first_attempt(ctx, payload["out_dir"])
    _sleep_env("ADAPTIVE_TEST_PLAN_SLEEP_S")
    rp = pydicom.dcmread(payload["rtplan_path"])
    out = Path(payload["out_dir"])
    sched_uid = str(rp.SOPInstanceUID)
    rp.SOPInstanceUID = rp.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rp.SeriesInstanceUID = generate_uid()
    rp.RTPlanLabel = "ADAPTED"
    ref = Dataset()
    ref.ReferencedSOPClassUID = rp.SOPClassUID
    ref.ReferencedSOPInstanceUID = sched_uid
    ref.RTPlanRelationship = "PREDECESSOR"
    rp.ReferencedRTPlanSequence = Sequence([ref])
    p = out / "RP_adapted.dcm"
    rp.save_as(p, enforce_file_format=True)
    ok = os.environ.get("ADAPTIVE_TEST_FAIL_CHECKS", "") != "1"
    ctx.progress("optimising", 1.0)
    return {"adapted": {"rtplan": str(p), "rtstruct": payload["rtstruct_path"],
                        "checks_passed": ok,
                        "checks": [{"name": "double", "passed": ok,
                                    "message": "" if ok else "forced failure"}]},
            "scheduled": {"rtplan": payload["rtplan_path"]}, "attempt": ctx.attempt,
            "metrics": {"translation_mm": payload["registration"]["translation_mm"]}}
