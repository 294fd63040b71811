"""Compile the numba kernels into ``NUMBA_CACHE_DIR`` once, before the test workers start.

``make test`` runs this before pytest. On a fresh clone the cache is empty, and without this
step every process that first reaches a kernel compiles it (about 60 s of CPU for the dose
kernels alone): the two xdist workers, and the service workers and Dask workers the
integration tests start, several of them at the same moment, each before any has written the
cache. Here the kernels are compiled by the code paths that use them, with the argument types
they are called with: the committed TG-119 C-shape planned end to end on a coarse grid
(Dij, optimisation, sequencing, plan-dose recalculation with and without the coarse
scatter nodes, independent check), the Dij
operator kernels with both index widths and both precisions, and the registration's mapping
field. Prints the time taken. Run as ``python -m tests.precompile_kernels``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

CASE = Path(__file__).resolve().parents[1] / "replay_data" / "tg119_cshape" / "planning"


def _plan() -> None:
    from adaptive.config import config_path
    from adaptive.dicom import read_ct_series, read_rtstruct
    from adaptive.dose.plan_dose import plan_dose
    from adaptive.optimization.goals import load_goals
    from adaptive.pipeline.planning import PlanSettings, plan_case

    ct, series = read_ct_series(CASE / "CT")
    ss = read_rtstruct(CASE / "RS.dcm", series=series, grid=ct.grid)
    goals = load_goals(config_path("goals", "tg119_cshape.toml"))
    res = plan_case(ct, series, ss, goals,
                    settings=PlanSettings(dose_grid_spacing_mm=10.0, bixel_size_mm=10.0,
                                          correction_rounds=1))
    # the plan dose's coarse scatter nodes (a 10 mm grid alone sums every component at
    # every voxel)
    plan_dose(ct, res.plan, dose_grid_spacing_mm=10.0, scatter_node_mm=20.0)


def _operators() -> None:
    from adaptive.optimization.kernels import SparseOperator, csr_matvec

    rng = np.random.default_rng(0)
    for n_cols in (8, 2**16 + 8):  # uint16 and uint32 column indices
        m = sp.random(50, n_cols, density=min(1.0, 20 / n_cols), format="csr", random_state=rng)
        for dtype in (np.float32, np.float64):
            op = SparseOperator(m, dtype=dtype)
            op.tdot(op.dot(np.ones(n_cols)))
            op.matmat_sparse(sp.identity(n_cols, format="csr")[:, :3])
            csr_matvec(m.astype(dtype), np.ones(n_cols))


def _field() -> None:
    from adaptive.geometry.volume import Grid
    from adaptive.registration.field import mapping_field

    mapping_field(np.eye(4), Grid(shape=(4, 5, 6), origin=np.zeros(3),
                                  spacing=np.full(3, 2.0)))


def main() -> int:
    from adaptive.log import configure_logging

    configure_logging(json=True, level="warning")
    t0 = time.perf_counter()
    _plan()
    _operators()
    _field()
    print(f"numba kernels compiled or loaded from the cache in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
