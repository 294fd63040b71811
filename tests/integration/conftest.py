"""Fixtures for service integration tests: Orthanc as the TMS (own temp config, free
ports), storescu as the imaging system, the service stack as subprocesses, synthetic
planning data. Everything on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.config import free_tcp_port, load_services_config, write_config_variant
from services.sample_data import write_ct_series
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]


@dataclass
class OrthancServer:
    dicom_port: int
    http_port: int
    aet: str
    proc: subprocess.Popen

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def instances_tags(self) -> list[dict]:
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]


@pytest.fixture
def orthanc(tmp_path):
    exe = require_tool("Orthanc", "orthanc")
    dport, hport = free_tcp_port(), free_tcp_port()
    d = tmp_path / "orthanc"
    (d / "db").mkdir(parents=True)
    conf = {"Name": "test-tms", "DicomAet": "TMS", "DicomPort": dport, "HttpPort": hport,
            "Plugins": [], "StorageDirectory": str(d / "db"), "IndexDirectory": str(d / "db"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"adaptive": ["ADAPTIVE_SCU", "127.0.0.1", 11112]},
            "StableAge": 1}
    cf = d / "orthanc.json"
    cf.write_text(json.dumps(conf))
    log = open(d / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(cf)], env=dict(os.environ, TCP_NODELAY="1"),
                            stdout=log, stderr=log, start_new_session=True)
    srv = OrthancServer(dport, hport, "TMS", proc)
    end = time.monotonic() + 30
    while True:
        try:
            srv.get("/system")
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                pytest.fail(f"Orthanc did not start: {(d / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.1)
    yield srv
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


def _meta(sop_class, sop_uid):
    m = FileMetaDataset()
    m.MediaStorageSOPClassUID = sop_class
    m.MediaStorageSOPInstanceUID = sop_uid
    m.TransferSyntaxUID = ExplicitVRLittleEndian
    return m


def write_planning_data(folder: Path, patient_id: str, *, slices: int = 8, size: int = 32):
    """A planning CT, a structure set referencing it and a scheduled plan referencing the
    structure set (minimal but consistent references). Returns dict of paths/UIDs."""
    study = generate_uid()
    ct_series, for_uid = generate_uid(), generate_uid()
    ct = write_ct_series(folder / "CT", slices, size, size, patient_id=patient_id,
                         description="Planning CT", study_uid=study, series_uid=ct_series,
                         for_uid=for_uid)
    rs_uid, rp_uid = generate_uid(), generate_uid()
    rs = Dataset()
    rs.file_meta = _meta("1.2.840.10008.5.1.4.1.1.481.3", rs_uid)
    rs.SOPClassUID, rs.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.481.3", rs_uid
    rs.PatientID, rs.PatientName, rs.StudyInstanceUID = patient_id, "TEST", study
    rs.SeriesInstanceUID, rs.Modality = generate_uid(), "RTSTRUCT"
    rs.StructureSetLabel = "PLAN"
    se = Dataset()
    se.SeriesInstanceUID = ct_series
    st = Dataset()
    st.ReferencedSOPInstanceUID = study
    st.RTReferencedSeriesSequence = Sequence([se])
    fr = Dataset()
    fr.FrameOfReferenceUID = for_uid
    fr.RTReferencedStudySequence = Sequence([st])
    rs.ReferencedFrameOfReferenceSequence = Sequence([fr])
    (folder / "RS").mkdir(parents=True)
    rs.save_as(folder / "RS" / "RS.dcm", enforce_file_format=True)
    rp = Dataset()
    rp.file_meta = _meta("1.2.840.10008.5.1.4.1.1.481.5", rp_uid)
    rp.SOPClassUID, rp.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.481.5", rp_uid
    rp.PatientID, rp.PatientName, rp.StudyInstanceUID = patient_id, "TEST", study
    rp.SeriesInstanceUID, rp.Modality = generate_uid(), "RTPLAN"
    rp.FrameOfReferenceUID = for_uid
    rp.RTPlanLabel, rp.RTPlanGeometry = "SCHEDULED", "PATIENT"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ref.ReferencedSOPInstanceUID = rs_uid
    rp.ReferencedStructureSetSequence = Sequence([ref])
    (folder / "RP").mkdir(parents=True)
    rp.save_as(folder / "RP" / "RP.dcm", enforce_file_format=True)
    cbct = write_ct_series(folder / "CBCT", slices, size, size, patient_id=patient_id,
                           description="CBCT daily", study_uid=generate_uid())
    return {"ct": ct, "rs": folder / "RS" / "RS.dcm", "rp": folder / "RP" / "RP.dcm",
            "cbct": cbct, "rs_uid": rs_uid, "rp_uid": rp_uid, "for_uid": for_uid}


def storescu(port: int, files, aet: str = "IMAGER", aec: str = "ADAPTIVE_GW",
             timeout: float = 60.0):
    """DCMTK storescu as ``aet``: "IMAGER" (imaging system, the default) or "TPS"
    (planning system), the peers of config/services.toml."""
    exe = require_tool("storescu", "dcmtk")
    r = subprocess.run([exe, "-aet", aet, "-aec", aec, "127.0.0.1", str(port),
                        *map(str, files)],
                       env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, text=True,
                       timeout=timeout, check=False)
    return r


def make_config(tmp_path: Path, *, tms_port: int, handlers: dict | None = None,
                budgets: dict | None = None, idle_timeout_s: float = 0.5,
                counts: dict | None = None, tms_retries: int = 2) -> tuple[Path, Path]:
    ports = [free_tcp_port() for _ in range(5)]
    cfg = write_config_variant(None, tmp_path / "services.toml", {
        "paths": {"root": str(tmp_path / "var")},
        "gateway": {"port": ports[0], "idle_timeout_s": idle_timeout_s, "fsync": "none"},
        "orchestrator": {"worker_endpoint": f"tcp://127.0.0.1:{ports[1]}",
                         "gateway_events_endpoint": f"tcp://127.0.0.1:{ports[2]}",
                         "console_endpoint": f"tcp://127.0.0.1:{ports[3]}",
                         "console_events_endpoint": f"tcp://127.0.0.1:{ports[4]}",
                         "heartbeat_interval_s": 0.2, "heartbeat_liveness": 5},
        "workers": {**(counts or {}), "handlers": handlers or {
            "registration": "tests.integration.doubles:registration_double",
            "planning": "tests.integration.doubles:planning_double"}},
        "tms": {"port": tms_port, "retries": tms_retries, "backoff_s": 0.2,
                "acse_timeout_s": 2.0, "dimse_timeout_s": 5.0, "network_timeout_s": 2.0}})
    from adaptive.config import config_path
    bud = write_config_variant(config_path("budgets.toml"), tmp_path / "budgets.toml",
                               budgets or {})
    return cfg, bud


@pytest.fixture
def stack_factory():
    from services.supervisor import ServiceStack
    stacks = []

    def make(cfg, bud, env=None):
        st = ServiceStack(cfg, bud, env=env)
        stacks.append(st)
        st.start()
        st.wait_ready(120)
        st.cfg = load_services_config(cfg)
        return st

    yield make
    for st in stacks:
        st.stop()
