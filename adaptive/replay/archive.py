"""Replaying an archive on Dask: every fraction of every patient through the services' chain
(:mod:`adaptive.replay.chain`), one Dask task per fraction, with a report per fraction and a
summary of the archive (:mod:`adaptive.reports`).

**Cluster.** By default a :class:`distributed.LocalCluster` of worker *processes* on this
machine (workers = cores, one thread each, every process listening on 127.0.0.1 only); the
numba, ITK, OpenMP and BLAS thread counts of each worker process are set to cores ÷ workers
in its environment before it starts, so nothing is oversubscribed. With ``scheduler``
(``tcp://HOST:8786``) the tasks run on an existing Dask cluster instead: each task sets numba's
and ITK's thread counts to the cores of its host ÷ the workers on that host when it starts.

**Inputs and outputs are paths the workers share** (the archive and the output folder must be
mounted at the same path on every worker; nothing is shipped as bytes). Each task re-hashes
its input files and fails with a clear reason if they differ from what the client hashed (a
worker that sees another file under the same path).

**Failures** are per fraction: a task catches its fraction's error and returns a failed row
naming the stage and the reason; a worker process that dies (e.g. out of memory) fails only
its task (``allowed-failures`` = 0: a crashing input is not retried). Daily images the discovery
could not use are failed rows too (stage ``discovery``). Nothing stops the run.

**Resume.** A fraction whose ``fraction.json`` says ``done`` with the same key
(:mod:`adaptive.replay.fingerprint`: same input bytes, same software, same settings) is not
run again; its row is reused (``skipped``). Anything else is run from a clean folder.

Output folder::

    OUT/index.html, OUT/summary.csv, OUT/summary.json      the archive summary
    OUT/<patient>/<fraction>/report.html                   the fraction's report
    OUT/<patient>/<fraction>/fraction.json                 its row, status and key
    OUT/<patient>/<fraction>/log.jsonl                     the chain's log lines
    OUT/<patient>/<fraction>/...                           the chain's outputs
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import adaptive
from adaptive.atomic import write_text_atomic
from adaptive.errors import AdaptiveError, ReplayDataError
from adaptive.jsonable import to_jsonable, write_json_atomic
from adaptive.log import bind, configure_logging, get_logger
from adaptive.registration.elastix_backend import itk_module
from adaptive.replay.chain import ChainSettings, GoalsChoice, goals_for, replay_fraction
from adaptive.replay.discover import FractionInputs, Unusable, discover, safe_name
from adaptive.replay.environment import THREAD_VARS
from adaptive.replay.fingerprint import (
    combine_digests,
    file_digest,
    fraction_key,
    inputs_digest,
    settings_digest,
    software_digest,
)
from adaptive.reports.extract import load_fraction_data
from adaptive.reports.fraction_page import fraction_row, render_failed_page, render_fraction_page
from adaptive.reports.summary import render_summary_page, sort_rows, summary_csv

log = get_logger("adaptive.replay.archive")

FRACTION_RECORD = "fraction.json"
REPORT_NAME = "report.html"


@dataclass(frozen=True)
class ClusterSettings:
    """``scheduler``: address of an existing Dask scheduler (None: a LocalCluster);
    ``n_workers``: local worker processes (None: the machine's cores); ``dashboard_port``:
    local dashboard port on 127.0.0.1 (0: any free port)."""

    scheduler: str | None = None
    n_workers: int | None = None
    dashboard_port: int = 0


@dataclass(frozen=True)
class FractionJob:
    """Everything one Dask task needs (picklable; paths shared with the client)."""

    inputs: FractionInputs
    out_dir: str
    goals: GoalsChoice
    chain: ChainSettings
    key: str
    inputs_digest: str
    meta: dict
    #: thread count per host name (remote clusters), None: leave the worker's own
    threads_by_host: dict | None = None


@dataclass
class ArchiveResult:
    rows: list[dict]
    out_dir: Path
    dashboard: str = ""
    wall_time_s: float = 0.0
    counts: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") != "done"]


# --- the task (runs on a worker) ------------------------------------------------------------


def _apply_threads(threads_by_host: dict | None) -> None:
    if not threads_by_host:
        return
    n = threads_by_host.get(socket.gethostname())
    if not n:
        return
    import numba  # noqa: PLC0415 - deferred: numba's threading only in a Dask worker

    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    # through the registration's backend, which remembers the count it set: setting ITK's
    # default directly left the backend believing its own count was still in force, so a
    # worker's second fraction registered with this count and its first with the
    # registration's (results depended on the order the scheduler gave the tasks)
    itk_module(int(n))


def _worker_address() -> str:
    try:
        from distributed import get_worker  # noqa: PLC0415 - deferred: Dask (3 s) only for archive replay

        return get_worker().address
    except ValueError:  # not in a Dask worker (one fraction run in-process)
        return f"local:{os.getpid()}"


def run_job(job: FractionJob, in_process: bool = False, clean: bool = True) -> dict:
    """The Dask task of one fraction: chain, report, ``fraction.json``. Returns the row;
    the fraction's own errors become a failed row, never an exception. ``in_process``:
    logs go to this process's stderr instead of the fraction's ``log.jsonl``. ``clean``:
    empty the fraction's folder first (a re-run leaves no stale plan of an earlier attempt;
    only for folders this module made)."""

    out = Path(job.out_dir)
    if clean and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**job.meta, "worker": _worker_address(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t0 = time.perf_counter()
    stage = "inputs"
    with contextlib.ExitStack() as stack:
        if not in_process:
            f = stack.enter_context(open(out / "log.jsonl", "w"))
            stack.enter_context(contextlib.redirect_stderr(f))
            configure_logging(json=True)
        bind(patient_id=job.inputs.patient_id, fraction=job.inputs.label)
        try:
            _apply_threads(job.threads_by_host)
            digest = inputs_digest(job.inputs.input_files())
            if digest != job.inputs_digest:
                raise ReplayDataError(
                    "the input files on this worker differ from those the client hashed "
                    "(is the archive mounted at the same path on every worker?)",
                )
            stage = "chain"
            replay_fraction(job.inputs, out, job.goals, job.chain)
            stage = "report"
            t = time.perf_counter()
            row = write_fraction_report(out, job.inputs, job.goals.load(), meta)
            row["time_report_s"] = round(time.perf_counter() - t, 3)
        except Exception as e:  # noqa: BLE001  any error fails this fraction only
            row = failed_row(meta, stage, e, traceback.format_exc(limit=8))
    row["time_task_s"] = round(time.perf_counter() - t0, 3)
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_record(out, row)
    return row


def write_fraction_report(out: Path, inputs: FractionInputs, goals, meta: dict) -> dict:
    """Read the chain's outputs in ``out``, write ``report.html``; returns the row."""

    data = load_fraction_data(out, inputs, goals)
    row = fraction_row(data, meta)
    html = render_fraction_page(data, row, meta)
    write_text_atomic(out / REPORT_NAME, html)
    return row


