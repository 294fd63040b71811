"""The Orthanc launcher (services/orthanc.py) used by the integration tests, the demo and
the session benchmark: a port taken between the check and Orthanc's bind is retried on new
ports, and another Orthanc answering on our HTTP port is never taken for ours."""

from __future__ import annotations

import socket

import pytest

from adaptive.errors import ServiceError
from services.orthanc import pick_ports, start_orthanc
from tests.conftest import require_tool

pytestmark = pytest.mark.integration


def _picker(first: list[int]):
    """Hands out ``first`` on the first call (a race lost on purpose), then free ports."""
    calls = []

    def pick(n, rng):
        calls.append(n)
        return list(first) if len(calls) == 1 else pick_ports(n, rng)
    pick.calls = calls
    return pick


def test_dicom_port_taken_meanwhile_is_retried_on_new_ports(tmp_path):
    exe = require_tool("Orthanc", "orthanc")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        pick = _picker([busy, pick_ports(1)[0]])
        with start_orthanc(tmp_path / "o", exe=exe, pick=pick) as srv:
            assert srv.attempts == 2 and len(pick.calls) == 2
            assert srv.dicom_port != busy
            assert srv.get("/system")["Name"] == srv.name
            assert srv.get("/system")["DicomPort"] == srv.dicom_port
            first_log = (tmp_path / "o" / "orthanc-attempt1.log").read_text()
            assert f"port = {busy}" in first_log and "already in use" in first_log


def test_another_orthanc_on_our_http_port_is_not_taken_for_ours(tmp_path):
    exe = require_tool("Orthanc", "orthanc")
    with start_orthanc(tmp_path / "first", exe=exe) as first:
        pick = _picker([pick_ports(1)[0], first.http_port])
        with start_orthanc(tmp_path / "second", exe=exe, pick=pick) as second:
            assert second.attempts == 2 and second.name != first.name
            assert second.http_port != first.http_port
            assert second.get("/system")["Name"] == second.name
        assert first.get("/system")["Name"] == first.name        # untouched


def test_other_start_failures_are_not_retried(tmp_path):
    exe = require_tool("Orthanc", "orthanc")
    calls = []

    def pick(n, rng):
        calls.append(n)
        return pick_ports(n, rng)
    with pytest.raises(ServiceError, match=r"(?s)did not start.*application entity title"):
        start_orthanc(tmp_path / "bad", exe=exe, pick=pick, aet="X" * 17, timeout_s=30)
    assert calls == [2]
