"""The hand-off SCU sends a series' slices over several associations at once, and what
references them only after every slice is done (services.gateway.scu)."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, RTPlanStorage

from services.config import TmsConfig
from services.gateway.scu import send_files, send_groups
from services.local_peers import write_synthetic_ct


class RecordingTms:
    """A Storage SCP on 127.0.0.1 that answers Success after ``delay_s`` and records, per
    C-STORE, the association it came on, its SOP class and how many C-STOREs were being
    handled at once."""

    def __init__(self, *, max_associations: int = 10, delay_s: float = 0.05):
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.received: list[tuple[int, str, str]] = []   # (association id, SOP class, SOP instance)
        ae = AE(ae_title="TMS")
        ae.maximum_associations = max_associations
        for c in (CTImageStorage, RTPlanStorage):
            ae.add_supported_context(c, ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay_s)
        with self.lock:
            self.in_flight -= 1
            self.received.append((id(event.assoc), str(event.request.AffectedSOPClassUID),
                                  str(event.request.AffectedSOPInstanceUID)))
        return 0x0000

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def tms_factory():
    made = []

    def make(**kw):
        t = RecordingTms(**kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


def _rtplan(path, patient_id="PSCU"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTPlanStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RTPlanStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "RTPLAN", patient_id
    ds.save_as(path, enforce_file_format=True)
    return path


def _case(tmp_path, n_slices=12):
    return write_synthetic_ct(tmp_path / "sct", n_slices, 8, 8, patient_id="PSCU") + \
        [_rtplan(tmp_path / "RP.dcm")]


def _cfg(port, **kw):
    return TmsConfig(port=port, retries=0, backoff_s=0.0, **kw)


def test_slices_go_over_several_associations_and_the_plan_after_them(tmp_path, tms_factory):
    tms = tms_factory()
    paths = _case(tmp_path)
    reports, _ = send_files(paths, _cfg(tms.port, associations=3), outbox=tmp_path / "out")
    assert all(r.ok and r.state == "stored" for r in reports) and len(reports) == 13
    ct = [a for a, cls, _ in tms.received if cls == CTImageStorage]
    assert len(ct) == 12 and len(set(ct)) == 3          # three associations carried the slices
    assert tms.most_in_flight >= 2                       # ... at the same time
    assert tms.received[-1][1] == RTPlanStorage          # the plan only after every slice
    assert sorted(u for _, _, u in tms.received) == sorted(r.sop_instance_uid for r in reports)


def test_one_association_when_configured(tmp_path, tms_factory):
    tms = tms_factory()
    reports, _ = send_files(_case(tmp_path, 5), _cfg(tms.port, associations=1),
                            outbox=tmp_path / "out")
    assert all(r.ok for r in reports)
    assert len({a for a, _, _ in tms.received}) == 1 and tms.most_in_flight == 1


def test_a_tms_that_takes_one_association_gets_everything_over_it(tmp_path, tms_factory):
    """The extra associations are rejected (local limit exceeded): the slices go over the one
    the TMS took, and nothing is reported as failed."""
    tms = tms_factory(max_associations=1, delay_s=0.0)
    reports, _ = send_files(_case(tmp_path, 6), _cfg(tms.port, associations=3),
                            outbox=tmp_path / "out")
    assert all(r.ok and r.attempts == 1 and r.error == "" for r in reports)
    assert len(tms.received) == 7 and tms.received[-1][1] == RTPlanStorage


def test_send_groups_are_consecutive_runs_of_one_sop_class():
    from services.gateway.scu import InstanceReport

    def rep(cls, uid):
        return InstanceReport(path=uid, sop_class_uid=cls, sop_instance_uid=uid, modality="")

    reps = [rep("ct", "1"), rep("ct", "2"), rep("rs", "3"), rep("rp", "4"), rep("ct", "5")]
    assert [[r.sop_instance_uid for r in g] for g in send_groups(reps)] == \
        [["1", "2"], ["3"], ["4"], ["5"]]