def failed_row(meta: dict, stage: str, error: BaseException, tb: str = "") -> dict:
    expected = isinstance(error, AdaptiveError)
    return {**meta, "status": "failed", "failed_stage": stage,
            "reason": f"{type(error).__name__}: {error}",
            "traceback": "" if expected else tb}


def _write_record(out: Path, row: dict) -> None:
    if row.get("status") != "done":
        (out / REPORT_NAME).write_text(render_failed_page(row, row), encoding="utf-8")
    write_json_atomic(out / FRACTION_RECORD, to_jsonable(row))


# --- the client -------------------------------------------------------------------------------


def local_cluster_env(n_workers: int, cores: int | None = None) -> dict[str, str]:
    """Environment of each local worker process: thread counts = cores ÷ workers."""
    cores = cores or os.cpu_count() or 1
    n = str(max(1, cores // max(1, n_workers)))
    env = dict.fromkeys(THREAD_VARS, n)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["ADAPTIVE_LOG_JSON"] = "1"
    if os.environ.get("NUMBA_CACHE_DIR"):
        env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    return env


@contextlib.contextmanager
def dask_client(cluster: ClusterSettings):
    """A connected :class:`distributed.Client` (and its LocalCluster unless ``scheduler``)."""
    import dask  # noqa: PLC0415 - deferred: Dask (3 s) only for archive replay
    from distributed import Client, LocalCluster  # noqa: PLC0415 - deferred: Dask (3 s)

    # the dashboard address is announced by the caller; Dask's INFO lines would bury the bar
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if cluster.scheduler:
            with Client(cluster.scheduler, timeout="30s") as client:
                yield client, None
            return
        n = cluster.n_workers or os.cpu_count() or 1
        env = local_cluster_env(n)
        # before the worker interpreter starts: the Nanny's ``env`` is applied only after the
        # spawned process has imported its modules, too late for NUMBA_NUM_THREADS (numba
        # reads it once, at import) and the BLAS variables; with ``env`` alone every worker
        # ran numba's pool at the machine's core count (measured: 2 workers x 2 threads on
        # 2 cores, environment.json)
        spawn_env = {**(dask.config.get("distributed.nanny.pre-spawn-environ") or {}), **env}
        # the Nanny writes pre-spawn variables into THIS process's environment and leaves
        # them there; numba re-reads NUMBA_NUM_THREADS when it compiles, so a caller that
        # goes on computing (a test process, a notebook) then fails with "Cannot set
        # NUMBA_NUM_THREADS to a different value once the threads have been launched"
        # (plus the PYTHONHASHSEED the Nanny adds for its workers' consistent hashing and
        # distributed's own parent-process marker)
        with _environ_kept([*spawn_env, "PYTHONHASHSEED", "__DASK_PARENT_PID"]) as restore, \
                dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}), \
                LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                             host="127.0.0.1",
                             dashboard_address=f"127.0.0.1:{cluster.dashboard_port}",
                             env=env) as lc, Client(lc) as client:
            restore()  # the workers are spawned
            yield client, lc


