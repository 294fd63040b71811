"""Pull patients' archives from an Orthanc server (its REST API) into a folder the archive
replay reads.

For each patient: ``POST /tools/find`` (Level Patient, exact PatientID) finds it,
``GET /patients/{id}/instances`` lists its instances and ``GET /instances/{id}/file``
downloads each as stored (Orthanc keeps the bytes it received, so a pulled archive hashes
like the original and a replay already done is not repeated). Files are written
atomically as ``<folder>/<patient>/<orthanc instance id>.dcm``; an instance already there
with the same size is not downloaded again. Every download is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from adaptive.errors import ReplayDataError
from adaptive.log import get_logger
from adaptive.replay.discover import safe_name

log = get_logger("adaptive.replay.orthanc_pull")

TIMEOUT_S = 60.0


class OrthancClient:
    """Minimal Orthanc REST client (JSON and raw GET, JSON POST)."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S):
        u = urllib.parse.urlparse(url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ReplayDataError(f"not an Orthanc URL (http[s]://host:port): {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _open(self, path: str, data: bytes | None = None):
        req = urllib.request.Request(self.url + path, data=data,
                                     method="POST" if data is not None else "GET")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except (urllib.error.URLError, OSError) as e:
            raise ReplayDataError(f"Orthanc {self.url}{path}: {e}") from e

    def get_json(self, path: str):
        with self._open(path) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: dict):
        with self._open(path, json.dumps(body).encode()) as r:
            return json.loads(r.read())

    def download(self, path: str, dest: Path) -> int:
        """Stream ``path`` into ``dest`` atomically; returns the bytes written."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=dest.parent)
        n = 0
        try:
            with os.fdopen(fd, "wb") as f, self._open(path) as r:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    n += len(chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return n


def pull_patients(url: str, folder: str | Path, patient_ids: list[str] | None = None,
                  client: OrthancClient | None = None) -> dict[str, int]:
    """Download every instance of ``patient_ids`` (default: every patient on the server)
    into ``folder``; returns PatientID → number of instances. A Patient ID the server does
    not have is a :class:`ReplayDataError`."""
    c = client or OrthancClient(url)
    folder = Path(folder)
    if patient_ids:
        found = {}
        for pid in patient_ids:
            ids = c.post_json("/tools/find", {"Level": "Patient", "Query": {"PatientID": pid},
                                              "CaseSensitive": True})
            if not ids:
                raise ReplayDataError(f"Orthanc {c.url} has no patient with PatientID {pid!r}")
            found[pid] = ids
    else:
        found = {}
        for oid in c.get_json("/patients"):
            pid = c.get_json(f"/patients/{oid}").get("MainDicomTags", {}).get("PatientID", "")
            found.setdefault(pid, []).append(oid)
    counts = {}
    for pid, oids in found.items():
        n = 0
        for oid in oids:
            for inst in c.get_json(f"/patients/{oid}/instances"):
                iid = inst["ID"]
                dest = folder / safe_name(pid) / f"{safe_name(iid, digest=False)}.dcm"
                size = int(inst.get("FileSize") or -1)
                if not (dest.is_file() and dest.stat().st_size == size):
                    c.download(f"/instances/{iid}/file", dest)
                n += 1
        counts[pid] = n
        log.info("orthanc_patient_pulled", patient_id=pid, instances=n, url=c.url)
    return counts
