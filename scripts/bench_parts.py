"""``python scripts/bench_parts.py [registration] [replay] [services]``: parts of ``make bench``,
for comparing two commits on one machine (``PYTHONPATH`` selects the source tree; give each
tree its own ``NUMBA_CACHE_DIR``).

The parts, each the section's own ``run()`` with 3 repeats:

* ``registration``: the per-fraction table (TRE, Dice, times); the pure-shift subsection
  only with ``BENCH_PURE_SHIFT=1``; the gate and conventions subsections left out;
* ``replay``: the archive replay with 1 and 2 workers (fractions per hour);
* ``services``: the receive benchmark and the committed pelvis's sessions through the services;
  the clinical-size case left out.

Used for issue 16's before/after comparison (BENCHMARKS.md, registration section).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from adaptive.bench import bench_registration as br
from adaptive.bench import bench_replay as bp
from adaptive.bench import bench_services as bs


def _left_out(*_args, **_kwargs) -> list[str]:
    return []


def _no_large_case():
    raise RuntimeError("left out of this comparison")


def main(argv: list[str]) -> int:
    if not os.environ.get("BENCH_PURE_SHIFT"):
        br.pure_shift_section = _left_out
    br.gate_section = _left_out
    br.conventions_section = _left_out
    bs._large_case = _no_large_case
    args = argparse.Namespace(repeats=3, smoke=False)
    parts = argv or ["registration", "replay", "services"]
    mods = {"registration": br, "replay": bp, "services": bs}
    for p in parts:
        t0 = time.perf_counter()
        print(mods[p].run(args), flush=True)
        print(f"_({p} took {time.perf_counter() - t0:.1f} s)_", flush=True)
    return 0


if __name__ == "__main__":  # guarded: the replay part's Dask workers re-import this module
    sys.exit(main(sys.argv[1:]))
