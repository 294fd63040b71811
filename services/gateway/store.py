"""On-disk store of received instances, written atomically, plus the quarantine.

Layout: ``<store>/<patient>/<study UID>/<series UID>/<SOP Instance UID>.dcm`` (patient ID
made filesystem-safe). Every file is written to a temporary name in the target folder,
optionally fsync'ed, then renamed with :func:`os.replace`, so a reader never sees a
partial file and a resend of the same SOP Instance UID overwrites the earlier copy.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
PREAMBLE = b"\x00" * 128 + b"DICM"


def safe_name(text: str, fallback: str = "UNKNOWN") -> str:
    """A filesystem-safe single path component for ``text`` (max 64 chars)."""
    s = _SAFE.sub("_", text.strip())[:64].strip(".")
    return s or fallback


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks, *, fsync: bool) -> Path:
    """Write the byte ``chunks`` to ``path`` atomically (temp file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.writelines(chunks)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


class InstanceStore:
    def __init__(self, root: str | Path, quarantine: str | Path, fsync: str = "instance"):
        self.root = Path(root)
        self.quarantine_root = Path(quarantine)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine_root.mkdir(parents=True, exist_ok=True)

    def series_dir(self, patient_id: str, study_uid: str, series_uid: str) -> Path:
        return self.root / safe_name(patient_id) / safe_name(study_uid) / safe_name(series_uid)

    def instance_path(self, patient_id, study_uid, series_uid, sop_instance_uid) -> Path:
        return (self.series_dir(patient_id, study_uid, series_uid)
                / f"{safe_name(sop_instance_uid)}.dcm")

    def write(self, path: Path, meta: bytes, dataset: bytes) -> Path:
        """Write a Part 10 file (preamble, ``meta`` = encoded file meta group, dataset)."""
        return write_atomic(path, (PREAMBLE, meta, dataset), fsync=self.fsync == "instance")

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
        folder = self.quarantine_root / safe_name(reason)
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}_{safe_name(name, 'noname')[:40]}_" \
               f"{uuid.uuid4().hex[:8]}"
        path = write_atomic(folder / f"{stem}.dcm", (PREAMBLE, meta, dataset), fsync=True)
        write_atomic(folder / f"{stem}.json",
                     (json.dumps(sidecar, indent=2, sort_keys=True).encode(),), fsync=True)
        return path
