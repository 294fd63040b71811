"""The DICOM gateway under bad input, faults and strangers (issue 13, gateway part).

Every test talks to a real gateway on 127.0.0.1 (pynetdicom or DCMTK storescu as the
sender), captures the events on a ZeroMQ PULL socket as the orchestrator would, and
checks the DIMSE status or A-ASSOCIATE-RJ, the event, the resulting state, and that every
acknowledged instance is on disk and intact (read back with pydicom, compared with what
was sent). No fixed sleeps: waits are bounded and by condition.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from adaptive.errors import ServiceError
from services.config import DicomPeer, GatewayTlsConfig, write_config_variant
from services.gateway.completeness import SliceGeometry, check_slice_stack
from services.ready import wait_for_ready
from tests.conftest import require_tool
from tests.gateway_helpers import (
    CT_IMAGE,
    RT_PLAN,
    EventCapture,
    RunningGateway,
    associate,
    encode_dataset,
    gateway_config,
    intact_on_disk,
    peers_with,
    send_raw,
    stack,
    wait_until_checked,
)

SERIES_EVENTS = ("series_complete", "series_incomplete")


@pytest.fixture
def start(tmp_path):
    """start(root=None, **GatewayConfig fields) -> RunningGateway; stopped at the end."""
    running = []

    def _start(root=None, **kw):
        rg = RunningGateway(root or tmp_path / f"gw{len(running)}", gateway_config(**kw))
        running.append(rg)
        return rg

    yield _start
    for rg in running:
        rg.stop()


@pytest.fixture
def lax_pydicom(monkeypatch):
    """Let the test build invalid values (the conftest makes pydicom raise on them)."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.WARN)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)


def _send_all(assoc, datasets, acknowledged: dict) -> list[int]:
    out = []
    for ds in datasets:
        st = assoc.send_c_store(ds)
        out.append(int(st.Status) if "Status" in st else -1)  # -1: no response (aborted)
        if st.Status == 0x0000:
            acknowledged[str(ds.SOPInstanceUID)] = ds
    return out


def _rt_plan(patient_id: str = "PGW") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RT_PLAN, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = RT_PLAN
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.Modality = patient_id, "RTPLAN"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.RTPlanLabel = "TEST"
    return ds


