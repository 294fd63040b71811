"""Helpers for the DICOM gateway tests: the gateway's events captured as the orchestrator
receives them (ZeroMQ PULL), synthetic CT stacks with analytic geometry, associations,
and an independent check that every acknowledged instance is intact on disk."""

from __future__ import annotations

import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import zmq
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTPlanStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from services.auth import Authenticator, KeyStore, secure_server
from services.config import DicomPeer, GatewayAccessConfig, GatewayConfig, default_dicom_peers
from services.events import EventPusher
from services.gateway.scp import Gateway
from services.protocol import decode

CT_IMAGE = CTImageStorage
RT_PLAN = RTPlanStorage


def ct_slice(*, patient_id: str, study_uid: str, series_uid: str, for_uid: str, index: int,
             rows: int, cols: int, spacing_mm=(1.0, 1.0, 2.0), description: str = "CT",
             sop_uid: str | None = None, pixels: np.ndarray | None = None) -> Dataset:
    """One CT slice as a dataset in memory (synthetic pattern, complete geometry), for tests
    that send or break individual instances (files: :func:`services.local_peers.write_synthetic_ct`)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = "CT"
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1
    ds.SeriesNumber = 1
    ds.ImagePositionPatient = [-(cols - 1) * spacing_mm[0] / 2, -(rows - 1) * spacing_mm[1] / 2,
                               index * spacing_mm[2]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing_mm[1], spacing_mm[0]]
    ds.SliceThickness = spacing_mm[2]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if pixels is None:
        y, x = np.mgrid[0:rows, 0:cols]
        pixels = ((x + y + 7 * index) % 2048).astype(np.int16)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    return ds


class EventCapture:
    """A PULL socket bound on 127.0.0.1 and the gateway's own :class:`EventPusher`
    connected to it: the events exactly as ``adaptive serve`` sends them. With
    ``keys_root``, authenticated as the orchestrator's socket is (CURVE, services.auth):
    the keys under ``<keys_root>/keys`` are created, and only the gateway's key is admitted
    (for a gateway process started with that root)."""

    def __init__(self, keys_root: Path | None = None):
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.auth = None
        keys = None
        if keys_root is not None:
            store = KeyStore(keys_root)
            store.ensure_defaults()
            self.auth = Authenticator(self.ctx, store)
            self.auth.start()
            secure_server(self.pull, store.server_keys(), "gateway")
            keys = store.client_keys("gateway")
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.pusher = EventPusher(self.endpoint, context=self.ctx, linger_ms=500, keys=keys)
        self.items: list[tuple[float, str, dict]] = []
        self.cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self.pull.poll(50):
                header, _ = decode(self.pull.recv_multipart())
                if header["type"] != "gateway_event":
                    continue
                with self.cv:
                    self.items.append((time.monotonic(), header["event"], header["data"]))
                    self.cv.notify_all()

    def wait_for(self, event: str, n: int = 1, timeout: float = 15.0, where=None) -> list[dict]:
        """The bodies of ``event`` (at least ``n`` of them unless ``timeout`` passes)."""
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                got = [b for _, e, b in self.items
                       if e == event and (where is None or where(b))]
                left = end - time.monotonic()
                if len(got) >= n or left <= 0:
                    return got
                self.cv.wait(left)

    def names(self) -> list[str]:
        with self.cv:
            return [e for _, e, _ in self.items]

    def close(self):
        self.pusher.close()
        self._stop.set()
        self._thread.join(5)
        self.pull.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def peers_with(**extra: DicomPeer) -> dict[str, DicomPeer]:
    """The default loopback peers (IMAGER, TPS, ADAPTIVE_SUPERV) plus ``extra``."""
    return {**default_dicom_peers(), **extra}


def gateway_config(*, access: dict | None = None, **kw) -> GatewayConfig:
    args = {"port": 0, "idle_timeout_s": 0.5, "fsync": "instance", "acse_timeout_s": 2.0,
            "network_timeout_s": 5.0}
    args.update(kw)
    return GatewayConfig(access=GatewayAccessConfig(**(access or {})), **args)


class RunningGateway:
    """A :class:`Gateway` on 127.0.0.1 (free port) whose events go to an
    :class:`EventCapture`; ``root`` holds store/ and quarantine/."""

    def __init__(self, root: Path, cfg: GatewayConfig):
        self.root = Path(root)
        self.events = EventCapture()
        self.gw = Gateway(cfg, self.root / "store", self.root / "quarantine",
                          self.events.pusher)
        self.gw.start()
        self.port = self.gw.port

    def stop(self):
        self.gw.stop()
        self.events.close()


def associate(port: int, aet: str = "IMAGER", *, aec: str = "ADAPTIVE_GW",
              contexts=(CT_IMAGE,), transfer_syntaxes=(ExplicitVRLittleEndian,),
              bind_address=None, tls=None, timeout_s: float = 10.0):
    """An association as ``aet`` (not asserted established: callers check); ``timeout_s``:
    the requestor's ACSE, DIMSE and network timeouts."""
    ae = AE(ae_title=aet)
    for cx in contexts:
        ae.add_requested_context(cx, list(transfer_syntaxes))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    kw = {"ae_title": aec}
    if bind_address is not None:
        kw["bind_address"] = bind_address
    if tls is not None:
        kw["tls_args"] = tls
    return ae.associate("127.0.0.1", port, **kw)


