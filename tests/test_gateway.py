"""Gateway: validation, atomic store, quarantine, idle completion, aborts, resends, SCU."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from adaptive.errors import HandOffError
from services.config import GatewayConfig, TmsConfig
from services.gateway.scp import Gateway
from services.gateway.scu import send_files
from services.gateway.tracker import SeriesTracker
from services.gateway.validation import (
    CT_IMAGE,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MISMATCH,
    ValidationFailure,
    validate_dataset_bytes,
)
from services.local_peers import write_synthetic_ct
from tests.conftest import require_tool
from tests.gateway_helpers import ct_slice, encode_dataset, wait_until_checked


def _slice(**kw):
    args = {"patient_id": "P1", "study_uid": "1.2.3", "series_uid": "1.2.3.4",
            "for_uid": "1.2.3.5", "index": 0, "rows": 8, "cols": 6}
    args.update(kw)
    return ct_slice(**args)


def _validate(ds):
    return validate_dataset_bytes(encode_dataset(ds), ExplicitVRLittleEndian,
                                  expected_sop_class=CT_IMAGE,
                                  expected_sop_instance=str(ds.SOPInstanceUID))


# --- validation (pure) ------------------------------------------------------------

def test_valid_ct_header_is_read_without_pixels():
    ds = _slice(description="CBCT daily")
    hdr = _validate(ds)
    assert hdr.series_uid == "1.2.3.4" and hdr.frame_of_reference_uid == "1.2.3.5"
    assert hdr.modality == "CT" and hdr.series_description == "CBCT daily"
    assert hdr.pixel_data_bytes == 8 * 6 * 2


@pytest.mark.parametrize("mutate, reason", [
    (lambda ds: delattr(ds, "FrameOfReferenceUID"), "missing_uid"),
    (lambda ds: delattr(ds, "SeriesInstanceUID"), "missing_uid"),
    (lambda ds: delattr(ds, "ImagePositionPatient"), "missing_geometry"),
    (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), "bad_geometry"),
    (lambda ds: setattr(ds, "PixelSpacing", [0, 1]), "bad_geometry"),
    (lambda ds: setattr(ds, "PixelData", ds.PixelData[:-8]), "pixel_data_length"),
    (lambda ds: delattr(ds, "PixelData"), "missing_pixel_data"),
    (lambda ds: setattr(ds, "Modality", "MR"), "modality_mismatch"),
    (lambda ds: delattr(ds, "PatientID"), "missing_patient_id"),
])
def test_invalid_ct_is_rejected_with_reason(mutate, reason):
    ds = _slice()
    mutate(ds)
    with pytest.raises(ValidationFailure) as ei:
        _validate(ds)
    assert ei.value.reason == reason and ei.value.status == STATUS_MISMATCH


def test_sop_instance_must_match_request():
    ds = _slice()
    with pytest.raises(ValidationFailure) as ei:
        validate_dataset_bytes(encode_dataset(ds), ExplicitVRLittleEndian, expected_sop_class=CT_IMAGE,
                               expected_sop_instance="1.2.999")
    assert ei.value.reason == "sop_instance_mismatch"
    with pytest.raises(ValidationFailure) as ei:
        validate_dataset_bytes(encode_dataset(ds), ExplicitVRLittleEndian,
                               expected_sop_class="1.2.840.10008.5.1.4.1.1.481.5",
                               expected_sop_instance=str(ds.SOPInstanceUID))
    assert ei.value.reason == "sop_class_mismatch"


def test_truncated_stream_cannot_be_understood_or_is_short():
    data = encode_dataset(_slice())
    with pytest.raises(ValidationFailure) as ei:
        validate_dataset_bytes(data[: len(data) - 40], ExplicitVRLittleEndian,
                               expected_sop_class=CT_IMAGE,
                               expected_sop_instance=str(_slice().SOPInstanceUID))
    assert ei.value.status in (STATUS_MISMATCH, STATUS_CANNOT_UNDERSTAND)
    with pytest.raises(ValidationFailure) as ei:
        validate_dataset_bytes(b"\x08\x00\x16\x00UI\xff\x7fgarbage", ExplicitVRLittleEndian,
                               expected_sop_class=CT_IMAGE, expected_sop_instance="1")
    assert ei.value.status in (STATUS_MISMATCH, STATUS_CANNOT_UNDERSTAND)


# --- tracker (pure, fake clock) -----------------------------------------------------

def test_tracker_idle_abort_and_resend_rules():
    now = [0.0]
    tr = SeriesTracker(1.0, clock=lambda: now[0])
    hdr = _validate(_slice())
    tr.instance_stored(1, hdr, Path("/x/a.dcm"))
    now[0] = 5.0
    assert tr.due() == []                       # association 1 still open
    tr.association_aborted(1)
    now[0] = 10.0
    assert tr.due() == []                       # aborted: incomplete until a resend
    tr.instance_stored(2, hdr, Path("/x/a.dcm"))
    tr.association_released(2)
    now[0] = 10.5
    assert tr.due() == []                       # idle timeout not yet passed
    now[0] = 11.1
    done = tr.due()
    assert len(done) == 1 and done[0].event == "series_complete"
    assert done[0].body["count"] == 1 and done[0].body["completions"] == 1
    assert tr.due() == []                       # reported once


# --- SCP over the network ----------------------------------------------------------

class Events:
    def __init__(self):
        self.items, self.cv = [], threading.Condition()

    def __call__(self, event, body):
        with self.cv:
            self.items.append((time.monotonic(), event, body))
            self.cv.notify_all()

    def wait_for(self, event, n=1, timeout=30.0):
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                got = [b for _, e, b in self.items if e == event]
                if len(got) >= n:
                    return got
                left = end - time.monotonic()
                if left <= 0:
                    return got
                self.cv.wait(left)

    def names(self):
        return [e for _, e, _ in self.items]


@pytest.fixture
def gateway(tmp_path):
    ev = Events()
    gw = Gateway(GatewayConfig(port=0, idle_timeout_s=0.6, fsync="instance"),
                 tmp_path / "store", tmp_path / "quarantine", ev)
    gw.start()
    gw.events = ev
    yield gw
    gw.stop()


def _assoc(port, ae_title="ADAPTIVE_GW"):
    ae = AE(ae_title="IMAGER")
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
    ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    return assoc


def _series(n, **kw):
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "for_uid": generate_uid()}
    uids.update(kw)
    return [ct_slice(patient_id="PGW", index=k, rows=16, cols=12, **uids) for k in range(n)]


def test_store_writes_exact_dataset_then_completes_after_idle(gateway):
    slices = _series(5)
    assoc = _assoc(gateway.port)
    for ds in slices:
        assert assoc.send_c_store(ds).Status == 0x0000
        p = gateway.store.instance_path("PGW", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                        ds.SOPInstanceUID)
        assert p.is_file()                       # on disk before Success returned
    wait_until_checked(gateway, time.monotonic() + 1.0)   # > idle timeout, still open
    assert "series_complete" not in gateway.events.names()
    t_release = time.monotonic()
    assoc.release()
    done = gateway.events.wait_for("series_complete")
    assert len(done) == 1 and done[0]["count"] == 5
    t_done = next(t for t, e, _ in gateway.events.items if e == "series_complete")
    assert t_done - t_release >= 0.6 - 0.05
    folder = Path(done[0]["path"])
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 5 and not list(folder.glob(".tmp-*"))
    for ds in slices:
        back = pydicom.dcmread(folder / f"{ds.SOPInstanceUID}.dcm")
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert back.PixelData == ds.PixelData and back.ImagePositionPatient == \
            ds.ImagePositionPatient


def test_malformed_instance_is_refused_quarantined_and_reported(gateway):
    slices = _series(3)
    slices[1].PixelData = slices[1].PixelData[:-100]
    assoc = _assoc(gateway.port)
    st = [assoc.send_c_store(ds) for ds in slices]
    assoc.release()
    assert [s.Status for s in st] == [0, 0xA900, 0]
    assert "Pixel Data" in str(st[1].ErrorComment)
    rej = gateway.events.wait_for("instance_rejected")
    assert rej[0]["reason"] == "pixel_data_length"
    q = Path(rej[0]["quarantine_path"])
    assert q.is_file() and q.parent.name == "pixel_data_length"
    side = json.loads(q.with_suffix(".json").read_text())
    assert side["affected_sop_instance_uid"] == slices[1].SOPInstanceUID
    done = gateway.events.wait_for("series_complete")
    assert done[0]["count"] == 2 and done[0]["rejected"] == 1
    assert not gateway.store.instance_path("PGW", slices[1].StudyInstanceUID,
                                           slices[1].SeriesInstanceUID,
                                           slices[1].SOPInstanceUID).exists()


def test_aborted_association_keeps_series_incomplete_until_resent(gateway):
    slices = _series(6)
    assoc = _assoc(gateway.port)
    for ds in slices[:3]:
        assert assoc.send_c_store(ds).Status == 0
    assoc.abort()
    ab = gateway.events.wait_for("association_aborted")
    assert ab and ab[0]["series"][0]["count"] == 3
    wait_until_checked(gateway, time.monotonic() + 1.2)   # two idle timeouts
    assert "series_complete" not in gateway.events.names()
    assoc = _assoc(gateway.port)                  # resend everything (overwrites 0..2)
    for ds in slices:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    done = gateway.events.wait_for("series_complete")
    assert len(done) == 1 and done[0]["count"] == 6
    assert len(list(Path(done[0]["path"]).glob("*.dcm"))) == 6


def test_dropped_connection_counts_as_abort(gateway):
    slices = _series(2)
    assoc = _assoc(gateway.port)
    assert assoc.send_c_store(slices[0]).Status == 0
    assoc.dul.socket.socket.close()               # TCP gone without A-RELEASE or A-ABORT
    assoc.kill()
    ab = gateway.events.wait_for("association_aborted")
    assert ab
    wait_until_checked(gateway, time.monotonic() + 1.0)
    assert "series_complete" not in gateway.events.names()


def test_duplicate_series_is_idempotent_and_reported_again(gateway):
    slices = _series(4)
    for _ in range(2):
        assoc = _assoc(gateway.port)
        for ds in slices:
            assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        gateway.events.wait_for("series_complete", n=_ + 1)
    done = gateway.events.wait_for("series_complete", n=2)
    assert [d["completions"] for d in done] == [1, 2]
    assert [d["count"] for d in done] == [4, 4]
    assert len(list(Path(done[1]["path"]).glob("*.dcm"))) == 4


def test_dcmtk_storescu_series(gateway, tmp_path):
    storescu = require_tool("storescu", "dcmtk")
    paths = write_synthetic_ct(tmp_path / "in", 10, 64, 64, patient_id="PDCM", description="CBCT")
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run([storescu, "-aet", "IMAGER", "-aec", "ADAPTIVE_GW", "127.0.0.1",
                        str(gateway.port), *map(str, paths)], env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    done = gateway.events.wait_for("series_complete")
    sent = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert done[0]["count"] == 10 and done[0]["series_description"] == sent.SeriesDescription
    assert sent.SeriesDescription.endswith("CBCT")
    assert done[0]["calling_ae_titles"] == ["IMAGER"]


# --- SCU ---------------------------------------------------------------------------

def test_scu_sends_and_confirms_each_instance(gateway, tmp_path):
    paths = write_synthetic_ct(tmp_path / "out", 3, 16, 16, patient_id="PSCU")
    cfg = TmsConfig(ae_title="ADAPTIVE_GW", port=gateway.port, retries=1, backoff_s=0.0,
                    calling_ae_title="TPS")
    reports, batch = send_files(paths, cfg, outbox=tmp_path / "outbox", session_id="s1")
    assert all(r.ok and r.status == 0 for r in reports) and len(reports) == 3
    assert json.loads((batch / "report.json").read_text())["ok"] is True
    done = gateway.events.wait_for("series_complete")
    assert done[0]["count"] == 3


def test_scu_tms_down_retries_then_fails_keeping_outbox(tmp_path, refused_port):
    port = refused_port                           # nothing listens there
    paths = write_synthetic_ct(tmp_path / "out", 2, 8, 8)
    delays = []
    cfg = TmsConfig(port=port, retries=3, backoff_s=0.25, acse_timeout_s=1,
                    network_timeout_s=1)
    with pytest.raises(HandOffError) as ei:
        send_files(paths, cfg, outbox=tmp_path / "outbox", session_id="s2",
                   sleep=delays.append)
    assert delays == [0.25, 0.5, 1.0]
    assert all(r["attempts"] == 4 and not r["ok"] for r in ei.value.report)
    kept = sorted(p.name for p in ei.value.outbox.iterdir())
    assert len([k for k in kept if k.endswith(".dcm")]) == 2 and "report.json" in kept


def test_scu_permanent_refusal_is_not_retried(gateway, tmp_path):
    ds = _series(1)[0]
    ds.Modality = "MR"                            # our gateway refuses: 0xA900
    p = tmp_path / "bad.dcm"
    ds.save_as(p, enforce_file_format=True)
    cfg = TmsConfig(ae_title="ADAPTIVE_GW", port=gateway.port, retries=3, backoff_s=0.0,
                    calling_ae_title="TPS")
    with pytest.raises(HandOffError) as ei:
        send_files([p], cfg, outbox=tmp_path / "outbox", session_id="s3", sleep=lambda s: None)
    r = ei.value.report[0]
    assert r["status"] == 0xA900 and r["attempts"] == 1


def test_tracker_seeded_series_is_not_due_before_an_instance_arrives():
    """Instances found in the store (before a restart) alone never make a series due: it
    becomes due only after a new instance and the idle timeout (no race with seeding)."""
    now = [100.0]
    tr = SeriesTracker(1.0, clock=lambda: now[0])
    old = [_validate(_slice(index=k)) for k in range(3)]
    tr.seed([(h, Path(f"/x/{h.sop_instance_uid}.dcm")) for h in old])
    now[0] = 200.0
    assert tr.due() == []
    new = _validate(_slice(index=3))
    tr.instance_stored(1, new, Path("/x/new.dcm"))
    tr.association_released(1)
    now[0] = 201.5
    done = tr.due()
    assert [r.event for r in done] == ["series_complete"] and done[0].body["count"] == 4