def _storescu(port, files, aet="IMAGER", extra=()):
    exe = require_tool("storescu", "dcmtk")
    return subprocess.run([exe, *extra, "-aet", aet, "-aec", "ADAPTIVE_GW", "127.0.0.1",
                           str(port), *map(str, files)], env=dict(os.environ, TCP_NODELAY="1"),
                          capture_output=True, text=True, timeout=60, check=False)


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the other end closes ``sock`` within ``timeout`` s (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            if sock.recv(4096) == b"":
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


# --- item 7: identifiers, file names, resends, identity -----------------------------------

BAD_UIDS = [("1.2.03", "leading zero"), ("1.2.3/4", "digits"), ("1.2.3.4.5.", "empty"),
            ("../../../tmp/x", "empty"), ("1..2", "empty"), ("1.2.3.a", "digits")]


def test_invalid_uids_are_refused_with_a_status_and_never_collide(start, lax_pydicom):
    """Each invalid UID (as SOP Instance UID, or as Series UID with a path in it) gets
    0xA900 with the rule in Error Comment, on a live association; valid UIDs that an
    old sanitiser mapped together ("1.2.3.4.5" and "1.2.3.4.5.") can no longer meet in
    one file: every acknowledged instance is its own file, intact."""
    rg = start()
    good = stack(3)
    bad = []
    for uid, _ in BAD_UIDS:
        ds = stack(1, series_uid=good[0].SeriesInstanceUID,
                   study_uid=good[0].StudyInstanceUID)[0]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        bad.append(ds)
    evil_series = stack(1)[0]
    evil_series.SeriesInstanceUID = "1.2/../../../escaped"
    bad.append(evil_series)
    good[0].SOPInstanceUID = good[0].file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    acknowledged = {}
    assoc = associate(rg.port)
    assert assoc.is_established
    statuses = _send_all(assoc, [good[0], *bad, *good[1:]], acknowledged)
    assert assoc.is_established                     # refused instance by instance, no abort
    assoc.release()
    assert statuses == [0] + [0xA900] * len(bad) + [0, 0]
    rejected = rg.events.wait_for("instance_rejected", n=len(bad))
    assert [r["reason"] for r in rejected] == ["invalid_uid"] * len(bad)
    comments = [r["message"] for r in rejected]
    for (_, rule), msg in zip(BAD_UIDS, comments):
        assert rule in msg
    assert "SeriesInstanceUID" in comments[-1]
    assert "association_aborted" not in rg.events.names()
    assert intact_on_disk(rg.root / "store", acknowledged) == len(acknowledged) == 3
    # no folder or file name came from an invalid UID, inside the store or outside it
    assert not [p for p in rg.root.parent.rglob("*escaped*") if p.is_dir()]
    assert not list(Path("/tmp").glob("x.dcm"))
    names = sorted(p.name for p in (rg.root / "store").rglob("*.dcm"))
    assert names == sorted(f"{u}.dcm" for u in acknowledged)


def test_uid_longer_than_64_characters_from_dcmtk_gets_a_failure_status(start, tmp_path,
                                                                         lax_pydicom):
    """DCMTK sends a 70-character SOP Instance UID (it truncates the one in the command
    set): refused with 0xA900 invalid_uid, and the next file on the same association is
    stored (no abort)."""
    rg = start()
    long_ds, ok_ds = stack(2)
    long_ds.SOPInstanceUID = long_ds.file_meta.MediaStorageSOPInstanceUID = "1." + "1" * 68
    paths = [tmp_path / "long.dcm", tmp_path / "ok.dcm"]
    long_ds.save_as(paths[0], enforce_file_format=True)
    ok_ds.save_as(paths[1], enforce_file_format=True)
    _storescu(rg.port, paths, extra=("--no-halt",))    # carry on after a failure status
    rej = rg.events.wait_for("instance_rejected")
    assert rej[0]["reason"] == "invalid_uid" and rej[0]["status"] == "0xA900"
    assert "64" in rej[0]["message"]
    done = rg.events.wait_for("series_complete")
    assert done[0]["count"] == 1
    assert "association_aborted" not in rg.events.names()
    assert intact_on_disk(rg.root / "store", {str(ok_ds.SOPInstanceUID): ok_ds}) == 1


def test_affected_uid_longer_than_64_characters_gets_a_status_not_an_abort(start, lax_pydicom):
    """A C-STORE request whose command set carries a 70-character Affected SOP Instance
    UID (pynetdicom alone aborted the association: it could not build the primitive) is
    answered 0xA900 invalid_uid; the association goes on and stores the next slice."""
    rg = start()
    bad, ok = stack(2)
    bad.SOPInstanceUID = "1." + "2" * 68
    a = associate(rg.port)
    st = send_raw(a, CT_IMAGE, str(bad.SOPInstanceUID), encode_dataset(bad))
    assert st.Status == 0xA900 and "64" in str(st.ErrorComment)
    assert a.is_established and a.send_c_store(ok).Status == 0
    a.release()
    assert rg.events.wait_for("instance_rejected")[0]["reason"] == "invalid_uid"
    assert rg.events.wait_for("series_complete")[0]["count"] == 1
    assert "association_aborted" not in rg.events.names()
    assert intact_on_disk(rg.root / "store", {str(ok.SOPInstanceUID): ok}) == 1


def test_resent_instance_identical_is_success_different_is_refused(start):
    """Same SOP Instance UID again: identical content (also re-encoded in Implicit VR)
    -> Success, one file; different content -> 0xC000 sop_instance_conflict, the first
    copy stays on disk unchanged, the second is quarantined with both hashes."""
    rg = start()
    first = stack(2)
    acknowledged = {}
    a = associate(rg.port, transfer_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian))
    assert _send_all(a, first, acknowledged) == [0, 0]
    a.release()
    rg.events.wait_for("series_complete")
    # identical resend on a new association, re-encoded by pynetdicom in Implicit VR
    b = associate(rg.port, transfer_syntaxes=(ImplicitVRLittleEndian,))
    assert _send_all(b, [first[0]], {}) == [0]
    b.release()
    changed = copy.deepcopy(first[1])
    changed.PixelData = np.full(48, 7, np.int16).tobytes()
    c = associate(rg.port)
    st = c.send_c_store(changed)
    c.release()
    assert st.Status == 0xC000 and "different content" in str(st.ErrorComment)
    rej = rg.events.wait_for("instance_rejected")
    assert rej[0]["reason"] == "sop_instance_conflict"
    assert rej[0]["stored_sha256"] != rej[0]["received_sha256"]
    q = Path(rej[0]["quarantine_path"])
    assert pydicom.dcmread(q).PixelData == changed.PixelData
    assert json.loads(q.with_suffix(".json").read_text())["stored_path"].endswith(
        f"{first[1].SOPInstanceUID}.dcm")
    assert intact_on_disk(rg.root / "store", acknowledged) == 2
    assert len(list((rg.root / "store").rglob("*.dcm"))) == 2
    assert rg.gw.counters["resent_identical"] == 1


