"""On-disk store of received instances, written atomically, plus the quarantine.

Layout: ``<store>/<patient folder>/<study UID>/<series UID>/<SOP Instance UID>.dcm``.
Only identifiers that passed :mod:`services.validators` reach here: a valid UID (digits
and dots, no empty component) is used as the file or folder name as it is, so distinct
UIDs give distinct names; the Patient ID, which may hold any character but backslash and
control characters, is percent-encoded (:func:`patient_folder_name`), which is injective.
Nothing is sanitised by mapping characters together.

An instance is written to a temporary file in the target folder (fsync'ed per policy)
and then *linked* to its final name, which fails if that name exists: a file never
appears partially written and is never overwritten. A SOP Instance UID received again
is compared with the stored copy: identical content (same dataset bytes, or the same
elements after decoding when the encoding differs) is an idempotent success; different
content is a :attr:`StoreOutcome.CONFLICT` and the stored copy stays (the gateway refuses
the new one and quarantines it). The first copy acknowledged is the one the pipeline may
already have used, so it is never replaced silently.

Ownership (:meth:`InstanceStore.claim`): a Study Instance UID belongs to one patient
and a Series Instance UID to one patient and study, as first received (rebuilt from
the store's folders at start-up); an instance claiming otherwise is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pydicom

from adaptive.atomic import fsync_dir, write_bytes_atomic, write_temp
from adaptive.log import get_logger

PREAMBLE = b"\x00" * 128 + b"DICM"
_MAX_NAME_BYTES = 240   # below NAME_MAX (255) with room for ".dcm"


class StoreOutcome(Enum):
    STORED = "stored"          # new instance written
    IDENTICAL = "identical"    # already stored with the same content: nothing written
    CONFLICT = "conflict"      # already stored with different content: nothing written


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    path: Path
    stored_sha256: str = ""    # of the stored file's dataset bytes (CONFLICT only)
    received_sha256: str = ""  # of the received dataset bytes (CONFLICT only)


def patient_folder_name(patient_id: str) -> str:
    """One path component for a (validated) Patient ID, injective: UTF-8 percent-encoding
    of every character outside ``A-Z a-z 0-9 _ -`` ("." and "~" included, so the name is
    never "." or ".." and "%" only starts an escape). A name that would be longer than
    240 bytes becomes ``~`` + the SHA-256 of the ID (no encoded name starts with "~")."""
    name = urllib.parse.quote(patient_id.strip(" "), safe="").replace(".", "%2E") \
        .replace("~", "%7E")
    if len(name) > _MAX_NAME_BYTES:
        name = "~" + hashlib.sha256(patient_id.strip(" ").encode()).hexdigest()
    return name


def _safe_label(text: str, fallback: str) -> str:
    """A short, readable, filesystem-safe label for quarantine file names (uniqueness
    comes from the time stamp and a random suffix, not from the label)."""
    s = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_"
                for c in text.strip())[:40].strip(".")
    return s or fallback


def _dataset_bytes(file_bytes: bytes) -> bytes | None:
    """The dataset part of a Part 10 file whose meta group starts with its group length
    (as every file we write does); None if the file does not look like that."""
    if file_bytes[128:132] != b"DICM" or file_bytes[132:138] != b"\x02\x00\x00\x00UL":
        return None
    (group_len,) = struct.unpack("<I", file_bytes[140:144])
    return file_bytes[144 + group_len:]


def _same_elements(stored: Path, meta: bytes, dataset: bytes) -> bool:
    """Whether the stored file and the received instance hold the same data elements
    (both decoded; used when their encodings differ)."""
    try:
        a = pydicom.dcmread(stored)
        b = pydicom.dcmread(io.BytesIO(PREAMBLE + meta + dataset))
    except Exception:  # noqa: BLE001 - undecodable means "not shown identical"
        return False
    return a == b


class InstanceStore:
    def __init__(self, root: str | Path, quarantine: str | Path, fsync: str = "instance"):
        self.root = Path(root)
        self.quarantine_root = Path(quarantine)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine_root.mkdir(parents=True, exist_ok=True)
        self.log = get_logger("services.gateway.store")
        self._claims_lock = threading.Lock()
        self._study_patient: dict[str, str] = {}
        self._series_owner: dict[str, tuple[str, str]] = {}
        self._index_existing()

    # -- paths ------------------------------------------------------------------------
    def series_dir(self, patient_id: str, study_uid: str, series_uid: str) -> Path:
        """Folder of a series; the UIDs must be valid (see module docstring)."""
        return self.root / patient_folder_name(patient_id) / study_uid / series_uid

    def instance_path(self, patient_id, study_uid, series_uid, sop_instance_uid) -> Path:
        return self.series_dir(patient_id, study_uid, series_uid) / f"{sop_instance_uid}.dcm"

    # -- ownership of study and series UIDs ---------------------------------------------
    def _index_existing(self) -> None:
        """Rebuild the study -> patient and series -> (patient, study) index from one
        file of each series folder already in the store."""
        for series in sorted(self.root.glob("*/*/*")):
            first = next(iter(sorted(series.glob("*.dcm"))), None)
            if first is None:
                continue
            try:
                ds = pydicom.dcmread(first, stop_before_pixels=True,
                                     specific_tags=["PatientID", "StudyInstanceUID",
                                                    "SeriesInstanceUID"])
                pid = str(ds.PatientID).strip(" ")
                study, uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            except Exception as e:  # noqa: BLE001 - a damaged file must not stop start-up
                self.log.warning("store_index_skipped", path=str(first), error=repr(e))
                continue
            self._study_patient.setdefault(study, pid)
            self._series_owner.setdefault(uid, (pid, study))

    def claim(self, patient_id: str, study_uid: str, series_uid: str) -> str:
        """Record that ``series_uid`` belongs to (``patient_id``, ``study_uid``) and
        ``study_uid`` to ``patient_id``, unless either was first received for another
        patient or study: then return a message naming the conflict ("" when fine)."""
        with self._claims_lock:
            owner = self._study_patient.get(study_uid)
            if owner is not None and owner != patient_id:
                return (f"Study {study_uid} belongs to patient {owner!r}, not "
                        f"{patient_id!r}")
            s_owner = self._series_owner.get(series_uid)
            if s_owner is not None and s_owner != (patient_id, study_uid):
                return (f"Series {series_uid} belongs to patient {s_owner[0]!r} study "
                        f"{s_owner[1]}, not patient {patient_id!r} study {study_uid}")
            self._study_patient[study_uid] = patient_id
            self._series_owner[series_uid] = (patient_id, study_uid)
            return ""

    # -- instances ----------------------------------------------------------------------
    def store_instance(self, path: Path, meta: bytes, dataset: bytes) -> StoreResult:
        """Store a Part 10 file (preamble, ``meta`` = encoded file meta group, ``dataset``)
        at ``path`` unless it exists; then compare (see module docstring)."""
        tmp = write_temp(path.parent, (PREAMBLE, meta, dataset), fsync=self.fsync == "instance")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return self._compare(path, meta, dataset)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if self.fsync == "instance":
            fsync_dir(path.parent)
        return StoreResult(StoreOutcome.STORED, path)

    def _compare(self, path: Path, meta: bytes, dataset: bytes) -> StoreResult:
        stored = _dataset_bytes(path.read_bytes())
        if stored == dataset or _same_elements(path, meta, dataset):
            return StoreResult(StoreOutcome.IDENTICAL, path)
        return StoreResult(StoreOutcome.CONFLICT, path,
                           stored_sha256=hashlib.sha256(stored or b"").hexdigest(),
                           received_sha256=hashlib.sha256(dataset).hexdigest())

    def sync_series(self, series_dir: Path) -> None:
        """fsync every file of a series and its folder (fsync policy "series")."""
        for p in series_dir.glob("*.dcm"):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(series_dir)

    def quarantine(self, reason: str, name: str, meta: bytes, dataset: bytes,
                   sidecar: dict) -> Path:
        """Keep a rejected instance under ``quarantine/<reason>/`` with a JSON sidecar
        naming why (and who sent it); never overwrites an earlier quarantined file."""
        folder = self.quarantine_root / _safe_label(reason, "unknown")
        stem = (f"{time.strftime('%Y%m%dT%H%M%S')}_{_safe_label(name, 'noname')}_"
                f"{uuid.uuid4().hex[:8]}")
        path = write_bytes_atomic(folder / f"{stem}.dcm", (PREAMBLE, meta, dataset), fsync=True)
        write_bytes_atomic(folder / f"{stem}.json",
                           (json.dumps(sidecar, indent=2, sort_keys=True).encode(),), fsync=True)
        return path
