"""Series completion tracking (thread-safe; the clock is injectable for tests).

A series is identified by (Patient ID, Study Instance UID, Series Instance UID); the
store refuses an instance whose series or study UID was first received for another
patient or study (:meth:`services.gateway.store.InstanceStore.claim`), so one key never
mixes patients.

Rules:

* a series is *due* when ``idle_timeout_s`` has passed since the later of its last
  instance and the close of the last association that carried it, and no association is
  open that carried it or that comes from a sender (calling AE title and address) that
  sent part of it: a sender that opens a new association and pauses before its next
  C-STORE keeps the series waiting;
* an association that ends without a normal release (A-ABORT, dropped connection)
  marks every series it carried *incomplete*: it is not due until an association
  carrying it is later released normally (a resend);
* a due CT series is checked as a slice stack (:mod:`services.gateway.completeness`):
  it is reported ``series_complete`` only if that check passes, else
  ``series_incomplete`` with the reason (a gap, a count short of the one the sender
  stated, ...); other objects (RT Structure Set, RT Plan, RT Dose, registrations) are
  complete when due;
* instances are keyed by SOP Instance UID (a resend of the same instance counts once);
  a series that receives instances after it was reported is reported again (the event
  carries ``completions`` so consumers can tell a resend or the missing slices arriving).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.completeness import SliceGeometry, StackCheck, check_slice_stack
from services.gateway.validation import CT_IMAGE, InstanceHeader

SeriesKey = tuple[str, str, str]   # (patient ID, study UID, series UID)


def series_key(hdr: InstanceHeader) -> SeriesKey:
    return (hdr.patient_id, hdr.study_uid, hdr.series_uid)


@dataclass
class SeriesState:
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    modality: str
    frame_of_reference_uid: str
    series_description: str
    path: Path
    sop_class_uid: str
    image_type: list[str] = field(default_factory=list)
    instances: dict[str, Path] = field(default_factory=dict)
    geometry: dict[str, SliceGeometry] = field(default_factory=dict)
    open_associations: set[int] = field(default_factory=set)
    senders: set[str] = field(default_factory=set)       # "AE@address" that sent part of it
    last_activity: float = 0.0
    first_activity: float = 0.0
    aborted: bool = False
    dirty: bool = True        # instances arrived since the last report
    completions: int = 0
    incomplete_reports: int = 0
    rejected: int = 0
    calling_ae_titles: set[str] = field(default_factory=set)

    def event(self) -> dict:
        return {"patient_id": self.patient_id, "patient_name": self.patient_name,
                "study_uid": self.study_uid, "series_uid": self.series_uid,
                "modality": self.modality, "frame_of_reference_uid":
                    self.frame_of_reference_uid,
                "series_description": self.series_description,
                "image_type": list(self.image_type), "sop_class_uid": self.sop_class_uid,
                "count": len(self.instances), "path": str(self.path),
                "rejected": self.rejected, "completions": self.completions,
                "calling_ae_titles": sorted(self.calling_ae_titles),
                "sop_instance_uids": sorted(self.instances),
                "receive_s": round(self.last_activity - self.first_activity, 4)}

    def stack_check(self) -> StackCheck | None:
        """The slice-stack check of a CT series (None for other objects)."""
        if self.sop_class_uid != CT_IMAGE:
            return None
        return check_slice_stack(list(self.geometry.values()))


@dataclass(frozen=True)
class Report:
    """A series that is due: ``event`` is "series_complete" or "series_incomplete"."""

    event: str
    body: dict
    folder: Path


def _geometry(hdr: InstanceHeader) -> SliceGeometry | None:
    if hdr.image_position is None or hdr.image_orientation is None:
        return None
    return SliceGeometry(hdr.image_position, hdr.image_orientation, hdr.expected_count,
                         hdr.expected_count_source)


class SeriesTracker:
    def __init__(self, idle_timeout_s: float, clock=time.monotonic):
        self.idle_timeout_s = float(idle_timeout_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._series: dict[SeriesKey, SeriesState] = {}
        self._assoc_series: dict[int, set[SeriesKey]] = {}
        self._assoc_sender: dict[int, str] = {}

    def association_opened(self, assoc_id: int, sender: str = "") -> None:
        """``sender`` identifies the peer ("AE@address")."""
        with self._lock:
            self._assoc_series.setdefault(assoc_id, set())
            if sender:
                self._assoc_sender[assoc_id] = sender

    def knows(self, key: SeriesKey) -> bool:
        with self._lock:
            return key in self._series

    def _state(self, hdr: InstanceHeader, path: Path, now: float) -> SeriesState:
        key = series_key(hdr)
        s = self._series.get(key)
        if s is None:
            s = SeriesState(patient_id=hdr.patient_id, patient_name=hdr.patient_name,
                            study_uid=hdr.study_uid, series_uid=hdr.series_uid,
                            modality=hdr.modality,
                            frame_of_reference_uid=hdr.frame_of_reference_uid,
                            series_description=hdr.series_description,
                            path=path.parent, sop_class_uid=hdr.sop_class_uid,
                            image_type=list(hdr.image_type), first_activity=now,
                            last_activity=now)
            self._series[key] = s
        return s

    def seed(self, stored: list[tuple[InstanceHeader, Path]]) -> None:
        """Instances of a series already in the store (e.g. received before a restart of
        the gateway): counted and checked with the ones that arrive now."""
        now = self.clock()
        with self._lock:
            for hdr, path in stored:
                fresh = series_key(hdr) not in self._series
                s = self._state(hdr, path, now)
                if fresh:
                    s.dirty = False   # due only once an instance arrives now
                s.instances.setdefault(hdr.sop_instance_uid, path)
                g = _geometry(hdr)
                if g is not None:
                    s.geometry.setdefault(hdr.sop_instance_uid, g)

    def instance_stored(self, assoc_id: int, hdr: InstanceHeader, path: Path,
                        calling_ae: str = "") -> None:
        now = self.clock()
        with self._lock:
            s = self._state(hdr, path, now)
            if not s.dirty:
                s.first_activity = now
            s.instances[hdr.sop_instance_uid] = path
            g = _geometry(hdr)
            if g is not None:
                s.geometry[hdr.sop_instance_uid] = g
            s.open_associations.add(assoc_id)
            s.last_activity = now
            s.dirty = True
            if calling_ae:
                s.calling_ae_titles.add(calling_ae)
            sender = self._assoc_sender.get(assoc_id)
            if sender:
                s.senders.add(sender)
            self._assoc_series.setdefault(assoc_id, set()).add(series_key(hdr))

    def instance_rejected(self, assoc_id: int, key: SeriesKey) -> None:
        with self._lock:
            s = self._series.get(key)
            if s is not None:
                s.rejected += 1
                s.last_activity = self.clock()

    def association_released(self, assoc_id: int) -> list[SeriesKey]:
        """Normal release: the series it carried may complete after the idle timeout
        (and an earlier abort of them is cleared: this was the resend)."""
        now = self.clock()
        with self._lock:
            self._touch_sender_series(assoc_id, now)
            self._assoc_sender.pop(assoc_id, None)
            keys = self._assoc_series.pop(assoc_id, set())
            for key in keys:
                s = self._series[key]
                s.open_associations.discard(assoc_id)
                s.aborted = False
                s.last_activity = now
            return sorted(keys)

    def association_aborted(self, assoc_id: int) -> list[dict]:
        """Abnormal end: its series are marked incomplete. Returns their summaries."""
        now = self.clock()
        with self._lock:
            keys = self._assoc_series.pop(assoc_id, set())
            self._touch_sender_series(assoc_id, now)
            self._assoc_sender.pop(assoc_id, None)
            out = []
            for key in keys:
                s = self._series[key]
                s.open_associations.discard(assoc_id)
                s.aborted = True
                s.dirty = True
                out.append(s.event())
            return out

    def _touch_sender_series(self, assoc_id: int, now: float) -> None:
        """An association of a sender closed: its pending series wait the idle timeout
        from now (caller holds the lock)."""
        sender = self._assoc_sender.get(assoc_id)
        if not sender:
            return
        for s in self._series.values():
            if s.dirty and sender in s.senders:
                s.last_activity = max(s.last_activity, now)

    def due(self) -> list[Report]:
        """The series that are due now, each reported once per batch of instances."""
        now = self.clock()
        out = []
        with self._lock:
            busy = {self._assoc_sender[a] for a in self._assoc_series
                    if a in self._assoc_sender}
            for s in self._series.values():
                if (not s.dirty or s.aborted or s.open_associations or s.senders & busy
                        or now - s.last_activity < self.idle_timeout_s):
                    continue
                s.dirty = False
                check = s.stack_check()
                if check is None or check.complete:
                    s.completions += 1
                    body = s.event()
                    if check is not None:
                        body.update(slice_spacing_mm=check.slice_spacing_mm,
                                    expected_count=check.expected_count)
                    out.append(Report("series_complete", body, s.path))
                else:
                    s.incomplete_reports += 1
                    body = dict(s.event(), reason=check.reason, detail=check.detail,
                                expected_count=check.expected_count, missing=check.missing,
                                slice_spacing_mm=check.slice_spacing_mm,
                                reports=s.incomplete_reports)
                    out.append(Report("series_incomplete", body, s.path))
            return out

    def get(self, key: SeriesKey) -> SeriesState | None:
        with self._lock:
            return self._series.get(key)

    def open_association_count(self) -> int:
        with self._lock:
            return len(self._assoc_series)
