"""Durable orchestrator state: sessions, the planning-data registry and hand-off records in
SQLite (WAL mode) under ``<paths.root>/state/orchestrator.sqlite3``.

Written through as things change (a session is saved before any event about it is
published), read back at start-up (:meth:`OrchestratorStore.load`), so a restarted
orchestrator - after ``kill -9`` too - has every session, the patients' planning data and
the per-instance hand-off status. WAL with ``synchronous=NORMAL``: a committed transaction
survives a process crash (an operating-system crash may lose the last ones).

The schema is versioned (``meta.schema_version``); a database of another version is refused
with a clear error rather than misread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from adaptive.errors import ServiceError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, room TEXT NOT NULL, patient_id TEXT NOT NULL,
    state TEXT NOT NULL, record TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    patient_id TEXT NOT NULL, series_uid TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (patient_id, series_uid));
CREATE TABLE IF NOT EXISTS used_cbcts (series_uid TEXT PRIMARY KEY, session_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS handoff_instances (
    session_id TEXT NOT NULL, sop_instance_uid TEXT NOT NULL, position INTEGER NOT NULL,
    path TEXT NOT NULL, sha256 TEXT NOT NULL, status TEXT NOT NULL, dimse_status INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL, PRIMARY KEY (session_id, sop_instance_uid));
"""


class OrchestratorStore:
    """One SQLite connection, used from the orchestrator's thread and its hand-off threads
    (serialised by a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                                (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise ServiceError(f"{self.path}: orchestrator state schema version {row[0]}, "
                                   f"this version reads {SCHEMA_VERSION}; move the file away "
                                   f"or migrate it")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _tx(self, statements) -> None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # -- sessions ---------------------------------------------------------------------------
    def save_session(self, s) -> None:
        self._tx([("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                   (s.session_id, s.room, s.patient_id, s.state,
                    json.dumps(s.to_record(), default=str), time.time()))])

    def sessions(self) -> list[dict]:
        with self._lock:
            rows = self.db.execute("SELECT record FROM sessions ORDER BY updated").fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- planning-data registry -----------------------------------------------------------
    def save_series(self, patient_id: str, series_uid: str, record: dict) -> None:
        self._tx([("INSERT OR REPLACE INTO series VALUES (?, ?, ?)",
                   (patient_id, series_uid, json.dumps(record, default=str)))])

    def series(self) -> list[tuple[str, str, dict]]:
        with self._lock:
            rows = self.db.execute("SELECT patient_id, series_uid, record FROM series").fetchall()
        return [(p, u, json.loads(r)) for p, u, r in rows]

    def use_cbct(self, series_uid: str, session_id: str) -> None:
        self._tx([("INSERT OR REPLACE INTO used_cbcts VALUES (?, ?)", (series_uid, session_id))])

    def used_cbcts(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self.db.execute("SELECT series_uid FROM used_cbcts")}

    # -- hand-off instances -----------------------------------------------------------------
    def handoff_plan(self, session_id: str, items: list[tuple[str, str, str]]) -> None:
        """Record the instances of a session's hand-off: (SOP Instance UID, path, SHA-256),
        in order, each ``pending`` unless already recorded (a retry keeps their status)."""
        now = time.time()
        sql = ("INSERT OR IGNORE INTO handoff_instances (session_id, sop_instance_uid, "
               "position, path, sha256, status, updated) VALUES (?, ?, ?, ?, ?, 'pending', ?)")
        self._tx([(sql, (session_id, uid, i, path, sha, now))
                  for i, (uid, path, sha) in enumerate(items)])

    def handoff_status(self, session_id: str, sop_instance_uid: str, status: str, *,
                       dimse_status: int | None = None, error: str = "",
                       attempt: bool = False) -> None:
        sql = ("UPDATE handoff_instances SET status=?, dimse_status=?, error=?, "
               "attempts=attempts+?, updated=? WHERE session_id=? AND sop_instance_uid=?")
        self._tx([(sql, (status, dimse_status, error[:2000], 1 if attempt else 0, time.time(),
                         session_id, sop_instance_uid))])

    def handoff_instances(self, session_id: str) -> list[dict]:
        with self._lock:
            cur = self.db.execute("SELECT sop_instance_uid, path, sha256, status, dimse_status, "
                                  "attempts, error FROM handoff_instances WHERE session_id=? "
                                  "ORDER BY position", (session_id,))
            rows = cur.fetchall()
        keys = ("sop_instance_uid", "path", "sha256", "status", "dimse_status", "attempts",
                "error")
        return [dict(zip(keys, r)) for r in rows]
