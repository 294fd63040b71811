"""The gateway's Storage SCP (pynetdicom).

Connections and associations pass the gates of :mod:`services.gateway.access` (peer
addresses, calling/called AE titles, connection and association limits, optional TLS).
Per C-STORE, before answering:

1. the calling peer's roles must allow the SOP class (else 0x0124 Not authorized);
2. the encoded dataset is validated (header only, :mod:`services.gateway.validation`;
   UIDs and the Patient ID by :mod:`services.validators`) - else a failure status
   (0xA900 / 0xC000) with the reason in Error Comment, and the instance is quarantined;
3. its study and series must belong to the patient (and study) they were first received
   for (:meth:`InstanceStore.claim`) - else 0xA900 ``identity_conflict``, quarantined;
4. it is written atomically under a name that exists only for its SOP Instance UID
   (:mod:`services.gateway.store`): a resend with identical content is a success, with
   different content it is refused (0xC000 ``sop_instance_conflict``; the first copy
   stays, the new one is quarantined);
5. the series tracker is updated.

A background thread reports due series (``series_complete`` or ``series_incomplete``,
:mod:`services.gateway.tracker`) and closes pending connections that never associated.

Events go to ``event_sink(event, body)`` (in ``adaptive serve``: a ZeroMQ PUSH to the
orchestrator): ``series_complete``, ``series_incomplete``, ``instance_rejected``
(``reason``: the validation reason, ``not_authorized``, ``identity_conflict``,
``sop_instance_conflict``), ``association_aborted``, ``association_rejected`` and
``connection_dropped`` (at most one per reason, peer address (and calling AE title) per
:data:`THROTTLE_S`, with ``suppressed`` counting the ones not sent), ``store_failed``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import encode_file_meta

from adaptive.log import get_logger
from services.config import GatewayConfig
from services.gateway.access import (
    STATUS_NOT_AUTHORIZED,
    AdmissionControl,
    ConnectionGuard,
    GatewayServer,
    may_store,
    server_ssl_context,
)
from services.gateway.store import InstanceStore, StoreOutcome
from services.gateway.tracker import SeriesTracker, series_key
from services.gateway.validation import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    STORAGE_CLASSES,
    VERIFICATION,
    ValidationFailure,
    read_instance_header,
    validate_dataset_bytes,
)

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
EventSink = Callable[[str, dict], None]
THROTTLE_S = 10.0


MAX_RECEIVED_UID_CHARS = 1024


def let_invalid_uids_reach_the_handler(value) -> tuple[bool, str]:
    """pynetdicom's validator for UI values in DIMSE messages (``_config.VALIDATORS["UI"]``,
    its documented hook), relaxed: pynetdicom 3.0.4 aborts the association when a received
    C-STORE request's Affected SOP Instance UID is longer than 64 characters (it cannot
    build the primitive), so the sender gets no status. Letting any non-empty string of
    reasonable length through lets the C-STORE handler refuse the instance with 0xA900 and
    the rule broken; every UID that could reach a path is validated there
    (:func:`services.validators.validate_uid`)."""
    if not isinstance(value, str) or not value:
        return False, "must be a non-empty str"
    if len(value) > MAX_RECEIVED_UID_CHARS:
        return False, f"must not exceed {MAX_RECEIVED_UID_CHARS} characters"
    return True, ""


class EventThrottle:
    """At most one event per key per ``period_s``; the next one sent carries how many
    were suppressed in between (so a stranger retrying in a loop cannot flood the
    orchestrator)."""

    def __init__(self, period_s: float, clock=time.monotonic):
        self.period_s = period_s
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple, float] = {}
        self._suppressed: dict[tuple, int] = {}

    def admit(self, key: tuple) -> int | None:
        """None: suppress; else the number suppressed since the last one sent."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)


