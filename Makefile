# adaptive: online adaptive radiotherapy pipeline (research use only).
# `make demo` and `make test` do all setup from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS ?= 2
export TCP_NODELAY := 1
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup system-deps peers test demo bench bench-smoke lint clean replay-data

setup: $(STAMP)

# Re-install only when pyproject.toml changes: re-running `make setup` is fast.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Independent DICOM tools the tests compare our objects with, in their own venv: rt-utils
# ships a top-level `tests` package that would shadow this repository's `tests` in .venv.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
PEER_PACKAGES := rt-utils==1.2.7 pydicom==3.0.2 numpy==2.4.6 opencv-python==5.1.0.95
peers: $(PEERS_STAMP)
$(PEERS_STAMP): Makefile
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q $(PEER_PACKAGES)
	touch $(PEERS_STAMP)

# Debian tools the tests use as real DICOM peers/validators. Installed when
# missing and running as root; otherwise the tests that need them fail naming the tool.
SYSTEM_TOOLS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc openssl:openssl plastimatch:plastimatch chromium:chromium
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do cmd=$${t%%:*}; pkg=$${t##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    systemctl disable --now orthanc >/dev/null 2>&1 || service orthanc stop >/dev/null 2>&1 || true; \
	  else echo "WARNING: missing Debian packages:$$missing (not root; tests needing them will fail)"; fi; \
	fi

# Two pytest workers (whole files each, so module fixtures are built once): on 2 cores
# shared with other work, two runnable test processes get a fairer share of the CPU and
# overlap their waits (process start-up, idle timeouts); every test binds its own ports
# (port 0) and temp dirs, so they run side by side. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
# The numba kernels are compiled into NUMBA_CACHE_DIR once first (tests/precompile_kernels.py):
# on a fresh clone every process would otherwise compile them itself, several at once.
# --durations: where the suite's time goes, in every CI log.
test: setup system-deps peers
	$(PY) -m tests.precompile_kernels
	$(PY) -m pytest -q -ra --durations=15 -m "not long_bench" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

demo: setup system-deps
	$(VENV)/bin/adaptive demo

bench: setup system-deps
	$(PY) -m adaptive.bench --write BENCHMARKS.md

# every bench section end to end on its smallest inputs (tests/test_bench_smoke.py; ~7 min)
bench-smoke: setup system-deps peers
	$(PY) -m pytest -q -ra tests/test_bench_smoke.py

replay-data: setup
	$(VENV)/bin/adaptive replay-data build

# ruff (rules in pyproject.toml) and the import-layering contract (.importlinter).
lint: setup
	$(VENV)/bin/ruff check adaptive services tests scripts
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) $(PEERS) .cache .pytest_cache