@contextlib.contextmanager
def _environ_kept(keys):
    """Restore this process's values of ``keys`` (or their absence) on exit; the yielded
    function restores them at once too."""
    saved = {k: os.environ.get(k) for k in keys}

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    try:
        yield restore
    finally:
        restore()


def _threads_by_host(client) -> dict[str, int]:
    """Cores of each worker host ÷ the worker processes on it (remote clusters)."""
    names = client.run(socket.gethostname)
    cores = client.run(os.cpu_count)
    per_host = Counter(names.values())
    return {host: max(1, (cores.get(addr) or 1) // per_host[host])
            for addr, host in names.items()}


class _Digests:
    """:func:`inputs_digest` with each file hashed once (a planning CT is shared by all the
    fractions of its plan)."""

    def __init__(self):
        self._d: dict[str, str] = {}

    def _file(self, f) -> str:
        if str(f) not in self._d:
            self._d[str(f)] = file_digest(f)
        return self._d[str(f)]

    def of(self, files) -> str:
        return combine_digests(self._file(f) for f in files)


def _meta(inputs: FractionInputs, goals: GoalsChoice, key: str, inputs_digest: str,
          settings: dict, report: str) -> dict:
    p = inputs.planning
    return {"patient_id": inputs.patient_id, "patient_name": inputs.patient_name,
            "fraction": inputs.label, "fraction_id": inputs.fraction_id,
            "image_date": inputs.cbct.date, "cbct_series_uid": inputs.cbct.series_instance_uid,
            "plan_label": p.rtplan_label, "rtplan_uid": p.rtplan_uid,
            "rtstruct_uid": p.rtstruct_uid,
            "planning_ct_series_uid": p.planning_ct.series_instance_uid,
            "matched_by": inputs.matched_by,
            "spatial_registration": inputs.spatial_registration or "",
            "truth": inputs.truth.truth_json if inputs.truth else "",
            "goals_site": Path(goals.path).stem, "goals_file": goals.path,
            "goals_source": goals.source, "software": adaptive.SOFTWARE_NAME,
            "software_version": adaptive.__version__, "software_digest": software_digest(),
            "settings": json.dumps(settings, sort_keys=True), "fraction_key": key,
            "inputs_digest": inputs_digest, "report": report, "skipped": False}


def _unusable_row(u: Unusable, out: Path, stage: str = "discovery") -> dict:
    fid = u.fraction_id or safe_name(u.series_instance_uid)
    rel = f"{safe_name(u.patient_id)}/{fid}"
    row = {"patient_id": u.patient_id, "fraction": u.label, "fraction_id": fid,
           "cbct_series_uid": u.series_instance_uid, "status": "failed",
           "failed_stage": stage, "reason": u.reason, "report": f"{rel}/{REPORT_NAME}",
           "skipped": False}
    d = out / rel
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    _write_record(d, row)
    return row


def plan_jobs(archive: str | Path, out: str | Path, *, goals_override=None,
              chain: ChainSettings | None = None) -> tuple[list[FractionJob], list[dict],
                                                           list[dict]]:
    """Discovery and resume: (jobs to run, rows of fractions already done, failed rows of
    unusable daily images)."""
    out = Path(out)
    chain = chain or ChainSettings()
    contents = discover(archive)
    digests = _Digests()
    jobs, done = [], []
    unusable = []
    for f in contents.fractions:
        rel = f"{safe_name(f.patient_id)}/{f.fraction_id}"
        try:
            job = _make_job(f, out / rel, f"{rel}/{REPORT_NAME}", goals_override, chain,
                            digests)
        except AdaptiveError as e:  # e.g. no clinical protocol for this patient's plan
            unusable.append(_unusable_row(Unusable(f.patient_id, f.label,
                                                   f.cbct.series_instance_uid, str(e),
                                                   f.fraction_id), out, "protocol"))
            continue
        prev = _read_record(out / rel)
        if prev and prev.get("status") == "done" and prev.get("fraction_key") == job.key:
            prev.update(skipped=True, fraction=f.label)
            done.append(prev)
            continue
        jobs.append(job)
    unusable += [_unusable_row(u, out) for u in contents.unusable]
    return jobs, done, unusable


def _make_job(f: FractionInputs, out_dir: Path, report: str, goals_override,
              chain: ChainSettings, digests: _Digests) -> FractionJob:
    goals = goals_for(f, goals_override)
    settings = chain.to_dict()
    idig = digests.of(f.input_files())
    key = fraction_key(idig, software_digest(), settings_digest(settings, goals.path))
    return FractionJob(f, str(out_dir), goals, chain, key, idig,
                       _meta(f, goals, key, idig, settings, report))


def one_fraction_job(fraction_dir: str | Path, out: str | Path, *, goals_override=None,
                     chain: ChainSettings | None = None) -> FractionJob:
    """The job of one fraction folder of the replay layout (``<case>/fxNN/CBCT`` beside
    ``<case>/planning``), found by the same discovery as an archive's fractions."""
    fx = Path(fraction_dir).resolve()
    contents = discover(fx.parent)
    mine = [f for f in contents.fractions
            if all(Path(p).resolve().is_relative_to(fx) for p in f.cbct.files)]
    if len(mine) != 1:
        why = "; ".join(u.reason for u in contents.unusable)
        raise ReplayDataError(f"{len(mine)} replayable daily images found in {fx} (expected "
                              f"one){': ' + why if why else ''}")
    return _make_job(mine[0], Path(out), REPORT_NAME, goals_override,
                     chain or ChainSettings(), _Digests())


def _read_record(d: Path) -> dict | None:
    try:
        return json.loads((d / FRACTION_RECORD).read_text())
    except (OSError, ValueError):
        return None


def replay_archive(archive: str | Path, out: str | Path, *, goals_override=None,
                   chain: ChainSettings | None = None,
                   cluster: ClusterSettings | None = None, progress: bool = True,
                   announce: Callable[[str], None] = print) -> ArchiveResult:
    """Replay every fraction of ``archive`` into ``out`` (module docstring) and write the
    summary. ``announce``: where the dashboard address and failures are printed."""
    from distributed import as_completed  # noqa: PLC0415 - deferred: Dask (3 s)
    from tqdm import tqdm  # noqa: PLC0415 - with Dask: only for archive replay

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = cluster or ClusterSettings()
    jobs, rows, failed = plan_jobs(archive, out, goals_override=goals_override, chain=chain)
    rows += failed
    announce(f"{len(jobs) + len(rows)} fractions: {len(jobs)} to replay, "
             f"{len(rows) - len(failed)} already done, {len(failed)} unusable")
    dashboard = ""
    desc = "no cluster needed"
    if jobs:
        with dask_client(cluster) as (client, lc):
            dashboard = client.dashboard_link or ""
            desc = (f"scheduler {cluster.scheduler}" if lc is None else
                    f"LocalCluster: {len(lc.workers)} worker processes x 1 thread, "
                    f"{local_cluster_env(len(lc.workers))['NUMBA_NUM_THREADS']} numba/ITK "
                    f"threads each")
            announce(f"Dask dashboard: {dashboard} ({desc})")
            if lc is None:
                tbh = _threads_by_host(client)
                jobs = [FractionJob(**{**j.__dict__, "threads_by_host": tbh}) for j in jobs]
            futures = client.map(run_job, jobs, pure=False,
                                 key=[f"fraction-{j.key[:16]}-{i}" for i, j in enumerate(jobs)])
            job_of = {f.key: j for f, j in zip(futures, jobs)}
            bar = tqdm(total=len(futures), unit="fraction", disable=not progress,
                       desc="replay")
            for fut in as_completed(futures):
                j = job_of[fut.key]
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001  a dead worker fails its fraction only
                    row = failed_row(j.meta, "worker", e)
                    Path(j.out_dir).mkdir(parents=True, exist_ok=True)
                    _write_record(Path(j.out_dir), row)
                if row.get("status") != "done":
                    announce(f"FAILED {row['patient_id']} {row['fraction']} at "
                             f"{row.get('failed_stage')}: {row.get('reason')}")
                rows.append(row)
                bar.update(1)
            bar.close()
    wall = time.perf_counter() - t0
    result = ArchiveResult(rows, out, dashboard, wall,
                           dict(Counter(r.get("status") for r in rows)))
    write_summary(result, {"archive": str(Path(archive).resolve()), "cluster": desc,
                           "wall_time_s": wall, "settings": json.dumps(
                               (chain or ChainSettings()).to_dict(), sort_keys=True)})
    log.info("archive_replayed", fractions=len(rows), counts=result.counts,
             wall_s=round(wall, 1))
    return result


def write_summary(result: ArchiveResult, meta: dict) -> None:
    """``index.html``, ``summary.csv`` and ``summary.json`` in the output folder."""

    out = result.out_dir
    meta = {"software": adaptive.SOFTWARE_NAME, "software_version": adaptive.__version__,
            "software_digest": software_digest(), **meta}
    rows = sort_rows(result.rows)
    for name, text in (("summary.csv", summary_csv(rows)),
                       ("index.html", render_summary_page(rows, meta, out))):
        write_text_atomic(out / name, text)
    write_json_atomic(out / "summary.json", to_jsonable({"meta": meta, "rows": rows}))