class Gateway:
    """Storage SCP + series completion. ``start()`` returns once it listens."""

    def __init__(self, cfg: GatewayConfig, store_dir: str | Path, quarantine_dir: str | Path,
                 event_sink: EventSink | None = None):
        self.cfg = cfg
        self.store = InstanceStore(store_dir, quarantine_dir, cfg.fsync)
        self.tracker = SeriesTracker(cfg.idle_timeout_s)
        self.admission = AdmissionControl(cfg.access, cfg.ae_title, cfg.max_associations)
        self.guard = ConnectionGuard(cfg.access, self.admission.directory,
                                     on_drop=self._on_dropped)
        self.throttle = EventThrottle(THROTTLE_S)
        self.event_sink = event_sink
        self.log = get_logger("services.gateway")
        self._server = None
        self._ae = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._assoc_state: dict[int, str] = {}
        self._assoc_lock = threading.Lock()
        self._passes = 0
        self._passes_cv = threading.Condition()
        self._counters_lock = threading.Lock()
        self.counters = {"stored": 0, "resent_identical": 0, "rejected": 0,
                         "aborted_associations": 0, "rejected_associations": 0,
                         "dropped_connections": 0, "series_completed": 0,
                         "series_incomplete": 0}

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        _config.VALIDATORS["UI"] = let_invalid_uids_reach_the_handler   # process-wide
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_pdu_size = self.cfg.max_pdu
        # our gates bound the connections; pynetdicom's own count is only a backstop
        ae.maximum_associations = (self.cfg.max_associations
                                   + self.cfg.access.max_pending_connections + 8)
        ae.acse_timeout = self.cfg.acse_timeout_s
        ae.dimse_timeout = self.cfg.dimse_timeout_s
        ae.network_timeout = self.cfg.network_timeout_s
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_ESTABLISHED, self._on_established),
                    (evt.EVT_RELEASED, self._on_released),
                    (evt.EVT_ABORTED, self._on_aborted),
                    (evt.EVT_CONN_CLOSE, self._on_conn_close)]
        server = ae.make_server((self.cfg.host, self.cfg.port), evt_handlers=handlers,
                                ssl_context=server_ssl_context(self.cfg.tls),
                                server_class=GatewayServer, guard=self.guard,
                                socket_timeout_s=self.cfg.network_timeout_s)
        ae._servers.append(server)   # as AE.start_server does: server.shutdown() removes it
        self._ae, self._server = ae, server
        self.port = server.server_address[1]
        for name, target in (("dicom-accept", server.serve_forever),
                             ("series-completion", self._completion_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.log.info("gateway_listening", ae_title=self.cfg.ae_title, host=self.cfg.host,
                      port=self.port, store=str(self.store.root), fsync=self.cfg.fsync,
                      idle_timeout_s=self.cfg.idle_timeout_s, tls=self.cfg.tls.enabled,
                      peers=sorted(self.cfg.access.peers))

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for t in self._threads:
            t.join(5)
        self._threads = []

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _count(self, key: str) -> None:
        with self._counters_lock:
            self.counters[key] += 1

    def wait_for_passes(self, n: int, timeout_s: float) -> bool:
        """Block until the completion loop has made ``n`` more passes (each reports the
        series due at its time); for callers that must know a check happened."""
        with self._passes_cv:
            target = self._passes + n
            return self._passes_cv.wait_for(lambda: self._passes >= target, timeout_s)

    # -- events -----------------------------------------------------------------
    def _emit(self, event: str, body: dict) -> None:
        self.log.info(event, **{k: v for k, v in body.items() if k != "sop_instance_uids"})
        if self.event_sink is not None:
            try:
                self.event_sink(event, body)
            except Exception as e:  # noqa: BLE001 - a broken sink must not break reception
                self.log.error("event_sink_failed", event=event, error=repr(e))

    def _emit_throttled(self, event: str, key: tuple, body: dict) -> None:
        suppressed = self.throttle.admit((event, *key))
        if suppressed is not None:
            self._emit(event, dict(body, suppressed=suppressed))

    def _on_dropped(self, host: str, reason: str, age_s: float) -> None:
        self._count("dropped_connections")
        self._emit_throttled("connection_dropped", (reason, host),
                             {"peer_address": host, "reason": reason, "age_s": age_s})

    def _on_requested(self, event):
        """A-ASSOCIATE-RQ received: accept (the association holds a slot) or reject."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling, called = _ae_str(rq.calling_ae_title), _ae_str(rq.called_ae_title)
        address = str(assoc.requestor.address)
        adm = self.admission.decide(assoc, calling, called, address)
        if adm.peer is not None:
            self.guard.admitted(assoc.dul.socket.socket)
            return
        self._count("rejected_associations")
        self._emit_throttled("association_rejected", (adm.reason, address, calling), {
            "calling_ae_title": calling, "called_ae_title": called, "peer_address": address,
            "reason": adm.reason, "detail": adm.detail,
            "result": adm.reject[0], "source": adm.reject[1], "diagnostic": adm.reject[2]})
        assoc.acse.send_reject(*adm.reject)
        assoc.kill()   # as pynetdicom's own rejection: wait until the RJ is sent and closed

    def _on_established(self, event):
        aid = id(event.assoc)
        with self._assoc_lock:
            self._assoc_state[aid] = "open"
        req = event.assoc.requestor
        self.tracker.association_opened(aid, f"{_ae_str(req.ae_title)}@{req.address}")

    def _on_released(self, event):
        aid = id(event.assoc)
        with self._assoc_lock:
            if self._assoc_state.get(aid) != "open":
                return
            self._assoc_state[aid] = "released"
        self.tracker.association_released(aid)

    def _aborted(self, event, how: str):
        aid = id(event.assoc)
        with self._assoc_lock:
            if self._assoc_state.get(aid) != "open":
                return
            self._assoc_state[aid] = "aborted"
        series = self.tracker.association_aborted(aid)
        self._count("aborted_associations")
        req = event.assoc.requestor
        self._emit("association_aborted", {
            "how": how, "calling_ae_title": _ae_str(req.ae_title),
            "peer": f"{req.address}:{req.port}",
            "series": [{k: s[k] for k in ("patient_id", "study_uid", "series_uid", "modality",
                                          "count", "path")} for s in series]})

    def _on_aborted(self, event):
        self._aborted(event, "a-abort")

    def _on_conn_close(self, event):
        aid = id(event.assoc)
        with self._assoc_lock:
            state = self._assoc_state.get(aid)
        if state == "open":
            self._aborted(event, "connection closed without release")
        with self._assoc_lock:
            self._assoc_state.pop(aid, None)

    # -- C-STORE ----------------------------------------------------------------------
    def _on_store(self, event):
        req = event.request
        data = event.encoded_dataset(include_meta=False)
        aid = id(event.assoc)
        calling = _ae_str(event.assoc.requestor.ae_title)
        sop_class = str(req.AffectedSOPClassUID or "")
        peer = self.admission.peer_of(event.assoc)
        if peer is None or not may_store(peer, sop_class):
            return self._refuse_unauthorized(req, calling, peer)
        try:
            hdr = validate_dataset_bytes(
                data, event.context.transfer_syntax, expected_sop_class=sop_class,
                expected_sop_instance=str(req.AffectedSOPInstanceUID or ""))
        except ValidationFailure as f:
            return self._reject(f, req, _meta_or_empty(event), data, aid, calling)
        meta = encode_file_meta(event.file_meta)  # its UIDs are the validated ones
        conflict = self.store.claim(hdr.patient_id, hdr.study_uid, hdr.series_uid)
        if conflict:
            f = ValidationFailure(STATUS_MISMATCH, "identity_conflict", conflict)
            f.context = _context(hdr)
            return self._reject(f, req, meta, data, aid, calling)
        path = self.store.instance_path(hdr.patient_id, hdr.study_uid, hdr.series_uid,
                                        hdr.sop_instance_uid)
        self._seed_from_store(hdr, path.parent)
        try:
            result = self.store.store_instance(path, meta, data)
        except OSError as e:
            self._emit("store_failed", {"sop_instance_uid": hdr.sop_instance_uid,
                                        "path": str(path), "error": str(e)})
            return _status(STATUS_OUT_OF_RESOURCES, f"cannot store: {e}")
        if result.outcome is StoreOutcome.CONFLICT:
            f = ValidationFailure(STATUS_CANNOT_UNDERSTAND, "sop_instance_conflict",
                                  "SOP Instance UID already stored with different content")
            f.context = dict(_context(hdr), stored_path=str(path),
                             stored_sha256=result.stored_sha256,
                             received_sha256=result.received_sha256)
            return self._reject(f, req, meta, data, aid, calling)
        if result.outcome is StoreOutcome.IDENTICAL:
            self._count("resent_identical")
            self.log.info("instance_resent_identical", sop_instance_uid=hdr.sop_instance_uid,
                          calling_ae_title=calling)
        else:
            self._count("stored")
        self.tracker.instance_stored(aid, hdr, path, calling)
        return STATUS_SUCCESS

    def _seed_from_store(self, hdr, folder: Path) -> None:
        """First instance of a series since start-up: count what the store already holds
        of it (received before a restart)."""
        if self.tracker.knows(series_key(hdr)) or not folder.is_dir():
            return
        stored = []
        for p in sorted(folder.glob("*.dcm")):
            try:
                stored.append((read_instance_header(p), p))
            except Exception as e:  # noqa: BLE001 - a damaged file is reported, not fatal
                self.log.warning("stored_instance_unreadable", path=str(p), error=repr(e))
        if stored:
            self.tracker.seed(stored)

    def _refuse_unauthorized(self, req, calling: str, peer):
        sop_class = str(req.AffectedSOPClassUID or "")
        roles = list(peer.roles) if peer is not None else []
        self._count("rejected")
        self._emit("instance_rejected", {
            "status": f"0x{STATUS_NOT_AUTHORIZED:04X}", "reason": "not_authorized",
            "message": f"{calling} (roles {roles}) may not store SOP class {sop_class}",
            "affected_sop_class_uid": sop_class,
            "affected_sop_instance_uid": str(req.AffectedSOPInstanceUID or ""),
            "calling_ae_title": calling})
        return _status(STATUS_NOT_AUTHORIZED, f"{calling} may not store this SOP class")

    def _reject(self, f: ValidationFailure, req, meta, data, aid, calling):
        sop = str(req.AffectedSOPInstanceUID or "")
        sidecar = {"status": f"0x{f.status:04X}", "reason": f.reason, "message": f.message,
                   "affected_sop_class_uid": str(req.AffectedSOPClassUID or ""),
                   "affected_sop_instance_uid": sop, "calling_ae_title": calling,
                   "received_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **f.context}
        try:
            qpath = str(self.store.quarantine(f.reason, sop, meta, data, sidecar))
        except OSError as e:
            qpath = f"(quarantine failed: {e})"
        c = f.context
        if c.get("patient_id") and c.get("study_uid") and c.get("series_uid"):
            self.tracker.instance_rejected(aid, (c["patient_id"], c["study_uid"],
                                                 c["series_uid"]))
        self._count("rejected")
        self._emit("instance_rejected", dict(sidecar, quarantine_path=qpath))
        return _status(f.status, f.message)

    # -- background ------------------------------------------------------------------
    def _completion_loop(self):
        period = max(0.02, min(0.1, self.cfg.idle_timeout_s / 5))
        while not self._stop.wait(period):
            self.guard.reap(self.cfg.acse_timeout_s)
            for rep in self.tracker.due():
                if rep.event == "series_complete" and self.cfg.fsync == "series":
                    try:
                        self.store.sync_series(rep.folder)
                    except OSError as e:
                        self._emit("store_failed", {"series_uid": rep.body["series_uid"],
                                                    "error": str(e)})
                        continue
                key = "series_completed" if rep.event == "series_complete" else rep.event
                self._count(key)
                self._emit(rep.event, rep.body)
            with self._passes_cv:
                self._passes += 1
                self._passes_cv.notify_all()


def _context(hdr) -> dict:
    return {"sop_class_uid": hdr.sop_class_uid, "sop_instance_uid": hdr.sop_instance_uid,
            "patient_id": hdr.patient_id, "study_uid": hdr.study_uid,
            "series_uid": hdr.series_uid, "modality": hdr.modality}


def _meta_or_empty(event) -> bytes:
    try:
        return encode_file_meta(event.file_meta)
    except Exception:  # noqa: BLE001 - the quarantined copy then has no file meta
        return b""


def _status(code: int, comment: str) -> Dataset:
    """A status dataset; Error Comment (LO) without backslash or control characters,
    at most 64 characters."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = "".join(c if c.isprintable() and c != "\\" else "?"
                              for c in comment)[:64]
    return ds


def _ae_str(v) -> str:
    return (v.decode(errors="replace") if isinstance(v, bytes) else str(v)).strip()
