"""A non-editable install works away from the source checkout: ``pip install .`` (a wheel built
from this repository) into a fresh venv, then the CLI, the packaged configuration and a real
command run from another directory.

The fresh venv gets its third-party dependencies from the test's own environment through a
``.pth`` line (a path entry: the editable install's hooks there are not run), so the test
installs only our package and takes seconds; what it checks is that the wheel alone carries
the code and ``config/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pydicom
import pytest

REPO = Path(__file__).resolve().parent.parent
PLANNING = REPO / "replay_data" / "pelvis01" / "planning"

pytestmark = pytest.mark.slow

#: run by the installed interpreter: where the code and the configuration come from
PROBE = """
import json, adaptive, services, adaptive.config as c, services.config as s
from adaptive.optimization.protocols import load_protocol
from adaptive.registration.settings import load_registration_settings
cfg = s.load_services_config()
b = s.load_budgets()
print(json.dumps({"adaptive": adaptive.__file__, "services": services.__file__,
                  "config": str(c.config_dir()), "services_toml": str(cfg.source),
                  "gateway_port": cfg.gateway.port, "end_to_end_s": b.end_to_end_s,
                  "protocol": load_protocol("prostate").source,
                  "registration": str(load_registration_settings().source)}))
"""


def _run(argv, cwd, env, timeout=300):
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert p.returncode == 0, f"{argv}: {p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin folder, a working directory outside the checkout, env)."""
    tmp = tmp_path_factory.mktemp("install")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # non-editable: pip builds a wheel from the checkout (build isolation, as `pip install .`)
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
          str(REPO)], cwd=tmp, env=env, timeout=600)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_run([str(py), "-c", where], cwd=tmp, env=env).strip())
    (purelib / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return py, venv / "bin", elsewhere, env, purelib


def test_installed_package_is_the_wheel_with_its_config(installed):
    py, _, cwd, env, purelib = installed
    out = _run([str(py), "-c", PROBE], cwd=cwd, env=env)
    got = json.loads(out.strip().splitlines()[-1])
    for key in ("adaptive", "services", "config", "services_toml", "protocol", "registration"):
        assert Path(got[key]).resolve().is_relative_to(purelib.resolve()), (key, got[key])
    assert Path(got["config"]).name == "_config"
    # the packaged files are the repository's config, read with the same models
    with (REPO / "config" / "services.toml").open("rb") as f:
        assert got["gateway_port"] == tomllib.load(f)["gateway"]["port"]
    with (REPO / "config" / "budgets.toml").open("rb") as f:
        assert got["end_to_end_s"] == tomllib.load(f)["end_to_end"]["budget_s"]


def test_installed_cli_runs_a_command_from_another_directory(installed):
    _, bindir, cwd, env, _ = installed
    out = _run([str(bindir / "adaptive"), "--help"], cwd=cwd, env=env)
    assert "RESEARCH USE ONLY" in out and "demo" in out and "replay" in out
    inv = json.loads(_run([str(bindir / "adaptive"), "info", str(PLANNING), "--json"],
                          cwd=cwd, env=env))
    # independent count: every CT slice file of the planning folder, read with pydicom
    slices = [f for f in (PLANNING / "CT").glob("*.dcm")
              if pydicom.dcmread(f, stop_before_pixels=True).Modality == "CT"]
    uid = pydicom.dcmread(slices[0], stop_before_pixels=True).SeriesInstanceUID
    ct = [s for s in inv["series"] if s["series_instance_uid"] == uid]
    assert len(ct) == 1 and ct[0]["modality"] == "CT" and ct[0]["n_instances"] == len(slices)