def test_one_series_uid_for_two_patients_is_quarantined_also_after_restart(start, tmp_path):
    """A second patient's instance under the first patient's Series UID (or Study UID) is
    refused with 0xA900 identity_conflict and quarantined; the first patient's series is
    reported with only its own instances; a restarted gateway still knows the owner."""
    rg = start(root=tmp_path / "gw")
    p1 = stack(3, patient_id="P1")
    intruder = stack(1, patient_id="P2", series_uid=p1[0].SeriesInstanceUID)[0]
    study_intruder = stack(1, patient_id="P3", study_uid=p1[0].StudyInstanceUID)[0]
    acknowledged = {}
    a = associate(rg.port)
    statuses = _send_all(a, [*p1[:2], intruder, study_intruder, p1[2]], acknowledged)
    a.release()
    assert statuses == [0, 0, 0xA900, 0xA900, 0]
    rej = rg.events.wait_for("instance_rejected", n=2)
    assert [r["reason"] for r in rej] == ["identity_conflict"] * 2
    assert "belongs to patient 'P1'" in rej[0]["message"]
    assert all(Path(r["quarantine_path"]).is_file() for r in rej)
    done = rg.events.wait_for("series_complete")
    assert done[0]["patient_id"] == "P1" and done[0]["count"] == 3
    assert not any((rg.root / "store").glob("P2")) and not any((rg.root / "store").glob("P3"))
    rg.stop()
    rg2 = start(root=tmp_path / "gw")               # same store: the index is rebuilt
    again = stack(1, patient_id="P2", series_uid=p1[0].SeriesInstanceUID)[0]
    b = associate(rg2.port)
    assert b.send_c_store(again).Status == 0xA900
    b.release()
    assert rg2.events.wait_for("instance_rejected")[0]["reason"] == "identity_conflict"
    assert intact_on_disk(rg.root / "store", acknowledged) == 3


# --- item 8: series completeness -------------------------------------------------------------

OBLIQUE = (0.8, 0.6, 0.0, 0.0, 0.0, -1.0)   # rows along (0.8, 0.6, 0); normal (-0.6, 0.8, 0)


def test_gap_along_the_slice_normal_is_reported_incomplete_until_filled(start):
    """Ten oblique slices 2.5 mm apart along n = row x col with the fifth missing: the
    series is reported incomplete (a 5.0 mm step, one slice missing), never complete;
    when the missing slice arrives it is reported complete with all ten."""
    rg = start()
    slices = stack(10, orientation=OBLIQUE, spacing_mm=2.5)
    acknowledged = {}
    a = associate(rg.port)
    assert _send_all(a, slices[:4] + slices[5:], acknowledged) == [0] * 9
    a.release()
    inc = rg.events.wait_for("series_incomplete")
    assert inc[0]["reason"] == "gap" and inc[0]["missing"] == 1 and inc[0]["count"] == 9
    assert inc[0]["slice_spacing_mm"] == pytest.approx(2.5, abs=1e-3)
    assert "5.000 mm" in inc[0]["detail"]
    assert "series_complete" not in rg.events.names()
    b = associate(rg.port)
    assert _send_all(b, [slices[4]], acknowledged) == [0]
    b.release()
    done = rg.events.wait_for("series_complete")
    assert done[0]["count"] == 10 and done[0]["completions"] == 1
    assert intact_on_disk(rg.root / "store", acknowledged) == 10


