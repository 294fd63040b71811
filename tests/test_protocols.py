"""Clinical protocols per patient: names validated against config/goals, the mapping table
from the scheduled plan (Treatment Protocols, then label), and the console's start command."""

from __future__ import annotations

import pytest
import zmq
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from adaptive.config import config_path
from adaptive.errors import ClinicalProtocolError, ConfigError
from adaptive.optimization.protocols import (
    ProtocolSource,
    ProtocolTable,
    available_protocols,
    load_protocol,
)


def test_protocol_names_are_files_in_config_goals():
    assert {"prostate", "tg119_cshape", "tg119_prostate"} <= set(available_protocols())
    g = load_protocol("prostate")
    assert g.source == str(config_path("goals", "prostate.toml"))
    assert g.prescription.number_of_fractions == 20
    for bad in ("liver", "../goals/prostate", "prostate.toml", "", "/etc/passwd"):
        with pytest.raises(ClinicalProtocolError, match="available: prostate"):
            load_protocol(bad)


def test_table_maps_treatment_protocols_first_then_label(tmp_path):
    t = ProtocolTable.load()
    assert t.for_plan("CHHiP 60Gy/20fx", "TG119_CSHAPE") == ("prostate",
                                                             ProtocolSource.TREATMENT_PROTOCOLS)
    assert t.for_plan("", "TG119_CSHAPE") == ("tg119_cshape", ProtocolSource.PLAN_LABEL)
    with pytest.raises(ClinicalProtocolError, match="'SCHEDULED' are not mapped"):
        t.for_plan("unknown trial", "SCHEDULED")
    bad = tmp_path / "protocols.toml"
    bad.write_text('[plan_labels]\n"X" = "liver"\n')
    with pytest.raises(ConfigError, match="unknown protocol 'liver'"):
        ProtocolTable.load(bad)
    bad.write_text('[plan_label]\n"X" = "prostate"\n')
    with pytest.raises(ConfigError, match="plan_label"):
        ProtocolTable.load(bad)


def _rtplan(path, label, treatment_protocols=None, patient_id="P"):
    ds = Dataset()
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.RTPlanLabel = label
    if treatment_protocols:
        ds.TreatmentProtocols = treatment_protocols
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def test_console_start_validates_or_maps_the_protocol(tmp_path, refused_port):
    from services.config import load_budgets, load_services_config
    from services.orchestrator.core import Orchestrator
    from tests.integration.conftest import make_config

    cfg, bud = make_config(tmp_path, tms_port=refused_port)
    ctx = zmq.Context()
    orch = Orchestrator(load_services_config(cfg), load_budgets(bud), context=ctx)
    try:
        with pytest.raises(ClinicalProtocolError, match="unknown protocol 'liver'"):
            orch.handle_command({"cmd": "start", "room": "R1", "patient_id": "P1",
                                 "protocol": "liver"})
        s = orch.handle_command({"cmd": "start", "room": "R1", "patient_id": "P1",
                                 "protocol": "prostate"})["session"]
        assert s["protocol"] == {"name": "prostate", "source": ProtocolSource.CONSOLE}
        # the same patient and room with another protocol: refused, not silently attached
        with pytest.raises(Exception, match="planned with protocol 'prostate'"):
            orch.handle_command({"cmd": "start", "room": "R1", "patient_id": "P1",
                                 "protocol": "tg119_cshape"})
        # no protocol at start: mapped from the scheduled plan, or refused naming the fix
        for pid, label, tp, want in (("P2", "SCHEDULED", None, None),
                                     ("P3", "SCHEDULED", "TG119 C-SHAPE", "tg119_cshape"),
                                     ("P4", "PROST_60_20", None, "prostate")):
            (tmp_path / pid).mkdir()
            _rtplan(tmp_path / pid / "RP.dcm", label, tp, patient_id=pid)
            # registered as the gateway reports it; its headers read by the registry
            orch.registry.add_series({"patient_id": pid, "series_uid": "1.2.3", "count": 1,
                                      "modality": "RTPLAN", "path": str(tmp_path / pid),
                                      "completed_at": 0.0})
            cmd = {"cmd": "start", "room": f"R{pid}", "patient_id": pid}
            if want is None:
                with pytest.raises(ClinicalProtocolError, match="start the session with a "
                                                                "protocol"):
                    orch.handle_command(cmd)
                assert not [x for x in orch.sessions.values() if x.patient_id == pid]
            else:
                s = orch.handle_command(cmd)["session"]
                assert s["protocol"]["name"] == want and "scheduled plan" in \
                    s["protocol"]["source"]
    finally:
        orch.close()
        ctx.term()
