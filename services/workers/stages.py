"""The production worker handlers: thin calls into :mod:`adaptive.pipeline`, the same
stage functions the offline ``adaptive replay`` chain uses.

Task contract (the orchestrator builds the payloads; paths are on the shared store):

registration payload
    ``session_id``, ``patient_id``, ``planning_ct_dir``, ``rtstruct_path``,
    ``rtplan_path``, ``cbct_dir``, ``out_dir``, optional ``spatial_registration`` (a rigid
    Spatial Registration received with the CBCT: one candidate of the initial alignment);
    the budget arrives as the task deadline (``ctx.remaining_s()``).
registration result
    JSON-able dict from the pipeline's registration stage (synthetic CT folder,
    propagated structure set, registration object paths, quality, timings) with
    ``fallback`` = None or ``"rigid"`` when the deadline forced the rigid result, and the
    safety gate's verdict: ``validity`` ("deformable" | "rigid" | "none"),
    ``registration_checks`` (named checks with their numbers), ``review_images``.

planning payload
    as above plus ``registration`` (the registration result) and ``protocol`` (the
    session's clinical protocol ``{"name", "source"}``: the goals it is planned with).
planning result
    ``{"adapted": {"rtplan", "rtstruct", "rtdose", "registration", "checks_passed",
    "checks": [{"name", "passed", "message"}]}, "scheduled": {"rtplan", "rtdose", ...},
    "metrics": {...}, "fallback": None | "best_iterate"}``. Only an adapted plan with
    ``checks_passed`` true is ever offered for hand-off.

If the pipeline's stage functions are not installed, the task fails with
:class:`StageUnavailableError` (the session falls back to the scheduled plan) - there is
no stand-in computation here.

Each stage runs in a child process forked from the worker (:func:`run_in_child`): native
code (ITK/elastix, numba) can hold the GIL for tens of seconds, which would starve the
worker's heartbeat thread and make the broker declare a busy worker dead. The child
inherits the worker's warmed-up state (fork), reports progress and its result over a
pipe, and dies with the worker (PR_SET_PDEATHSIG), so a killed worker leaves no orphan
computing.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import traceback

import adaptive.errors as aerr
from adaptive.errors import StageUnavailableError

REGISTRATION_FN = "service_registration_stage"
PLANNING_FN = "service_planning_stage"


def _pipeline_fn(name: str):
    try:
        mod = importlib.import_module("adaptive.pipeline")
    except ImportError as e:
        raise StageUnavailableError(f"adaptive.pipeline is not installed: {e}") from e
    fn = getattr(mod, name, None)
    if fn is None:
        raise StageUnavailableError(f"adaptive.pipeline has no {name}(); the online "
                                    f"services need it (see services/workers/stages.py)")
    return fn


def _set_pdeathsig() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _child(conn, name: str, kwargs: dict) -> None:
    _set_pdeathsig()
    try:
        fn = _pipeline_fn(name)

        def progress(step, fraction=None, **info):
            conn.send(("progress", step, fraction, info))
        conn.send(("result", fn(**kwargs, progress=progress)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the worker
        conn.send(("error", type(e).__name__, str(e), traceback.format_exc()[-4000:]))
    finally:
        conn.close()
        os._exit(0)


def run_in_child(name: str, kwargs: dict, ctx) -> dict:
    """Run ``adaptive.pipeline.<name>(**kwargs, progress=...)`` in a forked child; forward
    its progress to ``ctx``; return its result or re-raise its error (same
    :mod:`adaptive.errors` class when it is one)."""
    _pipeline_fn(name)  # fail fast, in the worker, when the stage is not installed
    parent, child = mp.get_context("fork").Pipe(duplex=False)
    proc = mp.get_context("fork").Process(target=_child, args=(child, name, kwargs),
                                          daemon=False)  # the stage forks its own helpers
    proc.start()
    # not joined at interpreter exit (a stopping worker must not wait for it): it dies with
    # the task thread via PR_SET_PDEATHSIG, or is killed below
    mp.process._children.discard(proc)
    child.close()
    try:
        while True:
            if parent.poll(0.2):
                try:
                    msg = parent.recv()
                except EOFError:
                    msg = None
                if msg is None:
                    break
                if msg[0] == "progress":
                    ctx.progress(msg[1], msg[2], **msg[3])
                    continue
                if msg[0] == "result":
                    return msg[1]
                cls = getattr(aerr, msg[1], None)
                if isinstance(cls, type) and issubclass(cls, aerr.AdaptiveError):
                    try:
                        raise cls(msg[2])
                    except TypeError:
                        pass
                raise aerr.AdaptiveError(f"{name}: {msg[1]}: {msg[2]}\n{msg[3]}")
            if not proc.is_alive() and not parent.poll(0):
                break
        proc.join(5)
        raise aerr.AdaptiveError(f"{name}: stage process ended without a result "
                                 f"(exit code {proc.exitcode})")
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)


def _bind_session(payload: dict, stage: str) -> None:
    """Every log line of the stage carries the session (and the patient) it works for."""
    from adaptive.log import bind

    bind(session_id=payload.get("session_id"), patient_id=payload.get("patient_id"),
         stage=stage)


def run_registration(payload: dict, arrays: dict, ctx) -> dict:
    _bind_session(payload, "registration")
    ctx.progress("registration", 0.0)
    result = run_in_child(REGISTRATION_FN, {
        "planning_ct_dir": payload["planning_ct_dir"], "rtstruct_path": payload["rtstruct_path"],
        "rtplan_path": payload["rtplan_path"], "cbct_dir": payload["cbct_dir"],
        "out_dir": payload["out_dir"], "budget_s": ctx.remaining_s(),
        "spatial_registration": payload.get("spatial_registration")}, ctx)
    ctx.progress("registration", 1.0)
    return result


def run_planning(payload: dict, arrays: dict, ctx) -> dict:
    _bind_session(payload, "planning")
    ctx.progress("planning", 0.0)
    result = run_in_child(PLANNING_FN, {
        "planning_ct_dir": payload["planning_ct_dir"], "rtstruct_path": payload["rtstruct_path"],
        "rtplan_path": payload["rtplan_path"], "cbct_dir": payload["cbct_dir"],
        "registration": payload["registration"], "out_dir": payload["out_dir"],
        "protocol": payload["protocol"], "budget_s": ctx.remaining_s()}, ctx)
    ctx.progress("planning", 1.0)
    return result


def _warm_up_registration() -> None:
    from adaptive.registration.core import warm_up
    from adaptive.registration.review import preload_plotting

    warm_up()
    preload_plotting()  # the review images' matplotlib import (~1 s), inherited by the fork


run_registration.warm_up = _warm_up_registration
