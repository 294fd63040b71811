"""Run a function in a forked child process with a deadline, cancellation and progress, so
that the child never outlives its parent.

Native code (elastix, numba) cannot be interrupted in-process and can hold the GIL for tens
of seconds; a forked child can be killed at a deadline and inherits the parent's warmed-up
state. Every child started here:

* gets a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``): when the thread
  that forked it ends (its process killed, ``kill -9`` included), the kernel kills the
  child; so a chain worker -> stage child -> B-spline grandchild dies link by link and
  nothing keeps computing for a dead worker. The child checks that its parent is still the
  one that forked it right after setting the signal (the parent may have died between the
  fork and the ``prctl``).
* sends its result, its error (class name, message, traceback) or progress messages over a
  pipe; the parent waits with a deadline (``timeout_s``) and a cancellation event, and kills
  the child when either passes.

Used by the services' stage workers (:mod:`services.workers.stages`) and by the
registration's deadline-bounded B-spline stage (:mod:`adaptive.registration.core`).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import adaptive.errors as aerr
from adaptive.errors import (
    AdaptiveError,
    ChildCancelledError,
    ChildDiedError,
    ChildTimeoutError,
)

PR_SET_PDEATHSIG = 1
POLL_S = 0.1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) ends.
    Returns False where the call is unavailable (not Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _child_main(conn, parent_pid: int, fn: Callable, args: tuple, kwargs: dict,
                with_progress: bool) -> None:
    set_parent_death_signal()
    if os.getppid() != parent_pid:          # the parent died before the prctl took effect
        os._exit(1)
    # default SIGTERM/SIGINT in the child: a parent's graceful-stop handler must not make a
    # SIGTERM to the child harmless (numba's OpenMP layer answers a parallel region in a
    # child of a process that used its pool with SIGTERM; handled, the region was silently
    # skipped and its output left unwritten; unhandled, the child dies and the caller gets
    # ChildDiedError)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        if with_progress:
            def progress(step, fraction=None, **info):
                conn.send(("progress", step, fraction, info))
            kwargs = dict(kwargs, progress=progress)
        conn.send(("result", fn(*args, **kwargs)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        with contextlib.suppress(Exception):  # unpicklable: the parent sees EOF instead
            conn.send(("error", type(e).__name__, str(e), traceback.format_exc()[-4000:]))
    finally:
        conn.close()
        os._exit(0)


class ChildError(Exception):
    """The function raised in the child: its class name, message and traceback."""

    def __init__(self, type_name: str, message: str, tb: str):
        self.type_name, self.message, self.tb = type_name, message, tb
        super().__init__(f"{type_name}: {message}")

    def as_adaptive_error(self, prefix: str = "") -> AdaptiveError | None:
        """The child's error as the same :mod:`adaptive.errors` class (message ``prefix`` +
        its message), or None when it was not one (or that class takes other arguments)."""
        cls = getattr(aerr, self.type_name, None)
        if not (isinstance(cls, type) and issubclass(cls, AdaptiveError)):
            return None
        try:
            return cls(prefix + self.message)
        except TypeError:
            return None


class RunningChild:
    """A function running in a forked child (:func:`start_in_child`); :meth:`result` waits for
    it. The child is killed when :meth:`result` returns or raises, whatever happened."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, with_progress: bool):
        ctx = mp.get_context("fork")
        self.fn = fn
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, args=(child, os.getpid(), fn, args, kwargs,
                                                           with_progress), daemon=False)
        self._proc.start()
        # not joined by multiprocessing at interpreter exit (a stopping worker must not wait
        # for it): it dies through its parent-death signal, or is killed by result()
        mp.process._children.discard(self._proc)
        child.close()

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    def _name(self) -> str:
        return getattr(self.fn, "__name__", str(self.fn))

    def result(self, *, timeout_s: float | None = None,
               on_progress: Callable[..., None] | None = None,
               cancelled: threading.Event | None = None) -> Any:
        """The function's result; see :func:`call_in_child` for the errors."""
        end = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        proc, conn = self._proc, self._conn
        try:
            while True:
                if cancelled is not None and cancelled.is_set():
                    raise ChildCancelledError(f"{self._name()}: cancelled")
                wait = POLL_S if end is None else min(POLL_S, max(0.0, end - time.monotonic()))
                if conn.poll(wait):
                    try:
                        msg = conn.recv()
                    except EOFError:
                        break
                    if msg[0] == "progress":
                        on_progress(msg[1], msg[2], **msg[3])
                        continue
                    if msg[0] == "result":
                        return msg[1]
                    raise ChildError(msg[1], msg[2], msg[3])
                if end is not None and time.monotonic() >= end:
                    raise ChildTimeoutError(f"{self._name()}: no result within "
                                            f"{timeout_s:.3g} s; child killed")
                if not proc.is_alive() and not conn.poll(0):
                    break
            proc.join(5)
            raise ChildDiedError(f"{self._name()}: child process ended without a result "
                                 f"(exit code {proc.exitcode})")
        finally:
            conn.close()
            if proc.is_alive():
                proc.kill()
            proc.join(5)


def start_in_child(fn: Callable, args: tuple = (), kwargs: dict | None = None, *,
                   with_progress: bool = False) -> RunningChild:
    """Start ``fn(*args, **kwargs)`` in a forked child and return at once; the caller goes on
    with other work and collects the result with :meth:`RunningChild.result` (which it must
    call: that also ends the child). Fork from the thread that owns the process's state
    (the child has only this thread). ``with_progress``: ``fn`` also receives ``progress=``."""
    return RunningChild(fn, args, kwargs or {}, with_progress)


def call_in_child(fn: Callable, args: tuple = (), kwargs: dict | None = None, *,
                  timeout_s: float | None = None,
                  on_progress: Callable[..., None] | None = None,
                  cancelled: threading.Event | None = None,
                  on_start: Callable[[int], None] | None = None) -> Any:
    """``fn(*args, **kwargs)`` in a forked child; returns its result.

    ``on_progress``: when given, ``fn`` also receives ``progress=`` (a callable
    ``progress(step, fraction=None, **info)``) and each call is forwarded here.
    ``timeout_s``: the child is killed after this many seconds (:class:`ChildTimeoutError`).
    ``cancelled``: set it to kill the child at once (:class:`ChildCancelledError`).
    ``on_start(pid)``: told the child's pid. Raises :class:`ChildError` when ``fn`` raised,
    :class:`ChildDiedError` when the child ended without a result (killed, crashed).
    """
    run = start_in_child(fn, args, kwargs, with_progress=on_progress is not None)
    try:
        if on_start is not None:
            on_start(run.pid)
    except BaseException:
        with contextlib.suppress(Exception):
            run.result(timeout_s=0.0)  # ends the child; on_start's error is the one raised
        raise
    return run.result(timeout_s=timeout_s, on_progress=on_progress, cancelled=cancelled)
