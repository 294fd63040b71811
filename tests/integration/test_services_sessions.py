"""Service stack end to end with stage doubles (tests/integration/doubles.py): DCMTK
storescu as the imaging system, Orthanc as the TMS, the console client as the therapist.
The compute stages are replaced by doubles here so that the services' behaviour
(routing, budgets, fallbacks, re-issue, hand-off) is tested on its own; the same flow
with the real stages is in test_services_pipeline.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pydicom
import pytest

from services.console import ConsoleError
from services.sample_data import write_ct_series
from tests.integration.conftest import make_config, storescu, write_planning_data
from tests.integration.events import EventWatch
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def _client(st):
    return st.console_client(timeout_s=10)


def _port(st) -> int:
    return st.endpoints.gateway_port


def _send_planning(st, data):
    r = storescu(_port(st), [*data["ct"], data["rs"], data["rp"]], aet="TPS")
    assert r.returncode == 0, r.stderr


def _wait_planning(cl, pid, timeout=60):
    def complete():
        p = cl.request("planning_data", patient_id=pid)["planning"]
        return p if not p["missing"] else None
    return wait_until(complete, timeout, f"planning data of {pid}", interval_s=0.1)


def test_normal_session_end_to_end_to_orthanc(tmp_path, orthanc, stack_factory):
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port)
    st = stack_factory(cfg, bud)
    # configured port 0 everywhere; the stack reports (and its cfg now holds) real ones
    e = st.endpoints
    assert e.gateway_port > 0 and st.cfg.gateway.port == e.gateway_port
    assert st.cfg.orchestrator.console_endpoint == e.console != "tcp://127.0.0.1:0"
    cl = _client(st)
    data = write_planning_data(tmp_path / "P1", "PAT-E2E")
    _send_planning(st, data)
    _wait_planning(cl, "PAT-E2E")
    s = cl.start("ROOM1", "PAT-E2E", protocol="prostate")
    assert s["state"] == "waiting_for_image"
    r = storescu(_port(st), data["cbct"])
    assert r.returncode == 0, r.stderr
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "awaiting_decision" and s["offered"] == ["scheduled", "adapted"]
    assert s["cbct"]["count"] == len(data["cbct"])
    with pytest.raises(ConsoleError):
        cl.choose(s["session_id"], "bogus")
    cl.choose(s["session_id"], "adapted")
    s = cl.wait_for_state(s["session_id"], {"handed_off", "handoff_failed", "failed"}, 60)
    assert s["state"] == "handed_off", s["error"]
    assert all(i["ok"] and i["status"] == 0 for i in s["handoff"]["instances"])
    assert s["end_to_end"]["within_budget"] and s["end_to_end"]["duration_s"] > 0
    assert [h["to"] for h in s["history"]] == [
        "waiting_for_image", "registering", "planning", "awaiting_decision", "handing_off",
        "handed_off"]
    tags = orthanc.instances_tags()
    assert {t["PatientID"] for t in tags} == {"PAT-E2E"}
    plans = [t for t in tags if t.get("Modality") == "RTPLAN"]
    assert len(plans) == 1
    adapted = [p for p in plans if p["RTPlanLabel"] == "ADAPTED"][0]
    # it references the structure set handed off with it (today's, in the CBCT's study)
    rs = [t for t in tags if t.get("Modality") == "RTSTRUCT"]
    assert [t["SOPInstanceUID"] for t in rs] == [
        adapted["ReferencedStructureSetSequence"][0]["ReferencedSOPInstanceUID"]]
    assert rs[0]["SOPInstanceUID"] != data["rs_uid"]
    assert rs[0]["StudyInstanceUID"] == adapted["StudyInstanceUID"] == \
        pydicom.dcmread(data["cbct"][0], stop_before_pixels=True).StudyInstanceUID
    # the image the plan rests on came first and in full (the synthetic CT series)
    assert sum(t.get("Modality") == "CT" for t in tags) == len(data["cbct"])
    pred = adapted["ReferencedRTPlanSequence"][0]
    assert pred["ReferencedSOPInstanceUID"] == data["rp_uid"]
    assert pred["RTPlanRelationship"] == "PREDECESSOR"
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
    watch = EventWatch(cl, ["ROOM-A"])                     # subscription confirmed live
    r = storescu(_port(st), [*a["cbct"], badp])
    assert r.returncode != 0 or "0xa900" in (r.stdout + r.stderr).lower()
    r = storescu(_port(st), b["cbct"])
    assert r.returncode == 0
    sa = cl.wait_for_state(sa["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    sb = cl.wait_for_state(sb["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert sa["state"] == sb["state"] == "awaiting_decision"
    assert sa["cbct"]["series_uid"] != sb["cbct"]["series_uid"]
    # the console of room A was told, naming the instance and where it was quarantined
    rej = watch.wait_for(lambda e: e["event"] == "instance_rejected", 30,
                         "instance_rejected for room A")
    assert rej["patient_id"] == "PAT-A" and rej["session_id"] == sa["session_id"]
    assert rej["details"]["reason"] == "pixel_data_length"
    assert rej["details"]["affected_sop_instance_uid"] == bad.SOPInstanceUID
    q = list((st.cfg.paths.quarantine / "pixel_data_length").glob("*.json"))
    assert len(q) == 1 and Path(rej["details"]["quarantine_path"]).with_suffix(".json") == q[0]
    cl.choose(sa["session_id"], "adapted")
    cl.choose(sb["session_id"], "scheduled")
    sa = cl.wait_for_state(sa["session_id"], {"handed_off", "handoff_failed", "failed"}, 60)
    sb = cl.wait_for_state(sb["session_id"], {"handed_off", "handoff_failed", "failed"}, 60)
    assert sa["state"] == sb["state"] == "handed_off"
    labels = sorted(t["RTPlanLabel"] for t in orthanc.instances_tags()
                    if t.get("Modality") == "RTPLAN")
    assert labels == ["ADAPTED", "SCHEDULED"]
    cl.close()


def test_worker_killed_during_planning_is_reissued(tmp_path, orthanc, stack_factory):
    # The first planning attempt holds its task until killed (doubles._hold_first_attempt),
    # so the kill certainly lands while the worker has the task, however loaded the machine.
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port,
                           counts={"planning": 2})
    st = stack_factory(cfg, bud, env={"ADAPTIVE_TEST_PLAN_HOLD": "1"})
    cl = _client(st)
    d = write_planning_data(tmp_path / "K", "PAT-K")
    _send_planning(st, d)
    _wait_planning(cl, "PAT-K")
    s = cl.start("ROOM-K", "PAT-K", protocol="prostate")
    watch = EventWatch(cl, ["ROOM-K"])
    assert storescu(_port(st), d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"planning"}, 60)
    out = st.cfg.paths.sessions / s["session_id"] / "planning"
    held = wait_until(lambda: list(out.glob("held-by-*")), 60, "the held planning task")
    pid = int(held[0].name.rsplit("-", 1)[1])
    holder = [p.name for p in st.workers if p.popen and p.popen.pid == pid]
    assert holder and holder[0].startswith("worker-planning-")
    os.kill(pid, signal.SIGKILL)
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "awaiting_decision", s["notes"]
    assert s["stages"]["planning"]["ok"]
    assert s["stages"]["planning"]["worker_timings"]["attempt"] == 2   # re-issued, run again
    assert s["stages"]["planning"]["worker_timings"]["worker"] != holder[0].split("-", 1)[1]
    ev = watch.wait_for(lambda e: e["event"] == "task_reissued", 10, "task_reissued")
    assert ev["details"]["stage"] == "planning" and ev["details"]["attempt"] == 2
    cl.close()


def test_tms_down_at_handoff_fails_clearly_and_keeps_outbox(tmp_path, stack_factory,
                                                            refused_port):
    cfg, bud = make_config(tmp_path, tms_port=refused_port, tms_retries=2)
    st = stack_factory(cfg, bud)
    cl = _client(st)
    d = write_planning_data(tmp_path / "T", "PAT-T")
    _send_planning(st, d)
    _wait_planning(cl, "PAT-T")
    s = cl.start("ROOM-T", "PAT-T", protocol="prostate")
    assert storescu(_port(st), d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision"}, 60)
    cl.choose(s["session_id"], "adapted")
    s = cl.wait_for_state(s["session_id"], {"handed_off", "handoff_failed", "failed"}, 60)
    assert s["state"] == "handoff_failed" and "not confirmed stored at TMS" in s["error"]
    assert s["handoff"]["outcome"] == "not_stored"          # never associated: certainly not
    assert {i["status"] for i in s["handoff"]["recorded"]} == {"not_stored"}
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
    assert storescu(_port(st), d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "fallback" and s["offered"] == ["scheduled"]
    assert s["budgets_exceeded"][0]["stage"] == "planning"
    # CANCEL reached the worker: its 4 s stage stopped early and it became idle
    task = s["stages"]["planning"]["task_id"]
    log = st.log_dir / "worker-planning-0.log"

    def done_line():
        for line in log.read_text().splitlines():
            if line.startswith("{") and task in line and '"task_done"' in line:
                return json.loads(line)
        return None
    done = wait_until(done_line, 30, f"the worker to end the cancelled {task}")
    assert done["ok"] is False and done["run_s"] < 4.0, done
    assert '"task_cancelled"' in log.read_text()
    with pytest.raises(ConsoleError):
        cl.choose(s["session_id"], "adapted")
    cl.choose(s["session_id"], "scheduled")
    s = cl.wait_for_state(s["session_id"], {"handed_off", "handoff_failed", "failed"}, 60)
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
    assert storescu(_port(st), d["cbct"]).returncode == 0
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
    watch = EventWatch(cl, ["ROOM-AB"])
    ae = AE(ae_title="IMAGER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", _port(st), ae_title="ADAPTIVE_GW")
    assert assoc.is_established
    for f in d["cbct"][:3]:
        assert assoc.send_c_store(f).Status == 0
    assoc.abort()                                          # mid-series
    # Positive signal, then "nothing happened": a one-slice probe series sent after the
    # abort completes only after its own idle timeout, and the gateway reports completions
    # in order, so once the console has the probe's series_received the aborted partial
    # CBCT would have been reported before it, had the gateway treated it as complete.
    # (The probe shares the planning CT's frame of reference: it is not a daily image.)
    ab = watch.wait_for(lambda e: e["event"] == "association_aborted", 30,
                        "association_aborted")
    assert ab["details"]["series"][0]["count"] == 3
    probe = write_ct_series(tmp_path / "probe", 1, 16, 16, patient_id="PAT-AB",
                            description="probe", for_uid=d["for_uid"])
    assert storescu(_port(st), probe).returncode == 0
    probe_uid = pydicom.dcmread(probe[0], stop_before_pixels=True).SeriesInstanceUID
    watch.wait_for(lambda e: e["event"] == "series_received" and
                   e["details"]["series_uid"] == probe_uid, 30, "the probe series")
    cbct_uid = pydicom.dcmread(d["cbct"][0], stop_before_pixels=True).SeriesInstanceUID
    assert not [e for e in watch.seen if e["event"] == "series_received"
                and e["details"]["series_uid"] == cbct_uid]
    assert cl.session(s["session_id"])["state"] == "waiting_for_image"
    assert storescu(_port(st), d["cbct"]).returncode == 0   # resend, complete
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "awaiting_decision" and s["cbct"]["count"] == len(d["cbct"])
    # the same CBCT series again: reported (series_received, completions 2), but it does
    # not restart or disturb the session
    assert storescu(_port(st), d["cbct"]).returncode == 0
    assert s["cbct"]["series_uid"] == cbct_uid
    watch.wait_for(lambda e: e["event"] == "series_received" and
                   e["details"]["series_uid"] == cbct_uid and
                   e["details"]["completions"] == 2, 30, "the duplicate CBCT series")
    s2 = cl.session(s["session_id"])
    assert s2["state"] == "awaiting_decision"
    assert [h["to"] for h in s2["history"]].count("registering") == 1
    cl.close()
