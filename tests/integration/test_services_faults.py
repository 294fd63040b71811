"""Faults through the real service processes (issue 13; the gateway's own fault suite is
tests/test_gateway_faults.py, the in-process parts test_services_orchestrator_parts.py,
test_services_fuzz.py, test_services_process_hygiene.py):

* ``kill -9`` of the orchestrator mid-planning: ``adaptive serve``'s supervisor restarts it
  on the same endpoints; the session and the planning data are there; the planning stage
  runs again and the session ends handed off (item 3, and the supervisor part of item 2);
* a forged RESULT from a process holding a worker key, for a task given to another worker
  (the task id is visible in the console status), is refused with an event and never used
  (item 1, the issue's attack through the real broker);
* the messages that ended the orchestrator before, on every socket of the running
  processes: every process lives on and a session still goes through (item 2).
"""

from __future__ import annotations

import os
import signal

import pydicom
import pytest
import zmq

from services.auth import apply_client_keys
from services.console import ConsoleError
from services.protocol import decode, encode
from services.ready import pid_alive
from tests.gateway_helpers import intact_on_disk
from tests.integration.conftest import make_config, storescu, write_planning_data
from tests.integration.events import EventWatch
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

DEEP = b'{"v":1,"type":"request","cmd":"status","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
RESULT_OBJECT_DTYPE = (b'{"v":1,"type":"RESULT","task_id":"t1","ok":true,"arrays":'
                      b'[{"name":"a","dtype":"O","shape":[1]}]}')
EVENT_NULL_PATIENT = (b'{"v":1,"type":"gateway_event","event":"series_complete",'
                      b'"data":{"patient_id":null}}')
KILLERS = [[b'{"v":1,"type":"request","cmd":"status","arrays":5}'],
           [RESULT_OBJECT_DTYPE, b"\x00" * 8],
           [EVENT_NULL_PATIENT],
           [b'{"v":1,"type":"request","cmd":"start","room":"R","patient_id":null}'],
           [DEEP]]


def _session_to_planning(st, tmp_path, pid, room):
    cl = st.console_client(timeout_s=10)
    d = write_planning_data(tmp_path / pid, pid)
    assert storescu(st.endpoints.gateway_port, [*d["ct"], d["rs"], d["rp"]],
                    aet="TPS").returncode == 0
    wait_until(lambda: not cl.request("planning_data", patient_id=pid)["planning"]["missing"],
               60, f"planning data of {pid}", interval_s=0.1)
    s = cl.start(room, pid, protocol="prostate")
    assert storescu(st.endpoints.gateway_port, d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"planning"}, 60)
    out = st.cfg.paths.sessions / s["session_id"] / "planning"
    held = wait_until(lambda: list(out.glob("held-by-*")), 60, "the held planning task")
    return cl, d, s, held


def _acknowledged(files) -> dict:
    """SOP Instance UID -> dataset of files storescu sent with success (exit status 0)."""
    out = {}
    for f in files:
        ds = pydicom.dcmread(f)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def _all_files(d) -> list:
    return [*d["ct"], d["rs"], d["rp"], *d["cbct"]]


def _answers(st) -> bool:
    try:
        cl = st.console_client(timeout_s=1.0)
        try:
            return bool(cl.request("ping")["ok"])
        finally:
            cl.close()
    except ConsoleError:
        return False


def test_orchestrator_killed_mid_planning_is_restarted_and_the_session_ends_handed_off(
        tmp_path, orthanc, stack_factory):
    release = tmp_path / "release-planning"
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port)
    st = stack_factory(cfg, bud, env={"ADAPTIVE_TEST_PLAN_RELEASE": str(release)})
    cl, d, s, _ = _session_to_planning(st, tmp_path, "PAT-K9", "ROOM-K9")
    old = st.pid("orchestrator")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not pid_alive(old), 10, "the orchestrator to die")
    # adaptive serve's loop: the supervisor restarts it (backoff) on the same endpoints
    wait_until(lambda: (st.poll(), st.pid("orchestrator") != old and _answers(st))[1], 120,
               "the orchestrator restarted and answering")
    assert st.orchestrator.restarts == 1
    assert all(p.restarts == 0 for p in st.procs if p is not st.orchestrator)
    cl.close()
    cl = st.console_client(timeout_s=10)
    after = cl.session(s["session_id"])                      # the session is there
    assert after["state"] == "planning" and after["patient_id"] == "PAT-K9"
    assert "planning interrupted (orchestrator restarted): run again" in after["notes"]
    planning = cl.request("planning_data", patient_id="PAT-K9")["planning"]
    assert planning["missing"] == [] and planning["rtplan"]["sop"] == d["rp_uid"]
    release.touch()                                          # let the stages finish
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 120)
    assert s["state"] == "awaiting_decision", s["notes"]
    cl.choose(s["session_id"], "adapted")
    s = cl.wait_for_state(s["session_id"], {"handed_off", "handoff_failed", "failed"}, 60)
    assert s["state"] == "handed_off", s["error"]
    plans = [t for t in orthanc.instances_tags() if t.get("Modality") == "RTPLAN"]
    assert [p["RTPlanLabel"] for p in plans] == ["ADAPTED"]
    assert plans[0]["PatientID"] == "PAT-K9"
    ack = _acknowledged(_all_files(d))                      # every acknowledged instance
    assert intact_on_disk(st.cfg.paths.store, ack) == len(ack) == 8 + 2 + 8
    # the gateway too: restarted on the same DICOM port, answering C-ECHO again
    gw = st.pid("gateway")
    os.kill(gw, signal.SIGKILL)
    wait_until(lambda: not pid_alive(gw), 10, "the gateway to die")
    wait_until(lambda: (st.poll(), st.pid("gateway") != gw and st._gateway_answers())[1],
               120, "the gateway restarted on its port")
    assert st.gateway.restarts == 1 and st.endpoints.gateway_port == st.cfg.gateway.port
    cl.close()


