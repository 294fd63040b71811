"""Local DICOM peers of the services on this machine, for the demo, the session benchmarks
and the integration tests: the hand-off target (a local Orthanc, or a pynetdicom Storage SCP
standing in for it), the sending side (DCMTK ``storescu`` or pynetdicom as the TPS or the
imager) and the replay fraction they exchange. Everything listens and sends on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from adaptive.dicom.ct_series import write_ct_series
from adaptive.dicom.study import new_uid
from adaptive.errors import ConfigError, DicomInputError, ServiceError
from adaptive.geometry.volume import Grid, Volume
from adaptive.model.identity import PatientInfo, SeriesInfo, StudyIdentity
from services.config import (
    DicomPeer,
    GatewayAccessConfig,
    GatewayConfig,
    TmsConfig,
    load_services_config,
)
from services.gateway.scp import Gateway
from services.gateway.scu import send_files
from services.orthanc import start_orthanc

#: a source checkout's replay data (``make replay-data``), searched after the working directory's
SOURCE_REPLAY_DATA = Path(__file__).resolve().parent.parent / "replay_data"


def find_fraction(arg: str | None) -> tuple[Path, Path]:
    """(fraction folder, planning folder) of a replay case."""
    if arg:
        fx = Path(arg)
    else:
        cands = []
        for root in dict.fromkeys((Path.cwd() / "replay_data", SOURCE_REPLAY_DATA)):
            cands += sorted(root.glob("*/fx*/CBCT")) + sorted(root.glob("fx*/CBCT"))
        if not cands:
            raise DicomInputError("no replay fraction found (expected replay_data/<case>/fxNN/"
                                  "CBCT in the working directory or the source checkout; build "
                                  "it with `adaptive replay-data build`)", Path.cwd())
        fx = cands[0].parent
    planning = fx.parent / "planning"
    for need in (fx / "CBCT", planning / "CT", planning / "RS.dcm", planning / "RP.dcm"):
        if not need.exists():
            raise DicomInputError("replay fraction incomplete: missing", need)
    return fx, planning


class Tms:
    """The hand-off target for the demo and the session benchmark."""

    def __init__(self, workdir: Path):
        self.workdir = workdir / "tms"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.orthanc = None
        self.scp = None
        if shutil.which("Orthanc"):
            self.orthanc = start_orthanc(self.workdir, aet="TMS")
            self.port = self.orthanc.dicom_port
            self.label = (f"Orthanc (TMS) DICOM 127.0.0.1:{self.port}, REST "
                          f"127.0.0.1:{self.orthanc.http_port}")
        else:
            scu = load_services_config().tms.calling_ae_title   # our hand-off SCU
            access = GatewayAccessConfig(peers={scu: DicomPeer(scu, ("planning",))})
            self.scp = Gateway(GatewayConfig(ae_title="TMS", host="127.0.0.1", port=0,
                                             idle_timeout_s=1.0, access=access),
                               self.workdir / "store", self.workdir / "quarantine")
            self.scp.start()
            self.port = self.scp.port
            self.label = (f"pynetdicom Storage SCP standing in for the TMS (Orthanc not "
                          f"installed) 127.0.0.1:{self.port}, store {self.workdir / 'store'}")

    def describe_stored(self, sop_uids: list[str]) -> list[str]:
        out = []
        if self.orthanc:
            for uid in sop_uids:
                for hit in self.orthanc.post("/tools/lookup", uid.encode()):
                    tags = self.orthanc.get(f"{hit['Path']}/simplified-tags")
                    what = f"{tags.get('Modality', '?')} {tags.get('RTPlanLabel', '')}".strip()
                    out.append(f"{what} {uid} -> Orthanc {hit['Path']}")
        else:
            for uid in sop_uids:
                out += [f"{uid} -> {p}" for p in (self.workdir / "store").rglob(f"{uid}.dcm")]
        return out

    def stop(self):
        if self.orthanc:
            self.orthanc.stop()
        if self.scp:
            self.scp.stop()


def push(port: int, files: list[Path], calling_ae_title: str) -> str:
    """Send files to the gateway as ``calling_ae_title`` (a peer of the services config:
    "TPS" for planning data, "IMAGER" for the CBCT): storescu (TCP_NODELAY=1) if present,
    else pynetdicom."""
    exe = shutil.which("storescu")
    if exe:
        r = subprocess.run([exe, "-aet", calling_ae_title, "-aec", "ADAPTIVE_GW", "127.0.0.1",
                            str(port), *map(str, files)], env=dict(os.environ, TCP_NODELAY="1"),
                           capture_output=True, text=True, timeout=300, check=False)
        if r.returncode != 0:
            raise ServiceError(f"storescu failed: {r.stderr[-500:]}")
        return "DCMTK storescu"
    send_files(files, TmsConfig(ae_title="ADAPTIVE_GW", port=port,
                                calling_ae_title=calling_ae_title),
               outbox=Path(tempfile.mkdtemp()), session_id="demo-push")
    return "pynetdicom SCU"


def patient_id_of(rp: Path) -> str:
    """The Patient ID of a DICOM file (the replay case's RT Plan)."""
    pid = str(pydicom.dcmread(rp, stop_before_pixels=True).get("PatientID", "")).strip()
    if not pid:
        raise ConfigError(f"{rp}: no PatientID")
    return pid


def wait_planning_data(console, patient_id: str, timeout_s: float = 60.0) -> None:
    """Wait (bounded) until the orchestrator has registered the patient's planning data."""
    end = time.monotonic() + timeout_s
    while console.request("planning_data", patient_id=patient_id)["planning"]["missing"]:
        if time.monotonic() > end:
            raise ServiceError("planning data not registered by the orchestrator")
        time.sleep(0.2)  # bounded poll


def write_synthetic_ct(folder: str | Path, n_slices: int, rows: int = 512, cols: int = 512, *,
                       patient_id: str = "PAT001", description: str = "CT",
                       study_uid: str | None = None, series_uid: str | None = None,
                       for_uid: str | None = None, spacing_mm=(1.0, 1.0, 2.0)) -> list[Path]:
    """A synthetic CT series (not anatomy: a deterministic HU ramp pattern) written by the
    product's CT writer (:func:`adaptive.dicom.write_ct_series`) into ``folder``, for
    gateway traffic in tests and the receive benchmark. Centred on the origin in x and y,
    slice k at z = k × spacing (LPS mm). Returns the files in slice order."""
    y, x = np.mgrid[0:rows, 0:cols]
    hu = np.stack([((x + y + 7 * k) % 2048) - 1024 for k in range(n_slices)]).astype(np.int16)
    sx, sy, sz = (float(v) for v in spacing_mm)
    grid = Grid((n_slices, rows, cols), origin=[-(cols - 1) * sx / 2, -(rows - 1) * sy / 2, 0.0],
                spacing=[sx, sy, sz])
    patient = PatientInfo(patient_id, f"SYNTHETIC^{patient_id}")
    study = StudyIdentity(patient, study_uid or new_uid())
    info = SeriesInfo(patient, study.study_instance_uid, series_uid or new_uid(),
                      for_uid or new_uid())
    done = write_ct_series(Volume(hu, grid), info, folder, study=study, description=description)
    return [Path(folder) / f"CT.{uid}.dcm" for uid in done.sop_instance_uids]
