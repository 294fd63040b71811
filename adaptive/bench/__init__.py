"""Benchmarks (`make bench`). Each ``bench_<stage>.py`` module defines ``run(args) -> str``
returning a Markdown section with its figures (median and spread over repeats)."""
