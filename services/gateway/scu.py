"""Storage SCU: hand the chosen plan's objects to the TMS.

The objects are first copied into an outbox folder (``outbox/<session>/<batch>/``) so
nothing is lost whatever happens next; then each is C-STORE'd with a short DIMSE timeout
and bounded retries with exponential backoff (pynetdicom occasionally loses a C-STORE
response). Every status is checked; ``report.json`` in the batch folder records the
outcome per instance. Permanent refusals (0xA9xx, 0xCxxx: the TMS cannot take the object)
are not retried.

The objects go in hand-off order, run by run (:func:`send_groups`): the synthetic CT's
slices - independent of each other - over up to ``associations`` associations at once (a
TMS that ingests one instance at a time per association, as Orthanc does, takes them that
much sooner), then each object that references them, once the run before it is done.

Each instance ends in one of three states (:class:`InstanceReport` ``state``):
``stored`` (the TMS answered Success or a Warning), ``not_stored`` (the TMS answered a
failure status, or the instance was never sent: no association), ``unknown`` (it was sent
but no response came: the TMS may hold it). A retry (``batch=`` an earlier batch) sends the
same files - the same SOP Instance UIDs - again, skipping those already ``stored``
(``skip``): a hand-off is idempotent. ``on_state(report)`` is told of every state change
(``sending`` before each C-STORE), so a caller can record it durably.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from adaptive.atomic import write_text_atomic
from adaptive.errors import HandOffError
from adaptive.log import get_logger
from services.config import TmsConfig


@dataclass
class InstanceReport:
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    status: int | None = None     # last DIMSE status (None: no response)
    ok: bool = False
    attempts: int = 0
    error: str = ""
    seconds: float = 0.0
    state: str = "pending"         # pending | sending | stored | not_stored | unknown


def _unsent(r: InstanceReport, on_state) -> None:
    """An attempt that could not send ``r``: it stays unknown if an earlier attempt sent it
    without an answer, else it is not stored."""
    if r.state != "unknown":
        r.state = "not_stored"
    on_state(r)


def _is_permanent(status: int) -> bool:
    return (status & 0xFF00) in (0xA900, 0xC000) or 0xC000 <= status <= 0xCFFF


def stage_outbox(paths, outbox: str | Path, session_id: str) -> Path:
    """Copy ``paths`` into a new outbox batch folder; returns it."""
    batch = Path(outbox) / session_id / f"{time.strftime('%Y%m%dT%H%M%S')}_{uuid.uuid4().hex[:6]}"
    batch.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        shutil.copy2(p, batch / f"{i:02d}_{Path(p).name}")
    return batch


def _noop(report: InstanceReport) -> None:
    return None


def _instance_reports(files: list[Path], skip: frozenset[str]
                      ) -> tuple[list[InstanceReport], dict[str, str]]:
    """One report per file (those in ``skip`` already ``stored``) and each file's transfer
    syntax."""
    reports: list[InstanceReport] = []
    syntaxes = {}
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        rep = InstanceReport(path=str(p), sop_class_uid=str(ds.SOPClassUID),
                             sop_instance_uid=str(ds.SOPInstanceUID),
                             modality=str(ds.get("Modality", "")))
        if rep.sop_instance_uid in skip:
            rep.ok, rep.state, rep.status = True, "stored", 0
        reports.append(rep)
        syntaxes[str(p)] = str(ds.file_meta.TransferSyntaxUID)
    return reports, syntaxes


def _requester(cfg: TmsConfig, reports: list[InstanceReport], syntaxes: dict[str, str]) -> AE:
    """Our SCU: one presentation context per SOP class, with the files' transfer syntaxes
    and both little-endian ones."""
    ae = AE(ae_title=cfg.calling_ae_title)
    ae.acse_timeout = cfg.acse_timeout_s
    ae.dimse_timeout = cfg.dimse_timeout_s
    ae.network_timeout = cfg.network_timeout_s
    ae.maximum_pdu_size = 1 << 20
    for cls in sorted({r.sop_class_uid for r in reports}):
        tss = sorted({syntaxes[r.path] for r in reports if r.sop_class_uid == cls})
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in tss:
                tss.append(ts)
        ae.add_requested_context(cls, tss)
    return ae


def _store_one(assoc, r: InstanceReport, on_state) -> None:
    """C-STORE one instance on an established association and record the outcome."""
    r.attempts += 1
    before = r.state
    r.state = "sending"
    on_state(r)
    t0 = time.perf_counter()
    try:
        status = assoc.send_c_store(Path(r.path))
    except Exception as e:  # noqa: BLE001 - reported per instance, retried
        r.error = f"C-STORE error: {type(e).__name__}: {e}"
        r.state = "unknown"   # it may have left before the error
        on_state(r)
        return
    r.seconds = round(time.perf_counter() - t0, 4)
    if not status or "Status" not in status:
        r.error = "no C-STORE response (DIMSE timeout or abort)"
        r.status = None
        r.state = "unknown"
        on_state(r)
        return
    r.status = int(status.Status)
    if r.status == 0x0000 or (r.status & 0xF000) == 0xB000:  # success / warning
        r.ok, r.error, r.state = True, "", "stored"
    else:
        r.error = f"status 0x{r.status:04X} " + str(status.get("ErrorComment", ""))
        # the TMS answered: this copy was refused (an earlier unanswered one may still be there)
        r.state = "unknown" if before == "unknown" else "not_stored"
    on_state(r)


def _associate(ae: AE, cfg: TmsConfig):
    """(established association, "") or (None, why there is none)."""
    try:
        assoc = ae.associate(cfg.host, cfg.port, ae_title=cfg.ae_title)
    except Exception as e:  # noqa: BLE001 - socket errors: reported like a refusal
        return None, f"association failed: {e}"
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else \
            "not established"
        return None, f"association {why} by {cfg.ae_title}@{cfg.host}:{cfg.port}"
    return assoc, ""


def send_groups(reports: list[InstanceReport]) -> list[list[InstanceReport]]:
    """``reports`` in hand-off order, cut into consecutive runs of one SOP class (the synthetic
    CT's slices; then the RT Structure Set, registration, RT Plan and RT Dose, one each). A
    run may be sent over several associations at once; a run starts only when the run before
    it is done, so nothing reaches the TMS before what it references."""
    groups: list[list[InstanceReport]] = []
    for r in reports:
        if groups and groups[-1][0].sop_class_uid == r.sop_class_uid:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _send_group(assocs: list, group: list[InstanceReport], on_state) -> list[InstanceReport]:
    """C-STORE each instance of ``group`` once over the live associations in ``assocs`` (one
    thread per association, each taking the next instance); returns those left unsent
    because every association was lost."""
    todo = deque(group)

    def run(assoc) -> None:
        while assoc.is_established:
            try:
                r = todo.popleft()
            except IndexError:
                return
            _store_one(assoc, r, on_state)

    live = [a for a in assocs if a.is_established]
    if not live:
        return list(todo)
    if len(live) == 1 or len(group) == 1:
        run(live[0])
    else:
        threads = [threading.Thread(target=run, args=(a,), name=f"c-store-{i}", daemon=True)
                   for i, a in enumerate(live)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return list(todo)


def _attempt(ae: AE, cfg: TmsConfig, pending: list[InstanceReport], on_state) -> None:
    """One attempt: send every pending instance, run by run (:func:`send_groups`), a run of
    several instances over up to ``cfg.associations`` associations at once. A failed first
    association marks them all; if the TMS refuses the extra ones, the run goes over those
    it took."""
    first, why = _associate(ae, cfg)
    if first is None:
        for r in pending:
            r.attempts += 1
            r.error = why
            _unsent(r, on_state)
        return
    assocs = [first]
    try:
        groups = send_groups(pending)
        for k, group in enumerate(groups):
            if not any(a.is_established for a in assocs):
                for r in (r for g in groups[k:] for r in g):
                    r.error = "association lost"
                return
            while len(group) > 1 and len(assocs) < min(cfg.associations, len(group)):
                extra, _ = _associate(ae, cfg)
                if extra is None:
                    break
                assocs.append(extra)
            for r in _send_group(assocs, group, on_state):
                r.error = "association lost"
    finally:
        for a in assocs:
            if a.is_established:
                a.release()


def send_files(paths, cfg: TmsConfig, *, outbox: str | Path, session_id: str = "adhoc",
               sleep=time.sleep, batch: str | Path | None = None,
               skip: frozenset[str] = frozenset(),
               on_state=_noop) -> tuple[list[InstanceReport], Path]:
    """C-STORE ``paths`` to the TMS. Returns (per-instance reports, outbox batch folder);
    raises :class:`HandOffError` (with the report) if any instance was not stored.
    ``batch``: an earlier outbox batch of the same files to send again (a retry);
    ``skip``: SOP Instance UIDs already stored (reported ``stored``, not sent again)."""
    log = get_logger("services.scu")
    batch = Path(batch) if batch is not None else stage_outbox(paths, outbox, session_id)
    files = sorted(p for p in batch.iterdir() if p.name != "report.json")
    reports, syntaxes = _instance_reports(files, skip)
    ae = _requester(cfg, reports, syntaxes)
    for attempt in range(cfg.retries + 1):
        pending = [r for r in reports if not r.ok and not (r.status is not None
                                                            and _is_permanent(r.status))]
        if not pending:
            break
        if attempt:
            delay = cfg.backoff_s * 2 ** (attempt - 1)
            log.warning("tms_retry", attempt=attempt, pending=len(pending), delay_s=delay)
            sleep(delay)
        _attempt(ae, cfg, pending, on_state)

    for r in reports:
        if r.state in ("pending", "sending"):   # never sent by any attempt
            r.state = "not_stored"
            on_state(r)
    write_text_atomic(batch / "report.json", json.dumps(
        {"tms": f"{cfg.ae_title}@{cfg.host}:{cfg.port}", "session_id": session_id,
         "ok": all(r.ok for r in reports), "instances": [asdict(r) for r in reports]},
        indent=2))
    failed = [r for r in reports if not r.ok]
    if failed:
        unknown = sum(r.state == "unknown" for r in failed)
        log.error("tms_handoff_failed", failed=len(failed), outbox=str(batch),
                  errors=sorted({r.error for r in failed}))
        raise HandOffError(
            f"{len(failed)} of {len(reports)} object(s) not confirmed stored at TMS "
            f"{cfg.ae_title}@{cfg.host}:{cfg.port} ({unknown} unknown: sent, no answer; "
            f"{len(failed) - unknown} not stored): {failed[0].error}",
            [asdict(r) for r in reports], batch)
    log.info("tms_handoff_ok", n=len(reports), outbox=str(batch))
    return reports, batch
