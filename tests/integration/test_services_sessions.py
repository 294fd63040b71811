"""Service stack end to end with stage doubles (tests/integration/doubles.py): DCMTK
storescu as the imaging system, Orthanc as the TMS, the console client as the therapist.
The compute stages are replaced by doubles here so that the services' behaviour
(routing, budgets, fallbacks, re-issue, hand-off) is tested on its own; the same flow
with the real stages is in test_services_pipeline.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pydicom
import pytest

from services.config import free_tcp_port
from services.console import ConsoleClient, ConsoleError
from tests.integration.conftest import make_config, storescu, write_planning_data

pytestmark = pytest.mark.integration


def _client(st):
    oc = st.cfg.orchestrator
    return ConsoleClient(oc.console_endpoint, oc.console_events_endpoint, timeout_s=5)


def _send_planning(st, data):
    r = storescu(st.cfg.gateway.port, [*data["ct"], data["rs"], data["rp"]], aet="TPS")
    assert r.returncode == 0, r.stderr


def _wait_planning(cl, pid, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = cl.request("planning_data", patient_id=pid)["planning"]
        if not p["missing"]:
            return p
        time.sleep(0.1)
    raise AssertionError(f"planning data incomplete: {p['missing']}")


def test_normal_session_end_to_end_to_orthanc(tmp_path, orthanc, stack_factory):
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port)
    st = stack_factory(cfg, bud)
    cl = _client(st)
    data = write_planning_data(tmp_path / "P1", "PAT-E2E")
    _send_planning(st, data)
    _wait_planning(cl, "PAT-E2E")
    s = cl.start("ROOM1", "PAT-E2E", protocol="prostate")
    assert s["state"] == "waiting_for_image"
    r = storescu(st.cfg.gateway.port, data["cbct"])
    assert r.returncode == 0, r.stderr
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "awaiting_decision" and s["offered"] == ["scheduled", "adapted"]
    assert s["cbct"]["count"] == len(data["cbct"])
    with pytest.raises(ConsoleError):
        cl.choose(s["session_id"], "bogus")
    cl.choose(s["session_id"], "adapted")
    s = cl.wait_for_state(s["session_id"], {"handed_off", "failed"}, 60)
    assert s["state"] == "handed_off", s["error"]
    assert all(i["ok"] and i["status"] == 0 for i in s["handoff"]["instances"])
    assert s["end_to_end"]["within_budget"] and s["end_to_end"]["duration_s"] > 0
    assert [h["to"] for h in s["history"]] == [
        "waiting_for_image", "registering", "planning", "awaiting_decision", "handing_off",
        "handed_off"]
    plans = [t for t in orthanc.instances_tags() if t.get("Modality") == "RTPLAN"]
    assert len(plans) == 1
    full = orthanc.get(f"/instances/{orthanc.get('/instances')[0]}/tags?simplify")
    adapted = [p for p in plans if p["RTPlanLabel"] == "ADAPTED"][0]
    assert adapted["ReferencedStructureSetSequence"][0]["ReferencedSOPInstanceUID"] == \
        data["rs_uid"]
    pred = adapted["ReferencedRTPlanSequence"][0]
    assert pred["ReferencedSOPInstanceUID"] == data["rp_uid"]
    assert pred["RTPlanRelationship"] == "PREDECESSOR"
    assert full is not None
    cl.close()


def test_two_rooms_at_once_and_robust_reception(tmp_path, orthanc, stack_factory):
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port)
    st = stack_factory(cfg, bud)
    cl = _client(st)
    a = write_planning_data(tmp_path / "A", "PAT-A")
    b = write_planning_data(tmp_path / "B", "PAT-B")
    _send_planning(st, a)
    _send_planning(st, b)
    _wait_planning(cl, "PAT-A")
    _wait_planning(cl, "PAT-B")
    sa = cl.start("ROOM-A", "PAT-A", protocol="prostate")
    sb = cl.start("ROOM-B", "PAT-B", protocol="prostate")
    with pytest.raises(ConsoleError):
        cl.start("ROOM-A", "PAT-B", protocol="prostate")  # room busy / patient elsewhere
    # room A: a malformed extra instance in the CBCT series -> refused and quarantined
    bad = pydicom.dcmread(a["cbct"][0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    bad.PixelData = bad.PixelData[:-64]
    badp = tmp_path / "bad.dcm"
    bad.save_as(badp, enforce_file_format=True)
    sub = cl.subscribe("ROOM-A")
    time.sleep(0.3)
    r = storescu(st.cfg.gateway.port, [*a["cbct"], badp])
    assert r.returncode != 0 or "0xa900" in (r.stdout + r.stderr).lower()
    r = storescu(st.cfg.gateway.port, b["cbct"])
    assert r.returncode == 0
    sa = cl.wait_for_state(sa["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    sb = cl.wait_for_state(sb["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert sa["state"] == sb["state"] == "awaiting_decision"
    assert sa["cbct"]["series_uid"] != sb["cbct"]["series_uid"]
    events = [e["event"] for e in cl.events("ROOM-A", timeout_s=2, idle_s=0.5)]
    assert "instance_rejected" in events or sub is not None
    q = list((st.cfg.paths.quarantine / "pixel_data_length").glob("*.json"))
    assert len(q) == 1
    cl.choose(sa["session_id"], "adapted")
    cl.choose(sb["session_id"], "scheduled")
    sa = cl.wait_for_state(sa["session_id"], {"handed_off", "failed"}, 60)
    sb = cl.wait_for_state(sb["session_id"], {"handed_off", "failed"}, 60)
    assert sa["state"] == sb["state"] == "handed_off"
    labels = sorted(t["RTPlanLabel"] for t in orthanc.instances_tags()
                    if t.get("Modality") == "RTPLAN")
    assert labels == ["ADAPTED", "SCHEDULED"]
    cl.close()


def test_worker_killed_during_planning_is_reissued(tmp_path, orthanc, stack_factory):
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port,
                           counts={"planning": 2})
    st = stack_factory(cfg, bud, env={"ADAPTIVE_TEST_PLAN_SLEEP_S": "2.0"})
    cl = _client(st)
    d = write_planning_data(tmp_path / "K", "PAT-K")
    _send_planning(st, d)
    _wait_planning(cl, "PAT-K")
    s = cl.start("ROOM-K", "PAT-K", protocol="prostate")
    assert storescu(st.cfg.gateway.port, d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"planning"}, 60)
    time.sleep(0.5)
    worker = None
    end = time.monotonic() + 10
    while worker is None and time.monotonic() < end:
        s = cl.session(s["session_id"])
        worker = None
        for e in (st.cfg.paths.root / "logs").glob("worker-planning-*.log"):
            if "task_received" in e.read_text():
                worker = e.stem
        time.sleep(0.1)
    assert worker, "no planning worker received the task"
    os.kill(st.pid(worker), signal.SIGKILL)
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "awaiting_decision"
    assert s["stages"]["planning"]["ok"]
    cl.close()


def test_tms_down_at_handoff_fails_clearly_and_keeps_outbox(tmp_path, stack_factory):
    cfg, bud = make_config(tmp_path, tms_port=free_tcp_port(), tms_retries=2)
    st = stack_factory(cfg, bud)
    cl = _client(st)
    d = write_planning_data(tmp_path / "T", "PAT-T")
    _send_planning(st, d)
    _wait_planning(cl, "PAT-T")
    s = cl.start("ROOM-T", "PAT-T", protocol="prostate")
    assert storescu(st.cfg.gateway.port, d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision"}, 60)
    cl.choose(s["session_id"], "adapted")
    s = cl.wait_for_state(s["session_id"], {"handed_off", "failed"}, 60)
    assert s["state"] == "failed" and "not stored at TMS" in s["error"]
    outbox = Path(s["handoff"]["outbox"])
    assert (outbox / "report.json").is_file()
    assert any(p.name.endswith("RP_adapted.dcm") for p in outbox.iterdir())
    assert all(i["attempts"] == 3 for i in s["handoff"]["instances"])
    cl.close()


def test_budget_overrun_forces_scheduled_only_fallback(tmp_path, orthanc, stack_factory):
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port,
                           budgets={"planning": {"budget_s": 0.5, "grace_s": 0.5}})
    st = stack_factory(cfg, bud, env={"ADAPTIVE_TEST_PLAN_SLEEP_S": "4"})
    cl = _client(st)
    d = write_planning_data(tmp_path / "O", "PAT-O")
    _send_planning(st, d)
    _wait_planning(cl, "PAT-O")
    s = cl.start("ROOM-O", "PAT-O", protocol="prostate")
    assert storescu(st.cfg.gateway.port, d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "fallback" and s["offered"] == ["scheduled"]
    assert s["budgets_exceeded"][0]["stage"] == "planning"
    with pytest.raises(ConsoleError):
        cl.choose(s["session_id"], "adapted")
    cl.choose(s["session_id"], "scheduled")
    s = cl.wait_for_state(s["session_id"], {"handed_off", "failed"}, 60)
    assert s["state"] == "handed_off"
    plans = [t for t in orthanc.instances_tags() if t.get("Modality") == "RTPLAN"]
    assert [p["RTPlanLabel"] for p in plans] == ["SCHEDULED"]
    cl.close()


def test_failing_checks_are_never_handed_off(tmp_path, orthanc, stack_factory):
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port)
    st = stack_factory(cfg, bud, env={"ADAPTIVE_TEST_FAIL_CHECKS": "1"})
    cl = _client(st)
    d = write_planning_data(tmp_path / "F", "PAT-F")
    _send_planning(st, d)
    _wait_planning(cl, "PAT-F")
    s = cl.start("ROOM-F", "PAT-F", protocol="prostate")
    assert storescu(st.cfg.gateway.port, d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "fallback" and "forced failure" in " ".join(s["notes"])
    with pytest.raises(ConsoleError, match="never handed off"):
        cl.choose(s["session_id"], "adapted")
    cl.cancel(s["session_id"], "test")
    assert cl.session(s["session_id"])["state"] == "cancelled"
    assert orthanc.get("/instances") == []
    cl.close()


def test_aborted_cbct_then_resent_and_duplicate_series(tmp_path, orthanc, stack_factory):
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port)
    st = stack_factory(cfg, bud)
    cl = _client(st)
    d = write_planning_data(tmp_path / "AB", "PAT-AB")
    _send_planning(st, d)
    _send_planning(st, d)                                  # duplicate planning series
    _wait_planning(cl, "PAT-AB")
    s = cl.start("ROOM-AB", "PAT-AB", protocol="prostate")
    ae = AE(ae_title="IMAGER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", st.cfg.gateway.port, ae_title="ADAPTIVE_GW")
    assert assoc.is_established
    for f in d["cbct"][:3]:
        assert assoc.send_c_store(f).Status == 0
    assoc.abort()                                          # mid-series
    time.sleep(1.5)                                        # > idle timeout
    assert cl.session(s["session_id"])["state"] == "waiting_for_image"
    assert storescu(st.cfg.gateway.port, d["cbct"]).returncode == 0   # resend, complete
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "awaiting_decision" and s["cbct"]["count"] == len(d["cbct"])
    # the same CBCT series again: reported, but does not restart or disturb the session
    assert storescu(st.cfg.gateway.port, d["cbct"]).returncode == 0
    time.sleep(1.5)
    s2 = cl.session(s["session_id"])
    assert s2["state"] == "awaiting_decision"
    assert [h["to"] for h in s2["history"]].count("registering") == 1
    cl.close()