def test_count_short_of_images_in_acquisition_is_incomplete(start):
    """The imager says Images in Acquisition = 12; 8 contiguous slices arrive (no inner
    gap): incomplete (count_mismatch, 4 missing), then complete when the rest arrive."""
    rg = start()
    slices = stack(12)
    for ds in slices:
        ds.ImagesInAcquisition = 12
    acknowledged = {}
    a = associate(rg.port)
    _send_all(a, slices[:8], acknowledged)
    a.release()
    inc = rg.events.wait_for("series_incomplete")
    assert inc[0]["reason"] == "count_mismatch" and inc[0]["expected_count"] == 12
    assert inc[0]["missing"] == 4 and "ImagesInAcquisition" in inc[0]["detail"]
    b = associate(rg.port)
    _send_all(b, slices[8:], acknowledged)
    b.release()
    done = rg.events.wait_for("series_complete")
    assert done[0]["count"] == 12 and done[0]["expected_count"] == 12
    assert intact_on_disk(rg.root / "store", acknowledged) == 12


def test_paused_sender_does_not_let_a_partial_series_complete(start):
    """The sender releases after 5 of 10 slices, opens its next association and pauses
    longer than three idle timeouts before sending: nothing is reported during the pause
    (checked after completion passes that began after it); the whole series is reported
    complete after the second association is released. The same pause inside one open
    association carrying the series holds it too."""
    rg = start(idle_timeout_s=0.3)
    slices = stack(10)
    acknowledged = {}
    a = associate(rg.port)
    _send_all(a, slices[:5], acknowledged)
    a.release()
    b = associate(rg.port)                          # open, nothing sent yet
    wait_until_checked(rg.gw, time.monotonic() + 3 * 0.3)
    assert not [e for e in rg.events.names() if e in SERIES_EVENTS]
    _send_all(b, slices[5:8], acknowledged)         # pause within an open association
    wait_until_checked(rg.gw, time.monotonic() + 3 * 0.3)
    assert not [e for e in rg.events.names() if e in SERIES_EVENTS]
    _send_all(b, slices[8:], acknowledged)
    b.release()
    done = rg.events.wait_for("series_complete")
    assert done[0]["count"] == 10 and not rg.events.names().count("series_incomplete")
    assert intact_on_disk(rg.root / "store", acknowledged) == 10


def test_instances_stored_before_a_restart_count_towards_the_series(start, tmp_path):
    """Half a series arrives, the gateway is stopped, the other half arrives at a new
    gateway on the same store: one complete series of all slices (no false gap)."""
    rg = start(root=tmp_path / "gw")
    slices = stack(8)
    acknowledged = {}
    a = associate(rg.port)
    _send_all(a, slices[:4], acknowledged)
    a.abort()
    rg.events.wait_for("association_aborted")
    rg.stop()
    rg2 = start(root=tmp_path / "gw")
    b = associate(rg2.port)
    _send_all(b, slices[4:], acknowledged)
    b.release()
    done = rg2.events.wait_for("series_complete")
    assert done[0]["count"] == 8
    assert intact_on_disk(tmp_path / "gw" / "store", acknowledged) == 8


