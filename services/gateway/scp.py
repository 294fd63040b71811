"""The gateway's Storage SCP (pynetdicom).

Per C-STORE, before answering: validate the encoded dataset (header tags only, see
:mod:`services.gateway.validation`), write it with its file meta header atomically into
the store (or quarantine it with a JSON reason and answer a failure status), then
update the series tracker. A background thread completes idle series and emits
``series_complete``; aborted associations emit ``association_aborted``; rejected
instances emit ``instance_rejected``. Events go to ``event_sink(event, body)``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta

from adaptive.log import get_logger
from services.config import GatewayConfig
from services.gateway.store import InstanceStore
from services.gateway.tracker import SeriesTracker
from services.gateway.validation import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    STORAGE_CLASSES,
    VERIFICATION,
    ValidationFailure,
    validate_dataset_bytes,
)

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
EventSink = Callable[[str, dict], None]


class Gateway:
    """Storage SCP + series completion. ``start()`` returns once it listens."""

    def __init__(self, cfg: GatewayConfig, store_dir: str | Path, quarantine_dir: str | Path,
                 event_sink: EventSink | None = None):
        self.cfg = cfg
        self.store = InstanceStore(store_dir, quarantine_dir, cfg.fsync)
        self.tracker = SeriesTracker(cfg.idle_timeout_s)
        self.event_sink = event_sink
        self.log = get_logger("services.gateway")
        self._server = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assoc_state: dict[int, str] = {}
        self._assoc_lock = threading.Lock()
        self.counters = {"stored": 0, "rejected": 0, "aborted_associations": 0,
                         "series_completed": 0}

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_pdu_size = self.cfg.max_pdu
        ae.maximum_associations = self.cfg.max_associations
        ae.acse_timeout = self.cfg.acse_timeout_s
        ae.dimse_timeout = self.cfg.dimse_timeout_s
        ae.network_timeout = self.cfg.network_timeout_s
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ESTABLISHED, self._on_established),
                    (evt.EVT_RELEASED, self._on_released),
                    (evt.EVT_ABORTED, self._on_aborted),
                    (evt.EVT_CONN_CLOSE, self._on_conn_close)]
        self._server = ae.start_server((self.cfg.host, self.cfg.port), block=False,
                                       evt_handlers=handlers)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._completion_loop, name="series-completion",
                                        daemon=True)
        self._thread.start()
        self.log.info("gateway_listening", ae_title=self.cfg.ae_title, host=self.cfg.host,
                      port=self.port, store=str(self.store.root), fsync=self.cfg.fsync,
                      idle_timeout_s=self.cfg.idle_timeout_s)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- events -----------------------------------------------------------------
    def _emit(self, event: str, body: dict) -> None:
        self.log.info(event, **{k: v for k, v in body.items() if k != "sop_instance_uids"})
        if self.event_sink is not None:
            try:
                self.event_sink(event, body)
            except Exception as e:  # a broken sink must not break reception
                self.log.error("event_sink_failed", event=event, error=repr(e))

    def _on_established(self, event):
        aid = id(event.assoc)
        with self._assoc_lock:
            self._assoc_state[aid] = "open"
        self.tracker.association_opened(aid)

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
        self.counters["aborted_associations"] += 1
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

    def _on_store(self, event):
        req = event.request
        data = event.encoded_dataset(include_meta=False)
        meta = encode_file_meta(event.file_meta)
        aid = id(event.assoc)
        calling = _ae_str(event.assoc.requestor.ae_title)
        try:
            hdr = validate_dataset_bytes(
                data, event.context.transfer_syntax,
                expected_sop_class=str(req.AffectedSOPClassUID),
                expected_sop_instance=str(req.AffectedSOPInstanceUID))
        except ValidationFailure as f:
            return self._reject(f, req, meta, data, aid, calling)
        path = self.store.instance_path(hdr.patient_id, hdr.study_uid, hdr.series_uid,
                                        hdr.sop_instance_uid)
        try:
            self.store.write(path, meta, data)
        except OSError as e:
            self._emit("store_failed", {"sop_instance_uid": hdr.sop_instance_uid,
                                        "path": str(path), "error": str(e)})
            return _status(STATUS_OUT_OF_RESOURCES, f"cannot store: {e}")
        self.tracker.instance_stored(aid, hdr, path, calling)
        self.counters["stored"] += 1
        return STATUS_SUCCESS

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
        if f.context.get("series_uid"):
            self.tracker.instance_rejected(aid, f.context["series_uid"])
        self.counters["rejected"] += 1
        self._emit("instance_rejected", dict(sidecar, quarantine_path=qpath))
        return _status(f.status, f.message)

    def _completion_loop(self):
        period = max(0.02, min(0.1, self.cfg.idle_timeout_s / 5))
        while not self._stop.wait(period):
            for body, folder in self.tracker.due():
                if self.cfg.fsync == "series":
                    try:
                        self.store.sync_series(folder)
                    except OSError as e:
                        self._emit("store_failed", {"series_uid": body["series_uid"],
                                                    "error": str(e)})
                        continue
                self.counters["series_completed"] += 1
                self._emit("series_complete", body)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _ae_str(v) -> str:
    return (v.decode(errors="replace") if isinstance(v, bytes) else str(v)).strip()
