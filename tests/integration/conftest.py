"""Fixtures for service integration tests: Orthanc as the TMS (services/orthanc.py: ports
chosen and retried on a conflict), storescu as the imaging system, the service stack as
subprocesses on ephemeral ports (every process binds port 0 itself; the stack reads the
real endpoints from their ready records), synthetic planning data. Everything on
127.0.0.1; every wait is bounded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from adaptive.config import config_path
from services.config import write_config_variant
from services.local_peers import write_synthetic_ct
from services.orthanc import OrthancServer, start_orthanc
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
EPHEMERAL = "tcp://127.0.0.1:0"


@pytest.fixture
def orthanc(tmp_path) -> OrthancServer:
    exe = require_tool("Orthanc", "orthanc")
    srv = start_orthanc(tmp_path / "orthanc", aet="TMS", exe=exe, extra={
        "DicomCheckCalledAet": False, "StableAge": 1,
        "DicomModalities": {"adaptive": ["ADAPTIVE_SCU", "127.0.0.1", 11112]}})
    yield srv
    srv.stop()


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
    ct = write_synthetic_ct(folder / "CT", slices, size, size, patient_id=patient_id,
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
    cbct = write_synthetic_ct(folder / "CBCT", slices, size, size, patient_id=patient_id,
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
    """A services config and a budgets config under ``tmp_path``: every service endpoint
    on 127.0.0.1 port 0 (read the real ones from the stack's ``endpoints``), stage doubles
    as handlers unless ``handlers`` says otherwise."""
    cfg = write_config_variant(None, tmp_path / "services.toml", {
        "paths": {"root": str(tmp_path / "var")},
        "gateway": {"host": "127.0.0.1", "port": 0, "idle_timeout_s": idle_timeout_s,
                    "fsync": "none"},
        "orchestrator": {"worker_endpoint": EPHEMERAL, "gateway_events_endpoint": EPHEMERAL,
                         "console_endpoint": EPHEMERAL, "console_events_endpoint": EPHEMERAL,
                         "heartbeat_interval_s": 0.2, "heartbeat_liveness": 10},
        "workers": {**(counts or {}), "handlers": handlers or {
            "registration": "tests.integration.doubles:registration_double",
            "planning": "tests.integration.doubles:planning_double"}},
        "tms": {"port": tms_port, "retries": tms_retries, "backoff_s": 0.2,
                "acse_timeout_s": 2.0, "dimse_timeout_s": 5.0, "network_timeout_s": 2.0}})
    bud = write_config_variant(config_path("budgets.toml"), tmp_path / "budgets.toml",
                               budgets or {})
    return cfg, bud


@pytest.fixture
def stack_factory():
    """``make(cfg, bud, env=None)``: a started :class:`ServiceStack` with every worker
    connected; its ``endpoints`` are the real ones; stopped after the test."""
    from services.supervisor import ServiceStack
    stacks = []

    def make(cfg, bud, env=None):
        st = ServiceStack(cfg, bud, env=env)
        stacks.append(st)
        st.start(timeout_s=120)
        st.wait_ready(180)
        return st

    yield make
    for st in stacks:
        st.stop()