@pytest.mark.parametrize("case, reason", [
    ("complete", ""), ("gap", "gap"), ("duplicate", "duplicate_position"),
    ("extra", "irregular_spacing"), ("tilted_orientation", "orientation_mismatch"),
    ("count_short", "count_mismatch"), ("counts_disagree", "count_mismatch"),
])
def test_slice_stack_check_against_analytic_positions(case, reason):
    """Positions built analytically along an oblique normal; the check must find exactly
    the defect put in (and none in the complete stack, given in shuffled order)."""
    row, col = np.array([0.8, 0.6, 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, col)
    o = tuple(row) + tuple(col)
    pos = [tuple(np.array([5.0, -3.0, 40.0]) + 1.25 * k * normal) for k in range(20)]
    count = None
    if case == "gap":
        del pos[7:9]
    elif case == "duplicate":
        pos.append(pos[3])
    elif case == "extra":
        pos.append(tuple(np.asarray(pos[3]) + 0.5 * normal))
    if case == "count_short":
        count = 24
    slices = [SliceGeometry(p, o, count, "ImagesInAcquisition" if count else "")
              for p in pos]
    if case == "tilted_orientation":
        slices[5] = SliceGeometry(pos[5], (1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    if case == "counts_disagree":
        slices = [SliceGeometry(p, o, 20 if k else 21, "ImagesInAcquisition")
                  for k, p in enumerate(pos)]
    rng = np.random.default_rng(3)
    check = check_slice_stack([slices[i] for i in rng.permutation(len(slices))])
    assert check.complete == (reason == "") and check.reason == reason
    assert check.slice_spacing_mm == pytest.approx(1.25, abs=1e-9) or case == "tilted_orientation"
    if case == "gap":
        assert check.missing == 2
    if case == "count_short":
        assert check.missing == 4 and check.expected_count == 24


# --- item 5: denial of service --------------------------------------------------------------

def test_pynetdicom_alone_lets_a_partial_pdu_hold_a_slot():
    """What pynetdicom 3.0.4 does by itself (the reason for our connection guard): a
    connection that sends nothing is closed after acse_timeout, but one that sent one
    byte of a PDU stays open past acse_timeout + network_timeout (blocking recv, no
    socket timeout) and keeps a real association out (local limit exceeded)."""
    ae = AE(ae_title="PLAIN")
    ae.add_supported_context(Verification)
    ae.acse_timeout = ae.network_timeout = 0.5
    ae.maximum_associations = 1
    server = ae.start_server(("127.0.0.1", 0), block=False)
    port = server.server_address[1]
    silent = socket.create_connection(("127.0.0.1", port))
    partial = socket.create_connection(("127.0.0.1", port))
    partial.sendall(b"\x01")
    try:
        assert _closed_by_peer(silent, 10.0)           # its timers ran
        assert not _closed_by_peer(partial, 2.0)       # > acse + network timeouts later
        client = AE(ae_title="IMAGER")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", port, ae_title="PLAIN")
        assert assoc.is_rejected
        assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.result_source,
                assoc.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        silent.close()
        partial.close()
        server.shutdown()


def test_idle_and_trickling_strangers_cannot_block_the_imager(start):
    """Twenty-four strangers (half silent, half that sent one byte) connect before the
    imager: the imager still associates at once and its series completes; the gateway
    keeps at most max_pending_per_host (8) of them and closes every one of them by the
    ACSE timeout; the drops are reported (throttled) to the orchestrator."""
    rg = start(acse_timeout_s=1.5, max_associations=8)
    strangers = []
    for k in range(24):
        s = socket.create_connection(("127.0.0.1", rg.port))
        if k % 2:
            s.sendall(b"\x01")
        strangers.append(s)
    end = time.monotonic() + 10
    while rg.gw.counters["dropped_connections"] < 16 and time.monotonic() < end:
        rg.events.wait_for("connection_dropped", timeout=0.2)
    assert rg.gw.guard.pending_count() <= 8
    slices = stack(5)
    acknowledged = {}
    a = associate(rg.port)
    assert a.is_established
    assert _send_all(a, slices, acknowledged) == [0] * 5
    a.release()
    assert rg.events.wait_for("series_complete")[0]["count"] == 5
    assert all(_closed_by_peer(s, 10.0) for s in strangers)
    reasons = {e["reason"] for e in rg.events.wait_for(
        "connection_dropped", n=2, timeout=10.0)}
    assert reasons == {"evicted_for_new_connection", "no_association_within_acse_timeout"}
    assert rg.gw.counters["dropped_connections"] >= 17   # 16 + 1 evicted, the rest reaped
    for s in strangers:
        s.close()
    assert intact_on_disk(rg.root / "store", acknowledged) == 5


def test_association_limits_per_peer_and_reserved_imaging_slot(start):
    """max 4 associations, 2 per peer, 1 kept for imaging: a third TPS association and a
    planning peer taking the last non-reserved slot... are refused with A-ASSOCIATE-RJ
    rejected-transient / service-provider (presentation) / local-limit-exceeded, while
    the imager still gets the reserved slot and stores."""
    rg = start(max_associations=4, access={
        "peers": peers_with(TPS2=DicomPeer("TPS2", ("planning",))),
        "max_associations_per_peer": 2, "reserved_for_imaging": 1})
    held = [associate(rg.port, "TPS"), associate(rg.port, "TPS")]
    assert all(x.is_established for x in held)
    third = associate(rg.port, "TPS")
    held.append(associate(rg.port, "TPS2"))
    assert held[-1].is_established
    fifth = associate(rg.port, "TPS2")
    imager = associate(rg.port, "IMAGER")
    for refused in (third, fifth):
        p = refused.acceptor.primitive
        assert refused.is_rejected and (p.result, p.result_source, p.diagnostic) == (2, 3, 2)
    rej = rg.events.wait_for("association_rejected", n=2)
    assert [r["reason"] for r in rej] == ["peer_limit", "association_limit"]
    assert imager.is_established
    ds = stack(1)[0]
    assert imager.send_c_store(ds).Status == 0
    imager.release()
    for x in held:
        x.release()
    assert intact_on_disk(rg.root / "store", {str(ds.SOPInstanceUID): ds}) == 1


# --- item 4: allow-listed AE titles and addresses, roles, TLS -------------------------------

def test_strangers_are_rejected_with_the_proper_reason(start, tmp_path):
    """Unknown calling AE title -> RJ permanent/service-user/calling-AE-not-recognized
    (3); wrong called AE title -> called-AE-not-recognized (7); a known AE title from
    an address not listed for it -> 3; an address listed for no peer -> closed before
    any association; DCMTK's default AE title gets nothing stored."""
    rg = start(access={"peers": peers_with(TPS=DicomPeer("TPS", ("planning",),
                                                         ("127.0.0.2",)))})
    cases = [(associate(rg.port, "STRANGER"), 3), (associate(rg.port, aec="OTHER_AE"), 7),
             (associate(rg.port, "IMAGER", bind_address=("127.0.0.2", 0)), 3)]
    for assoc, diag in cases:
        p = assoc.acceptor.primitive
        state = {k: getattr(assoc, k) for k in ("is_rejected", "is_aborted", "is_established")}
        assert assoc.is_rejected, (diag, state)
        assert (p.result, p.result_source, p.diagnostic) == (1, 1, diag)
    rej = rg.events.wait_for("association_rejected", n=3)
    assert [r["reason"] for r in rej] == ["calling_ae_not_recognized",
                                          "called_ae_not_recognized",
                                          "calling_ae_not_recognized"]
    assert rej[2]["peer_address"] == "127.0.0.2"
    tps = associate(rg.port, "TPS", bind_address=("127.0.0.2", 0))
    assert tps.is_established
    tps.release()
    s = socket.create_connection(("127.0.0.1", rg.port), source_address=("127.0.0.3", 0))
    assert _closed_by_peer(s, 5.0)
    s.close()
    assert rg.events.wait_for("connection_dropped")[0]["reason"] == "address_not_allowed"
    path = tmp_path / "one.dcm"
    stack(1)[0].save_as(path, enforce_file_format=True)
    r = _storescu(rg.port, [path], aet="STORESCU")
    assert r.returncode != 0
    assert rg.events.wait_for("association_rejected", n=4)[3]["calling_ae_title"] == "STORESCU"
    assert not list((rg.root / "store").rglob("*.dcm"))


def test_roles_limit_what_a_peer_may_store(start):
    """The imaging system may not store an RT Plan (0x0124 Refused: Not authorized, with
    an event, nothing stored); the planning system may."""
    rg = start()
    plan = _rt_plan()
    imager = associate(rg.port, "IMAGER", contexts=(CT_IMAGE, RT_PLAN))
    st = imager.send_c_store(plan)
    imager.release()
    assert st.Status == 0x0124
    rej = rg.events.wait_for("instance_rejected")
    assert rej[0]["reason"] == "not_authorized" and "IMAGER" in rej[0]["message"]
    assert not list((rg.root / "store").rglob("*.dcm"))
    tps = associate(rg.port, "TPS", contexts=(RT_PLAN,))
    assert tps.send_c_store(plan).Status == 0
    tps.release()
    assert intact_on_disk(rg.root / "store", {str(plan.SOPInstanceUID): plan}) == 1


def _openssl_self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    exe = require_tool("openssl", "openssl")
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run([exe, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    return key, cert


def test_tls_with_client_certificates(start, tmp_path):
    """Gateway with a self-signed certificate that requires client certificates: DCMTK
    storescu over TLS with its certificate stores a series, intact; a plain-TCP client
    and a TLS client without a certificate get nothing; a stranger that connects and
    never starts the TLS handshake does not hold up the others."""
    gw_key, gw_cert = _openssl_self_signed(tmp_path, "gateway")
    cl_key, cl_cert = _openssl_self_signed(tmp_path, "imager")
    rg = start(tls=GatewayTlsConfig(certificate=gw_cert, private_key=gw_key,
                                    client_ca=cl_cert))
    silent = socket.create_connection(("127.0.0.1", rg.port))   # never sends ClientHello
    slices = stack(4)
    paths = []
    for k, ds in enumerate(slices):
        paths.append(tmp_path / f"s{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    r = _storescu(rg.port, paths, extra=("+tls", str(cl_key), str(cl_cert), "+cf",
                                         str(gw_cert)))
    assert r.returncode == 0, r.stderr
    assert rg.events.wait_for("series_complete")[0]["count"] == 4
    plain = associate(rg.port)
    assert not plain.is_established
    anon = ssl.create_default_context(cafile=str(gw_cert))
    no_cert = associate(rg.port, tls=(anon, "127.0.0.1"))
    assert not no_cert.is_established
    silent.close()
    assert intact_on_disk(rg.root / "store", {str(d.SOPInstanceUID): d for d in slices}) == 4
    assert len(list((rg.root / "store").rglob("*.dcm"))) == 4


# --- the cases that already worked, kept working ------------------------------------------

def test_non_dicom_bytes_and_encapsulated_pixels_on_a_little_endian_context(start):
    """Bytes that are not a dataset -> 0xC000; a dataset with encapsulated (compressed)
    Pixel Data sent on an uncompressed context -> 0xA900 pixel_data_length; both
    quarantined, association alive, the valid slice after them stored."""
    rg = start()
    a = associate(rg.port)
    st = send_raw(a, CT_IMAGE, generate_uid(), b"this is not DICOM at all" * 40, msg_id=1)
    assert st.Status in (0xA900, 0xC000)
    enc = stack(1)[0]
    raw = bytearray(encode_dataset(enc))
    i = raw.index(b"\xe0\x7f\x10\x00OW")
    raw[i + 8:i + 12] = (0xFFFFFFFF).to_bytes(4, "little")   # undefined length
    st = send_raw(a, CT_IMAGE, str(enc.SOPInstanceUID), bytes(raw), msg_id=2)
    assert st.Status == 0xA900
    ok = stack(1)[0]
    assert a.send_c_store(ok).Status == 0
    a.release()
    rej = rg.events.wait_for("instance_rejected", n=2)
    assert rej[0]["reason"] in ("undecodable", "missing_uid")
    assert rej[1]["reason"] == "pixel_data_length"
    assert all(Path(r["quarantine_path"]).is_file() for r in rej)
    assert intact_on_disk(rg.root / "store", {str(ok.SOPInstanceUID): ok}) == 1


def test_compressed_transfer_syntax_is_not_negotiated(start, tmp_path):
    """A JPEG Lossless file (DCMTK dcmcjpeg) cannot be sent: the gateway accepts only
    uncompressed contexts, storescu reports it, the gateway stays up for the next file."""
    exe = require_tool("dcmcjpeg", "dcmtk")
    src, jpg, plain = tmp_path / "src.dcm", tmp_path / "jpg.dcm", tmp_path / "plain.dcm"
    ds, ok = stack(2, rows=16, cols=16)
    ds.save_as(src, enforce_file_format=True)
    ok.save_as(plain, enforce_file_format=True)
    subprocess.run([exe, str(src), str(jpg)], check=True, capture_output=True, timeout=60)
    rg = start()
    r = _storescu(rg.port, [jpg])
    assert r.returncode != 0 and "unable to convert dataset from 'jpeg" in r.stderr.lower()
    assert _storescu(rg.port, [plain]).returncode == 0
    assert rg.events.wait_for("series_complete")[0]["count"] == 1
    assert intact_on_disk(rg.root / "store", {str(ok.SOPInstanceUID): ok}) == 1
    assert len(list((rg.root / "store").rglob("*.dcm"))) == 1


def test_concurrent_associations_from_both_peers(start):
    """Four imaging and two planning associations at once, each with its own patient's
    series of six slices: every slice acknowledged, six series complete, all intact.
    Timeouts generous on both sides: the test is about concurrency, and six associations
    writing with fsync on a loaded 2-core machine once left one waiting past the defaults of
    the other tests (5 s network, 10 s DIMSE: a C-STORE with no response)."""
    rg = start(acse_timeout_s=30.0, network_timeout_s=60.0)
    jobs = [("IMAGER", stack(6, patient_id=f"PI{k}")) for k in range(4)] + \
           [("TPS", stack(6, patient_id=f"PT{k}")) for k in range(2)]
    acknowledged, errors, lock = {}, [], threading.Lock()
    barrier = threading.Barrier(len(jobs))

    def run(aet, slices):
        try:
            barrier.wait(10)
            a = associate(rg.port, aet, timeout_s=60.0)
            if not a.is_established:
                errors.append((aet, "association not established"))
                return
            mine = {}
            st = _send_all(a, slices, mine)
            a.release()
            with lock:
                acknowledged.update(mine)
                if st != [0] * 6:
                    errors.append((aet, st))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    done = rg.events.wait_for("series_complete", n=6)
    assert sorted(d["count"] for d in done) == [6] * 6
    assert intact_on_disk(rg.root / "store", acknowledged) == 36


def _gateway_process(tmp_path: Path, events_endpoint: str, **popen):
    """The gateway as its own process on an ephemeral port: returns once its ready record
    (services/ready.py) says it listens, with the port it bound."""
    cfg = write_config_variant(None, tmp_path / "services.toml", {
        "paths": {"root": str(tmp_path / "var")},
        "gateway": {"port": 0, "fsync": "instance", "idle_timeout_s": 0.5},
        "orchestrator": {"gateway_events_endpoint": events_endpoint}})
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway",
                             "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **popen)
    try:
        rec = wait_for_ready(tmp_path / "var", "gateway", proc.pid, 120,
                             alive=lambda: proc.poll() is None)
    except ServiceError:
        pytest.fail(f"gateway did not start: {proc.stderr.read()[-2000:]}")
    return proc, int(rec.endpoints["port"]), tmp_path / "var" / "store"


def test_killed_gateway_keeps_every_acknowledged_instance(tmp_path):
    """kill -9 of the gateway process after the 15th acknowledged slice of 40: every
    acknowledged slice is on disk intact; a restarted gateway takes the resend and
    reports one complete series of 40."""
    events = EventCapture(keys_root=tmp_path / "var")   # the gateway process's keys
    try:
        proc, port, store = _gateway_process(tmp_path, events.endpoint)
        slices = stack(40, rows=32, cols=32)
        acknowledged = {}
        a = associate(port)
        for ds in slices:
            try:
                st = a.send_c_store(ds)
            except Exception:  # noqa: BLE001 - the association dies with the process
                break
            if st and st.Status == 0:
                acknowledged[str(ds.SOPInstanceUID)] = ds
            if len(acknowledged) == 15:
                proc.kill()
                proc.wait(10)
            if not a.is_established:
                break
        assert 15 <= len(acknowledged) < 40
        assert intact_on_disk(store, acknowledged) == len(acknowledged)
        proc, port, store = _gateway_process(tmp_path, events.endpoint)
        b = associate(port)
        assert _send_all(b, slices, acknowledged) == [0] * 40
        b.release()
        done = events.wait_for("series_complete")
        assert done[0]["count"] == 40
        assert intact_on_disk(store, acknowledged) == 40
        proc.terminate()
        proc.wait(10)
    finally:
        events.close()


def test_disk_full_gets_out_of_resources_and_leaves_no_partial_file(tmp_path):
    """The gateway process may not write files over 256 KiB (RLIMIT_FSIZE, SIGXFSZ
    ignored: the write fails like on a full disk): a 512x512 slice gets 0xA700 with a
    store_failed event and no file or temporary left; the small slices before and after
    are acknowledged and intact."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    events = EventCapture(keys_root=tmp_path / "var")   # the gateway process's keys
    try:
        proc, port, store = _gateway_process(tmp_path, events.endpoint, preexec_fn=limit)
        small = stack(2)
        big = stack(1, rows=512, cols=512)[0]
        acknowledged = {}
        a = associate(port)
        statuses = _send_all(a, [small[0], big, small[1]], acknowledged)
        a.release()
        assert statuses == [0, 0xA700, 0]
        failed = events.wait_for("store_failed")
        assert failed[0]["sop_instance_uid"] == str(big.SOPInstanceUID)
        assert intact_on_disk(store, acknowledged) == 2
        assert not list(store.rglob(f"{big.SOPInstanceUID}.dcm"))
        assert not list(store.rglob(".tmp-*"))
        assert proc.poll() is None
        proc.terminate()
        proc.wait(10)
    finally:
        events.close()
