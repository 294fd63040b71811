"""Run every benchmark module and print (and optionally save) a Markdown report.

Usage: ``python -m adaptive.bench [--only NAME ...] [--repeats N] [--write BENCHMARKS.md]
[--smoke]``

``--smoke`` runs every section's real code path on its smallest inputs (one repeat, one case,
one fraction, ...): a check that each section still works (tests/test_bench_smoke.py), whose
figures are not the benchmark's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import subprocess
import sys
import time

import adaptive.bench as bench_pkg


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, commit {rev}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaptive.bench")
    p.add_argument("--only", nargs="*", help="run only these benchmark modules (e.g. dose)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", help="also write the report to this Markdown file")
    p.add_argument("--smoke", action="store_true",
                   help="smallest inputs, one repeat: checks that every section runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(bench_pkg.__path__)
                   if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n in args.only]
    out = ["# Benchmarks", "",
           f"Machine: {machine_description()}", "",
           (f"Command: `make bench` (python -m adaptive.bench --repeats {args.repeats}"
            f"{' --smoke' if args.smoke else ''}), "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"), ""]
    print("\n".join(out), flush=True)
    failed = 0
    for name in names:
        mod = importlib.import_module(f"adaptive.bench.bench_{name}")
        t0 = time.perf_counter()
        try:
            section = mod.run(args)
        except Exception as e:  # noqa: BLE001 - a broken benchmark must be visible, not hidden
            failed += 1
            section = f"## {name}\n\nFAILED: {type(e).__name__}: {e}\n"
        section += f"\n_(section took {time.perf_counter() - t0:.1f} s)_\n"
        print(section, flush=True)
        out.append(section)
    if args.write:
        with open(args.write, "w") as f:
            f.write("\n".join(out) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
