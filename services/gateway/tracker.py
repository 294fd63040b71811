"""Series completion tracking (thread-safe; the clock is injectable for tests).

Rules:

* a series is *complete* when ``idle_timeout_s`` has passed since its last instance
  arrived and no association that carried it is still open;
* an association that ends without a normal release (A-ABORT, dropped connection)
  marks every series it carried *incomplete*: it is not completed until an association
  carrying it is later released normally (a resend) and the idle timeout passes again;
* instances are keyed by SOP Instance UID, so a resend overwrites (idempotent);
* a series that receives instances after it completed completes again (the event
  carries ``completions`` > 1 so consumers can treat it as a resend/duplicate).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.validation import InstanceHeader


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
    open_associations: set[int] = field(default_factory=set)
    last_activity: float = 0.0
    first_activity: float = 0.0
    aborted: bool = False
    dirty: bool = True        # instances arrived since the last completion
    completions: int = 0
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


class SeriesTracker:
    def __init__(self, idle_timeout_s: float, clock=time.monotonic):
        self.idle_timeout_s = float(idle_timeout_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, SeriesState] = {}
        self._assoc_series: dict[int, set[str]] = {}

    def association_opened(self, assoc_id: int) -> None:
        with self._lock:
            self._assoc_series.setdefault(assoc_id, set())

    def instance_stored(self, assoc_id: int, hdr: InstanceHeader, path: Path,
                        calling_ae: str = "") -> None:
        now = self.clock()
        with self._lock:
            s = self._series.get(hdr.series_uid)
            if s is None:
                s = SeriesState(patient_id=hdr.patient_id, patient_name=hdr.patient_name,
                                study_uid=hdr.study_uid, series_uid=hdr.series_uid,
                                modality=hdr.modality,
                                frame_of_reference_uid=hdr.frame_of_reference_uid,
                                series_description=hdr.series_description,
                                path=path.parent, sop_class_uid=hdr.sop_class_uid,
                                image_type=list(hdr.image_type), first_activity=now)
                self._series[hdr.series_uid] = s
            if not s.dirty:
                s.first_activity = now
            s.instances[hdr.sop_instance_uid] = path
            s.open_associations.add(assoc_id)
            s.last_activity = now
            s.dirty = True
            if calling_ae:
                s.calling_ae_titles.add(calling_ae)
            self._assoc_series.setdefault(assoc_id, set()).add(hdr.series_uid)

    def instance_rejected(self, assoc_id: int, series_uid: str) -> None:
        with self._lock:
            s = self._series.get(series_uid)
            if s is not None:
                s.rejected += 1
                s.last_activity = self.clock()

    def association_released(self, assoc_id: int) -> list[str]:
        """Normal release: the series it carried may complete after the idle timeout
        (and an earlier abort of them is cleared: this was the resend)."""
        with self._lock:
            uids = self._assoc_series.pop(assoc_id, set())
            for uid in uids:
                s = self._series[uid]
                s.open_associations.discard(assoc_id)
                s.aborted = False
                s.last_activity = self.clock()
            return sorted(uids)

    def association_aborted(self, assoc_id: int) -> list[dict]:
        """Abnormal end: its series are marked incomplete. Returns their summaries."""
        with self._lock:
            uids = self._assoc_series.pop(assoc_id, set())
            out = []
            for uid in uids:
                s = self._series[uid]
                s.open_associations.discard(assoc_id)
                s.aborted = True
                s.dirty = True
                out.append(s.event())
            return out

    def due(self) -> list[tuple[dict, Path]]:
        """(event summary, series folder) of the series that complete now; each is
        returned once per completion."""
        now = self.clock()
        done = []
        with self._lock:
            for s in self._series.values():
                if (s.dirty and not s.aborted and not s.open_associations
                        and now - s.last_activity >= self.idle_timeout_s):
                    s.dirty = False
                    s.completions += 1
                    done.append((s.event(), s.path))
            return done

    def get(self, series_uid: str) -> SeriesState | None:
        with self._lock:
            return self._series.get(series_uid)

    def open_association_count(self) -> int:
        with self._lock:
            return len(self._assoc_series)
