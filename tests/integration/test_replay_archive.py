"""Archive replay end to end: a small archive exported like a clinic's (2 patients × 2
fractions of the coarse pelvis phantom, one daily image with a corrupt slice) replayed on a
Dask LocalCluster of two worker processes. Checked against `adaptive replay` run on each
fraction alone, against the bytes of the written reports, in headless Chromium, and by
pulling the archive back from a real Orthanc."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive.pipeline.planning import PlanSettings
from adaptive.replay.archive import ClusterSettings, plan_jobs, replay_archive
from adaptive.replay.chain import ChainSettings
from adaptive.replay.discover import discover
from adaptive.replay.export import build_cases, corrupt_series, export_archive
from tests.conftest import require_tool
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SPACING_MM = 6.0  # coarse: the whole module stays within a few minutes on 2 cores
PLAN = {"dose_grid_spacing_mm": 6.0, "bixel_size_mm": 10.0}
CLI_PLAN = ["--dose-grid-mm", "6", "--bixel-mm", "10"]
CASES = [("arch_p1", 4101), ("arch_p2", 4202)]


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    cases = build_cases(root / "cases", CASES, fractions=2, spacing_mm=SPACING_MM,
                        plan_settings=PlanSettings(**PLAN))
    archive = export_archive(cases, root / "archive")
    # the bad series: patient 2's second daily image, one slice's pixel data cut short
    bad_uid = json.loads((cases[1].fractions[1] / "truth" / "truth.json").read_text())[
        "cbct_series_uid"]
    bad_files = [f for f in archive.rglob("IM*") if _series_uid(f) == bad_uid]
    assert len(bad_files) > 5
    corrupt_series(bad_files)
    said: list[str] = []
    env_before = dict(os.environ)
    res = replay_archive(archive, root / "out", chain=ChainSettings(**PLAN),
                         cluster=ClusterSettings(n_workers=2), progress=False,
                         announce=said.append)
    return {"root": root, "cases": cases, "archive": archive, "out": root / "out",
            "result": res, "said": said, "bad_uid": bad_uid, "env_before": env_before,
            "env_after": dict(os.environ)}


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _cbct_uid(fx: Path) -> str:
    return json.loads((fx / "truth" / "truth.json").read_text())["cbct_series_uid"]


def _rows(replayed) -> dict[str, dict]:
    return {r["cbct_series_uid"]: r for r in replayed["result"].rows}


def _difference(archived: Path, single: Path, rows_a: list, rows_s: list) -> str:
    """What to look at when the two replays disagree: the differing goal rows, each run's
    compute environment (thread counts, fractions its process ran before) and where the
    chain first diverged (rigid matrix, initial alignment, B-spline result)."""
    out = [f"goal rows: archive {a} | alone {b}" for a, b in zip(rows_a, rows_s) if a != b]
    for name, d in (("archive", archived), ("alone", single)):
        env = json.loads((d / "environment.json").read_text())
        reg = json.loads((d / "registration_result.json").read_text())
        init = reg.get("initial_alignment") or {}
        out.append(f"{name}: environment {env}")
        out.append(f"{name}: rigid {reg['rigid_matrix']} initial "
                   f"{init.get('matrix') if isinstance(init, dict) else init} fallback {reg['fallback']} "
                   f"dvf sha1 {_sha1(d / 'dvf.mha')}")
    return "\n".join(out)


def _sha1(path: Path) -> str:
    import hashlib

    return hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "-"


def test_discovery_finds_every_fraction_with_its_own_plan(replayed):
    contents = discover(replayed["archive"])
    assert sorted(contents.patients()) == sorted(c.patient_id for c in replayed["cases"])
    assert len(contents.fractions) == 4 and not contents.unusable  # headers of all 4 read
    for c in replayed["cases"]:
        mine = [f for f in contents.fractions if f.patient_id == c.patient_id]
        assert sorted(f.cbct.series_instance_uid for f in mine) == \
            sorted(_cbct_uid(fx) for fx in c.fractions)
        assert [f.label for f in mine] == ["fx01", "fx02"]
        plan_uid = _series_uid(c.directory / "planning" / "RP.dcm")
        ct_uid = _series_uid(next((c.directory / "planning" / "CT").glob("*.dcm")))
        for f in mine:
            assert _series_uid(Path(f.planning.rtplan)) == plan_uid
            assert f.planning.planning_ct.series_instance_uid == ct_uid
            assert f.truth is not None and f.matched_by == "the patient's only scheduled plan"


def test_bad_series_fails_alone_with_its_reason(replayed):
    rows = _rows(replayed)
    bad = rows[replayed["bad_uid"]]
    assert bad["status"] == "failed" and bad["failed_stage"] == "chain"
    assert "MissingPixelDataError" in bad["reason"] or "pixel" in bad["reason"].lower(), bad
    assert any("FAILED" in s and bad["fraction"] in s for s in replayed["said"])
    good = [r for r in rows.values() if r is not bad]
    assert len(good) == 3 and all(r["status"] == "done" for r in good)
    # the failed fraction has its page and record too
    d = replayed["out"] / Path(bad["report"]).parent
    rec = json.loads((d / "fraction.json").read_text())
    assert rec["status"] == "failed" and rec["reason"] == bad["reason"]
    assert bad["reason"].split(":")[0] in (d / "report.html").read_text()


def test_the_callers_environment_is_left_as_it_was(replayed):
    """Dask writes the workers' pre-spawn variables into the calling process; left there,
    NUMBA_NUM_THREADS=1 made every later numba compilation in the caller fail."""
    assert replayed["env_after"] == replayed["env_before"]


def test_each_worker_computes_with_its_share_of_the_cores(replayed):
    """Two worker processes on this machine: each runs numba's pool with cores ÷ 2 threads,
    as recorded by the fraction itself (the variables given as the Nanny's ``env`` arrive
    after numba's import and were ignored: every worker ran the machine's core count)."""
    share = max(1, (os.cpu_count() or 1) // 2)
    done = [r for r in replayed["result"].rows if r["status"] == "done"]
    assert len(done) == 3
    for r in done:
        env = json.loads((replayed["out"] / Path(r["report"]).parent /
                          "environment.json").read_text())
        assert env["numba_threads"] == share, env
        assert env["env"]["NUMBA_NUM_THREADS"] == str(share), env
        assert env["numba_threading_layer"] is not None, env  # the kernels did run parallel code


# One fresh process runs `adaptive replay` (the CLI's main, with the physicist's arguments)
# on each fraction in turn and prints each exit status: a process running several
# fractions, as an archive worker does, without paying the itk and numba start-up (about
# 25 s of CPU) once per fraction. In the pytest process (after other test modules) the
# figures once differed from both a fresh process and the archive's workers (cause not
# found; see the issue-15 note), so it is not run here.
_REPLAY_EACH = """
import json, sys
from adaptive.cli import main
print(json.dumps([main(["replay", fx, "-o", out, *sys.argv[2:]])
                  for fx, out in json.loads(sys.argv[1])]))
