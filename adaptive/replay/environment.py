"""The compute environment a fraction was replayed in: what can change float rounding.

Thread counts decide how parallel reductions are split (numba's prange, ITK's per-thread
metric sums, BLAS), so two replays of the same inputs with the same settings agree bit for bit
only in the same environment. Recorded per fraction (``environment.json``) beside the
timings, so a physicist comparing two replays can tell a difference in the environment from a
difference in the inputs, and so a replay that once gave other figures can be traced."""

from __future__ import annotations

import os
import platform
import sys

import numba

from adaptive.registration.elastix_backend import default_thread_count

#: environment variables that set the thread counts of the numeric libraries (an archive's
#: local workers get them as cores ÷ workers: adaptive.replay.archive)
THREAD_VARS = ("NUMBA_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS",
               "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: what the record shows of the environment: the thread counts and how idle threads wait
RECORDED_VARS = (*THREAD_VARS, "OMP_WAIT_POLICY")

_fractions_run = 0


def count_fraction() -> int:
    """Note that this process starts one more fraction; returns how many it ran before."""
    global _fractions_run
    before = _fractions_run
    _fractions_run += 1
    return before


def compute_environment(fractions_before: int) -> dict:
    """This process's numeric environment (JSON-able): pid, Python, numba's thread count and
    threading layer (None before its first parallel region), ITK's default thread count (None
    when itk was not imported by the registration), thread variables, and
    ``fractions_before``: how many fractions this process replayed before the current one
    (:func:`count_fraction`)."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run in this process yet
        layer = None
    return {"pid": os.getpid(), "python": sys.version.split()[0], "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "numba": numba.__version__,
            "numba_threads": int(numba.get_num_threads()), "numba_threading_layer": layer,
            "itk_default_threads": default_thread_count(),
            "env": {k: os.environ.get(k) for k in RECORDED_VARS},
            "fractions_before_in_process": fractions_before}
