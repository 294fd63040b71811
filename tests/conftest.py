"""Shared pytest fixtures and helpers."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
os.environ.setdefault("TCP_NODELAY", "1")

# A value we set that violates its VR (e.g. an LO longer than 64 characters) is an error in
# the tests, not a warning: peers may reject or truncate such objects.
import pydicom.config  # noqa: E402

pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE


def require_tool(name: str, package: str) -> str:
    """Path of an external tool. Missing: fail under CI (CI=true), skip on a dev machine."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"required tool {name!r} not found (Debian package {package!r}; `make test` installs it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def dciodvfy():
    """Run dicom3tools' dciodvfy on a file; returns (errors, full output)."""
    import subprocess

    exe = require_tool("dciodvfy", "dicom3tools")

    def run(path) -> tuple[list[str], str]:
        p = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60,
                           check=False)
        out = p.stdout + p.stderr
        errors = [ln for ln in out.splitlines() if ln.startswith("Error")]
        # A crash (e.g. an assertion on 32-bit pixel data) must not pass as "no errors".
        if p.returncode != 0:
            errors.append(f"dciodvfy exited with status {p.returncode}")
        if "Assertion" in out or "Aborted" in out:
            errors.append("dciodvfy crashed: " + out.strip().splitlines()[-1])
        return errors, out

    return run


@pytest.fixture
def refused_port():
    """A 127.0.0.1 port where nothing listens, held for the test: bound but not listening,
    so a connection is refused and no other process can take the port meanwhile."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


def require_peer_python(module: str) -> str:
    """Python of the independent-tools venv (``.venv-peers``, Makefile ``peers``) that can
    import ``module``. Missing: fail under CI, skip elsewhere (like :func:`require_tool`)."""
    import subprocess

    exe = REPO / ".venv-peers" / "bin" / "python"
    ok = exe.is_file() and subprocess.run([str(exe), "-c", f"import {module}"], check=False,
                                          capture_output=True, timeout=120).returncode == 0
    if ok:
        return str(exe)
    msg = f"{module} not importable in {exe} (run `make peers`; `make test` does)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)