"""


def test_reports_equal_adaptive_replay_of_each_fraction(replayed, tmp_path):
    rows = _rows(replayed)
    todo = [(c, fx) for c in replayed["cases"] for fx in c.fractions
            if _cbct_uid(fx) != replayed["bad_uid"]]
    outs = [tmp_path / f"{c.name}-{fx.name}" for c, fx in todo]
    run = subprocess.run([sys.executable, "-c", _REPLAY_EACH,
                          json.dumps([[str(fx), str(o)] for (_, fx), o in zip(todo, outs)]),
                          *CLI_PLAN], check=False, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    codes = json.loads(run.stdout.strip().splitlines()[-1])
    # 2: replayed, but the adapted plan did not pass
    assert len(codes) == len(todo) and all(rc in (0, 2) for rc in codes), \
        (codes, run.stderr[-2000:])
    for (c, fx), one in zip(todo, outs):
        uid = _cbct_uid(fx)
        single = json.loads((one / "comparison.json").read_text())
        row = rows[uid]
        if row["goals"] != single["rows"]:
            archived = replayed["out"] / Path(row["report"]).parent
            pytest.fail(f"{c.name} {fx.name}: the archive's goal rows differ from "
                        f"`adaptive replay` on the fraction alone\n"
                        f"{_difference(archived, one, row['goals'], single['rows'])}")
        assert row["goals_met_scheduled"] == single["scheduled_goals_passed"]
        assert row["goals_met_adapted"] == single["adapted_goals_passed"]
        d95 = next(r for r in single["rows"] if r["structure"] == "PTV"
                   and r["goal"].startswith("D95"))
        assert row["target_d95_scheduled_gy"] == d95["scheduled_value"]
        assert row["target_d95_adapted_gy"] == d95["adapted_value"]
        # the same key: same inputs (bytes), software and settings as the archive run
        assert json.loads((one / "fraction.json").read_text())["fraction_key"] == \
            row["fraction_key"]
        # the page shows the record's numbers, and its DVHs (recomputed from the RT Dose
        # and RT Struct files) reproduce them to the RT Dose's storage precision
        page = (replayed["out"] / row["report"]).read_text()
        assert f"{d95['adapted_value']:.2f} Gy" in page
        assert row["dvh_table_max_diff"] < 0.01


def test_summary_table_has_one_row_per_fraction(replayed):
    out = replayed["out"]
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    by_uid = {r["cbct_series_uid"]: r for r in table}
    assert by_uid[replayed["bad_uid"]]["status"] == "failed"
    assert by_uid[replayed["bad_uid"]]["reason"]
    for r in table:
        if r["status"] == "done":
            assert float(r["target_d95_adapted_gy"]) > 0 and int(r["n_goals"]) == 12
            assert (out / r["report"]).is_file()
    index = (out / "index.html").read_text()
    assert index.count('href="') >= 4 and "Failed fractions" in index


@pytest.fixture
def dask_cluster(tmp_path):
    """An existing Dask cluster: a scheduler and one worker process, started as a cluster
    administrator would (their command lines), on 127.0.0.1."""
    import os
    import sys

    from distributed import Client

    sf = tmp_path / "scheduler.json"
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                               "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sf)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        wait_until(sf.is_file, 60, "the dask scheduler's address file")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(sf),
             "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        address = json.loads(sf.read_text())["address"]
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(1, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_first_run_announced_its_dashboard(replayed):
    assert replayed["said"][0].startswith("4 fractions: 4 to replay, 0 already done")
    assert any(s.startswith("Dask dashboard: http://127.0.0.1:") and "LocalCluster: 2 worker"
               in s for s in replayed["said"])


def test_second_run_skips_what_is_done(replayed, dask_cluster):
    """On an existing cluster (--scheduler): the done fractions are skipped, the failed one
    is tried again there and fails again with the same reason."""
    out = replayed["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("fraction.json")}
    said: list[str] = []
    res = replay_archive(replayed["archive"], out, chain=ChainSettings(**PLAN),
                         cluster=ClusterSettings(scheduler=dask_cluster), progress=False,
                         announce=said.append)
    rows = {r["cbct_series_uid"]: r for r in res.rows}
    assert len(rows) == 4
    done = [r for r in rows.values() if r["status"] == "done"]
    assert len(done) == 3 and all(r["skipped"] for r in done)
    bad = rows[replayed["bad_uid"]]
    assert bad["status"] == "failed" and bad["failed_stage"] == "chain"  # tried again
    assert bad["reason"] == _rows(replayed)[replayed["bad_uid"]]["reason"]
    assert bad["worker"].startswith("tcp://127.0.0.1:")  # ran on the existing cluster
    assert any(f"scheduler {dask_cluster}" in s for s in said)
    assert said[0].startswith("4 fractions: 1 to replay, 3 already done")
    for p, t in before.items():
        rec = json.loads(p.read_text())
        if rec["status"] == "done":
            assert p.stat().st_mtime_ns == t, p  # untouched
    # other settings are other results: nothing is skipped
    jobs, skipped, _ = plan_jobs(replayed["archive"], out,
                                 chain=ChainSettings(**{**PLAN, "bixel_size_mm": 8.0}))
    assert len(jobs) == 4 and not skipped


def _png_stats(png: bytes) -> tuple[int, float]:
    """(distinct colours, share of colourful pixels) of a PNG image, over its rows down to
    the last non-white one. Colourful: max - min of R, G, B > 60 (plots, dose washes; text
    and tables are grey)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    rows = np.nonzero(np.any(a < 245, axis=-1).any(axis=1))[0]
    if rows.size == 0:
        return 1, 0.0
    a = a[: rows[-1] + 1]
    flat = a.reshape(-1, 3)
    colourful = (a.max(axis=-1) - a.min(axis=-1)) > 60
    return (len(np.unique(flat[:: max(1, flat.shape[0] // 200000)], axis=0)),
            float(np.mean(colourful)))


def _screenshot(exe: str, page: Path, png: Path, profile: Path) -> bytes:
    p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={png}",
                        "--window-size=1280,2400", page.as_uri()],
                       check=False, capture_output=True, text=True, timeout=120)
    assert png.is_file(), p.stderr[-2000:]
    return png.read_bytes()


def test_report_renders_its_plots_in_headless_chromium(replayed, tmp_path):
    exe = require_tool("chromium", "chromium")
    row = next(r for r in replayed["result"].rows if r["status"] == "done")
    page = replayed["out"] / row["report"]
    html = page.read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) >= 3  # DVH, dose slices, registration review
    for u in uris:
        colours, _ = _png_stats(base64.b64decode(u))
        assert colours > 50  # a real picture (a grey review image has little colour)
    for name, target in (("report", page), ("summary", replayed["out"] / "index.html")):
        shot = _screenshot(exe, target, tmp_path / f"{name}.png", tmp_path / "chromium")
        # the same page with its images emptied: what a page whose plots did not render
        # looks like (text, tables, the research-use banner)
        bare = target.with_name(f".bare-{target.name}")
        bare.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""',
                               target.read_text()))
        blank = _screenshot(exe, bare, tmp_path / f"{name}-bare.png", tmp_path / "chromium")
        bare.unlink()
        (colours, colourful), (_, colourful_bare) = _png_stats(shot), _png_stats(blank)
        assert colours > 200, name
        assert colourful > colourful_bare + 0.01, (name, colourful, colourful_bare)


def test_archive_pulled_from_orthanc_is_already_done(replayed, orthanc, tmp_path):
    import urllib.request

    from adaptive.replay.orthanc_pull import pull_patients

    patient = replayed["cases"][0].patient_id
    files = [f for f in replayed["archive"].rglob("IM*") if _patient_of(f) == patient]
    for f in files:
        req = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/instances",
                                     data=f.read_bytes(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["Status"] in ("Success", "AlreadyStored")
    pulled = tmp_path / "pulled"
    got = pull_patients(f"http://127.0.0.1:{orthanc.http_port}", pulled, [patient])
    assert got == {patient: len(files)}
    jobs, done, failed = plan_jobs(pulled, replayed["out"], chain=ChainSettings(**PLAN))
    assert not jobs and not failed and len(done) == 2  # same bytes: same keys, nothing to do
    assert all(r["patient_id"] == patient for r in done)


def _patient_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
