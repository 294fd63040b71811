"""What the orchestrator does with the registration gate's verdict (in process, no workers):
failed checks are named console events with their numbers, "no valid registration" ends in
the scheduled plan without metrics, reviews must be acknowledged before the adapted plan can
be chosen, review images are served only from the session's folder, and a received Spatial
Registration relating the CBCT and planning frames is passed to the registration stage."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from adaptive.errors import ServiceError
from services import config as C
from services.auth import apply_client_keys
from services.orchestrator import state as S
from services.orchestrator.core import Orchestrator, Session
from services.protocol import ProtocolError, decode


@pytest.fixture
def orch(tmp_path, refused_port):
    from services.orchestrator.__main__ import bound_endpoints
    from tests.integration.conftest import make_config

    cfg, bud = make_config(tmp_path, tms_port=refused_port)
    o = Orchestrator(C.load_services_config(cfg), C.load_budgets(bud), context=zmq.Context())
    sub = o.ctx.socket(zmq.SUB)
    apply_client_keys(sub, o.keys.client_keys("viewer"))    # events go to authenticated clients
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(bound_endpoints(o)["console_events_endpoint"])
    # slow joiner: PUB drops messages until the subscription arrives, so publish probes
    # until one is received (bounded), then drain them
    end = time.monotonic() + 30
    while not sub.poll(50):
        assert time.monotonic() < end, "console event subscription not live after 30 s"
        o.publish(None, "subscription_probe")
    while sub.poll(200):
        sub.recv_multipart()
    yield o, sub
    sub.close(0)
    o.close()
    o.ctx.term()


def _events(sub, until: str, timeout_s: float = 5.0) -> list[dict]:
    out, end = [], time.monotonic() + timeout_s
    while time.monotonic() < end:
        if sub.poll(100):
            h, _ = decode(sub.recv_multipart()[1:])
            out.append(h)
            if h["event"] == until:
                return out
    raise AssertionError(f"no {until!r} event; got {[e['event'] for e in out]}")


def _session(o, state=S.REGISTERING) -> Session:
    s = Session(session_id=f"R-{generate_uid()[-8:]}", room="R", patient_id="P", state=state)
    o.sessions[s.session_id] = s
    return s


def _check(name, level, passed=False, is_review=False, **values):
    return {"name": name, "level": level, "passed": passed, "blocking": True,
            "review": is_review, "message": f"{name} {values}", "values": values}


def test_no_valid_registration_is_said_and_shows_no_metrics(orch):
    o, sub = orch
    s = _session(o)
    rec = {"validity": "none", "registration_summary": "setup_translation: 97.9 mm",
           "registration_checks": [_check("setup_translation", "rigid", value=97.9, max=90.0),
                                   _check("registration_jacobian", "deformable", True)]}
    s.registration = rec
    o._on_registration(s, rec)
    ev = _events(sub, "fallback")
    failed = [e["details"] for e in ev if e["event"] == "check_failed"]
    assert [d["check"] for d in failed] == ["setup_translation"]
    assert failed[0]["values"] == {"value": 97.9, "max": 90.0}
    assert s.state == S.FALLBACK and s.offered == ["scheduled"] and s.metrics == {}
    assert "no valid registration (setup_translation)" in s.notes[-1]
    assert "linac's own image guidance" in s.notes[-1]
    with pytest.raises(ServiceError, match="not offered"):
        o.choose(s, "adapted")


def test_reviews_must_be_acknowledged_before_the_adapted_plan(orch, tmp_path):
    o, sub = orch
    s = _session(o)
    rec = {"validity": "deformable", "registration_summary": "all registration checks passed",
           "registration_checks": [_check("setup_translation", "rigid", True, True,
                                          value=47.5, review=20.0, max=90.0)]}
    s.planning = {"rtplan": str(tmp_path / "sched.dcm"), "ct_dir": "", "rtstruct": ""}
    s.cbct = {"path": str(tmp_path), "series_uid": "1.2"}
    o._dispatch_planning = lambda sess: None  # no planning worker here
    o._on_registration(s, rec)
    ev = _events(sub, "review_required")
    assert ev[-1]["details"]["check"] == "setup_translation"
    assert ev[-1]["details"]["values"]["value"] == 47.5
    # the planning stage offered both plans
    for name in ("RP.dcm", "RS.dcm", "RD.dcm", "REG.dcm"):
        (tmp_path / name).write_bytes(b"x")
    s.state = S.PLANNING
    o._on_plans(s, {"adapted": {"checks_passed": True, "rtplan": str(tmp_path / "RP.dcm"),
                                "rtstruct": str(tmp_path / "RS.dcm"),
                                "rtdose": str(tmp_path / "RD.dcm"),
                                "registration": str(tmp_path / "REG.dcm")}, "metrics": {}})
    assert s.offered == ["scheduled", "adapted"]
    # the review gate is what this test is about: the hand-off's own checks and sending
    # (tests/test_services_handoff.py) are replaced by a record of what was asked
    sent = []
    o.handoff.prepare = lambda sess, plan: [("1.2.3", "x", "0")]
    o.handoff.start = lambda sess, items, batch=None: sent.append(items) or "batch"
    with pytest.raises(ServiceError, match="review of setup_translation"):
        o.choose(s, "adapted")
    with pytest.raises(ServiceError, match="review of setup_translation"):
        o.handle_command({"cmd": "choose", "session_id": s.session_id, "plan": "adapted",
                          "acknowledge": ["setup_rotation"]})
    with pytest.raises(ProtocolError, match="acknowledge: Input should be a valid list"):
        o.handle_command({"cmd": "choose", "session_id": s.session_id, "plan": "adapted",
                          "acknowledge": "setup_translation"})
    o.handle_command({"cmd": "choose", "session_id": s.session_id, "plan": "adapted",
                      "acknowledge": ["setup_translation"]})
    assert s.state == S.HANDING_OFF and s.chosen == "adapted" and len(sent) == 1


def test_failed_deformable_checks_are_events_and_planning_still_runs(orch):
    o, sub = orch
    s = _session(o)
    dispatched = []
    o._dispatch_planning = dispatched.append
    rec = {"validity": "rigid", "registration_summary": "registration_converged_target: 2.4 mm",
           "registration_checks": [_check("registration_converged_target", "deformable",
                                          value=2.4, max=1.5)]}
    o._on_registration(s, rec)
    ev = _events(sub, "check_failed")
    assert ev[-1]["details"]["check"] == "registration_converged_target"
    assert dispatched == [s]  # the scheduled plan's metrics on the rigid match
    assert "rigid match" in s.notes[-1]


def test_review_images_only_from_the_session_folder(orch, tmp_path):
    o, _ = orch
    s = _session(o, S.FALLBACK)
    d = o.cfg.paths.sessions / s.session_id / "registration" / "review"
    d.mkdir(parents=True)
    png = d / "review_axial.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n-test-")
    s.registration = {"review_images": [str(png)], "validity": "none",
                      "registration_summary": "x"}
    r = o.handle_command({"cmd": "review", "session_id": s.session_id})
    import base64

    assert base64.b64decode(r["images"][0]["png_base64"]) == png.read_bytes()
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    s.registration["review_images"] = [str(outside)]
    with pytest.raises(ServiceError, match="not in session"):
        o.handle_command({"cmd": "review", "session_id": s.session_id})


def _spatial_registration(path, own_for, other_for, matrix):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "REG"
    ds.PatientID = "P"
    ds.FrameOfReferenceUID = own_for
    items = []
    for f, m in ((own_for, np.eye(4)), (other_for, matrix)):
        mt = Dataset()
        mt.FrameOfReferenceTransformationMatrix = [float(v) for v in m.ravel()]
        mt.FrameOfReferenceTransformationMatrixType = "RIGID"
        mr = Dataset()
        mr.MatrixSequence = Sequence([mt])
        it = Dataset()
        it.FrameOfReferenceUID = f
        it.MatrixRegistrationSequence = Sequence([mr])
        items.append(it)
    ds.RegistrationSequence = Sequence(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_a_received_spatial_registration_is_passed_to_the_registration(orch, tmp_path):
    o, _ = orch
    s = _session(o)
    plan_for, cbct_for, other = generate_uid(), generate_uid(), generate_uid()
    o.registry.add_series({"series_uid": "1.2.3.1", "patient_id": "P", "modality": "CT",
                           "frame_of_reference_uid": plan_for, "path": str(tmp_path / "ct"),
                           "completed_at": 1.0})
    s.planning = {"ct_series_uid": "1.2.3.1"}
    s.cbct = {"series_uid": "1.2.3.2", "frame_of_reference_uid": cbct_for}
    m = np.eye(4)
    m[:3, 3] = (1.0, 2.0, 3.0)
    _spatial_registration(tmp_path / "a" / "REG.dcm", plan_for, other, m)  # unrelated frame
    o.registry.add_series({"series_uid": "1.2.3.3", "patient_id": "P", "modality": "REG",
                           "path": str(tmp_path / "a"), "completed_at": 3.0})
    assert o._spatial_registration_for(s) is None
    _spatial_registration(tmp_path / "b" / "REG.dcm", plan_for, cbct_for, m)
    o.registry.add_series({"series_uid": "1.2.3.4", "patient_id": "P", "modality": "REG",
                           "path": str(tmp_path / "b"), "completed_at": 2.0})
    assert o._spatial_registration_for(s) == str(tmp_path / "b" / "REG.dcm")