def stack(n: int, *, patient_id: str = "PGW", rows: int = 8, cols: int = 6,
          spacing_mm: float = 2.5, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
          origin=(-10.0, 20.0, 30.0), study_uid=None, series_uid=None,
          description: str = "CBCT") -> list[pydicom.Dataset]:
    """``n`` CT slices whose positions are origin + k * spacing_mm * normal, normal = row x
    column of ``orientation`` (so the analytic slice positions are known to the test)."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    uids = {"study_uid": study_uid or generate_uid(), "series_uid": series_uid or generate_uid(),
            "for_uid": generate_uid()}
    out = []
    for k in range(n):
        ds = ct_slice(patient_id=patient_id, index=k, rows=rows, cols=cols,
                      description=description, **uids)
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 6)
                                   for v in np.asarray(origin) + k * spacing_mm * normal]
        out.append(ds)
    return out


def intact_on_disk(store_root: Path, acknowledged: dict[str, pydicom.Dataset]) -> int:
    """How many acknowledged instances (SOP Instance UID -> the dataset sent) are on disk
    exactly once, readable by pydicom and equal to what was sent (pixel data, identity and
    geometry attributes)."""
    files = {}
    for p in Path(store_root).rglob("*.dcm"):
        files.setdefault(p.stem, []).append(p)
    n = 0
    for uid, sent in acknowledged.items():
        paths = files.get(uid, [])
        if len(paths) != 1:
            continue
        back = pydicom.dcmread(paths[0])
        same = all(back.get(kw) == sent.get(kw) for kw in (
            "SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
            "ImagePositionPatient", "ImageOrientationPatient", "PixelData"))
        n += same and back.file_meta.MediaStorageSOPInstanceUID == uid
    return n


def send_raw(assoc, sop_class: str, sop_instance: str, data: bytes, msg_id: int = 1):
    """C-STORE arbitrary dataset bytes on an established association (as pynetdicom's
    send_c_store does after encoding): for bytes no encoder would produce. Returns the
    response status dataset (empty if none came)."""
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class)
    req = C_STORE()
    req.MessageID, req.Priority = msg_id, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_instance
    req.DataSet = BytesIO(data)
    assoc._reactor_checkpoint.clear()
    end = time.monotonic() + 10
    while not assoc._is_paused:             # as pynetdicom's send_c_store: reactor paused
        assert time.monotonic() < end, "association reactor did not pause within 10 s"
        time.sleep(0.0001)  # bounded poll (10 s), not synchronisation by time
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return assoc._check_received_status(rsp) if rsp is not None else pydicom.Dataset()


def encode_dataset(ds, implicit: bool = False) -> bytes:
    """The dataset's bytes (no file meta) in Explicit (or Implicit) VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def wait_until_checked(gw: Gateway, t: float, timeout: float = 15.0) -> None:
    """Return once the gateway's completion loop has made a full pass that began after
    monotonic time ``t``: whatever is due at ``t`` has been reported by then."""
    end = time.monotonic() + timeout
    while time.monotonic() < t:
        assert time.monotonic() < end, "completion loop not running"
        gw.wait_for_passes(1, 1.0)
    assert gw.wait_for_passes(2, max(0.1, end - time.monotonic())), "no completion pass"