def test_forged_result_for_another_workers_task_is_refused(tmp_path, orthanc, stack_factory):
    release = tmp_path / "release-planning"
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port)
    st = stack_factory(cfg, bud, env={"ADAPTIVE_TEST_PLAN_RELEASE": str(release)})
    cl, d, s, _ = _session_to_planning(st, tmp_path, "PAT-FG", "ROOM-FG")
    watch = EventWatch(cl, ["ROOM-FG"])
    task = cl.session(s["session_id"])["stages"]["planning"]["task_id"]   # visible, as said
    # a process that stole the worker key: announces itself, answers the task it was not
    # given with an adapted plan that "passed its checks"
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    apply_client_keys(rogue, st.keys.client_keys("worker"))
    rogue.connect(st.endpoints.worker)
    rogue.send_multipart(encode("READY", {"service": "planning", "name": "rogue"}))
    rogue.send_multipart(encode("RESULT", {"task_id": task, "ok": True, "result": {
        "adapted": {"rtplan": str(d["rp"]), "checks_passed": True, "checks": []},
        "scheduled": {"rtplan": str(d["rp"])}}}))
    ev = watch.wait_for(lambda e: e["event"] == "result_refused", 30, "result_refused")
    assert ev["details"]["reason"] == "the task was not given to this worker"
    assert ev["details"]["worker"] == "rogue" and ev["details"]["task_id"] == task
    assert cl.session(s["session_id"])["state"] == "planning"     # nothing used
    release.touch()
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    assert s["state"] == "awaiting_decision"
    assert s["stages"]["planning"]["worker_timings"]["worker"] != "rogue"
    ack = _acknowledged(_all_files(d))
    assert intact_on_disk(st.cfg.paths.store, ack) == len(ack) == 8 + 2 + 8
    rogue.close(0)
    ctx.term()
    cl.close()


def test_killing_messages_on_every_socket_end_no_process(tmp_path, orthanc, stack_factory):
    cfg, bud = make_config(tmp_path, tms_port=orthanc.dicom_port)
    st = stack_factory(cfg, bud)
    e = st.endpoints
    ctx = zmq.Context()
    socks = {}
    for name, kind, key, endpoint in (("console", zmq.DEALER, "console", e.console),
                                      ("worker", zmq.DEALER, "worker", e.worker),
                                      ("gateway", zmq.PUSH, "gateway", e.gateway_events)):
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        apply_client_keys(s, st.keys.client_keys(key))
        s.connect(endpoint)
        socks[name] = s
    replies = []
    for msg in KILLERS:
        socks["worker"].send_multipart(msg)
        socks["gateway"].send_multipart(msg)
        socks["console"].send_multipart([b"", *msg])
        assert socks["console"].poll(10_000), "a malformed console request got no reply"
        replies.append(decode(socks["console"].recv_multipart()[1:])[0])
    assert all(r["ok"] is False for r in replies)
    assert {r["error_type"] for r in replies} <= {"ProtocolError", "InvalidIdentifierError"}
    # every process lives, and a session still goes all the way
    cl = st.console_client(timeout_s=10)
    d = write_planning_data(tmp_path / "P", "PAT-OK")
    assert storescu(e.gateway_port, [*d["ct"], d["rs"], d["rp"]], aet="TPS").returncode == 0
    wait_until(lambda: not cl.request("planning_data", patient_id="PAT-OK")["planning"][
        "missing"], 60, "planning data", interval_s=0.1)
    s = cl.start("ROOM-OK", "PAT-OK", protocol="prostate")
    assert storescu(e.gateway_port, d["cbct"]).returncode == 0
    s = cl.wait_for_state(s["session_id"], {"awaiting_decision", "fallback", "failed"}, 60)
    cl.choose(s["session_id"], "adapted")
    s = cl.wait_for_state(s["session_id"], {"handed_off", "handoff_failed", "failed"}, 60)
    assert s["state"] == "handed_off", s["error"]
    assert all(p.popen.poll() is None and p.restarts == 0 for p in st.procs)
    assert {t["PatientID"] for t in orthanc.instances_tags()} == {"PAT-OK"}
    ack = _acknowledged(_all_files(d))
    assert intact_on_disk(st.cfg.paths.store, ack) == len(ack) == 8 + 2 + 8
    ctx.destroy(0)
    cl.close()
