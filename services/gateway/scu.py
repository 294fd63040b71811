"""Storage SCU: hand the chosen plan's objects to the TMS.

The objects are first copied into an outbox folder (``outbox/<session>/<batch>/``) so
nothing is lost whatever happens next; then each is C-STORE'd with a short DIMSE timeout
and bounded retries with exponential backoff (pynetdicom occasionally loses a C-STORE
response). Every status is checked; ``report.json`` in the batch folder records the
outcome per instance. Permanent refusals (0xA9xx, 0xCxxx: the TMS cannot take the object)
are not retried.

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
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

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
    reports: list[InstanceReport] = []
    metas = {}
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        rep = InstanceReport(path=str(p), sop_class_uid=str(ds.SOPClassUID),
                             sop_instance_uid=str(ds.SOPInstanceUID),
                             modality=str(ds.get("Modality", "")))
        if rep.sop_instance_uid in skip:
            rep.ok, rep.state, rep.status = True, "stored", 0
        reports.append(rep)
        metas[str(p)] = str(ds.file_meta.TransferSyntaxUID)

    ae = AE(ae_title=cfg.calling_ae_title)
    ae.acse_timeout = cfg.acse_timeout_s
    ae.dimse_timeout = cfg.dimse_timeout_s
    ae.network_timeout = cfg.network_timeout_s
    ae.maximum_pdu_size = 1 << 20
    for cls in sorted({r.sop_class_uid for r in reports}):
        tss = sorted({metas[r.path] for r in reports if r.sop_class_uid == cls})
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in tss:
                tss.append(ts)
        ae.add_requested_context(cls, tss)

    for attempt in range(cfg.retries + 1):
        pending = [r for r in reports if not r.ok and not (r.status is not None
                                                            and _is_permanent(r.status))]
        if not pending:
            break
        if attempt:
            delay = cfg.backoff_s * 2 ** (attempt - 1)
            log.warning("tms_retry", attempt=attempt, pending=len(pending), delay_s=delay)
            sleep(delay)
        try:
            assoc = ae.associate(cfg.host, cfg.port, ae_title=cfg.ae_title)
        except Exception as e:  # noqa: BLE001 - socket errors: reported like a refusal
            for r in pending:
                r.attempts += 1
                r.error = f"association failed: {e}"
                _unsent(r, on_state)
            continue
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else \
                "not established"
            for r in pending:
                r.attempts += 1
                r.error = f"association {why} by {cfg.ae_title}@{cfg.host}:{cfg.port}"
                _unsent(r, on_state)
            continue
        try:
            for r in pending:
                if not assoc.is_established:
                    r.error = "association lost"
                    break
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
                    continue
                r.seconds = round(time.perf_counter() - t0, 4)
                if not status or "Status" not in status:
                    r.error = "no C-STORE response (DIMSE timeout or abort)"
                    r.status = None
                    r.state = "unknown"
                    on_state(r)
                    continue
                r.status = int(status.Status)
                if r.status == 0x0000 or (r.status & 0xF000) == 0xB000:  # success / warning
                    r.ok, r.error, r.state = True, "", "stored"
                else:
                    r.error = f"status 0x{r.status:04X} " + str(status.get("ErrorComment", ""))
                    # the TMS answered: this copy was refused (an earlier unanswered one
                    # may still be there)
                    r.state = "unknown" if before == "unknown" else "not_stored"
                on_state(r)
        finally:
            if assoc.is_established:
                assoc.release()

    for r in reports:
        if r.state in ("pending", "sending"):   # never sent by any attempt
            r.state = "not_stored"
            on_state(r)
    (batch / "report.json").write_text(json.dumps(
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
