"""Append-only audit log of diagnoses (SQLite).

Each record: UTC time, model name and version, SHA-256 of the uploaded file,
predicted class, calibrated probabilities and flags. Never patient identifiers
or pixels. Safe for many threads and processes: every write is its own
transaction in WAL mode, retried while another writer holds the lock.

The log is readable by the app's user only: it lives in its own folder
(created 0700) and the database is created 0600 (SQLite gives its -wal and
-shm files the database's permissions).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

AUDIT_LOG_ENV = "CTAPP_AUDIT_LOG"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "audit_log" / "audit_log.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS diagnoses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    prediction TEXT NOT NULL,
    confidence REAL NOT NULL,
    probabilities TEXT NOT NULL,
    flags TEXT NOT NULL
)
"""


def default_path() -> Path:
    return Path(os.environ.get(AUDIT_LOG_ENV) or DEFAULT_PATH)


class AuditLog:
    def __init__(self, path: str | Path | None = None, timeout: float = 30.0):
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created (or tightened) before SQLite opens it, whatever the umask.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)
        self.timeout = timeout
        self._local = threading.local()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def record(self, *, model: str, model_version: str, image_sha256: str, prediction: str,
               probabilities: dict[str, float], flags: list[str] | tuple[str, ...] = ()) -> int:
        """Append one diagnosis; returns its id."""
        row = (datetime.now(timezone.utc).isoformat(timespec="milliseconds"), model, model_version, image_sha256,
               prediction, float(max(probabilities.values(), default=0.0)),
               json.dumps({k: round(float(v), 6) for k, v in probabilities.items()}), json.dumps(list(flags)))
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            cursor = db.execute(
                "INSERT INTO diagnoses (time, model, model_version, image_sha256, prediction, confidence, "
                "probabilities, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(cursor.lastrowid)

    def count(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM diagnoses").fetchone()[0])

    def recent(self, limit: int = 100) -> list[dict]:
        cursor = self._connect().execute("SELECT * FROM diagnoses ORDER BY id DESC LIMIT ?", (limit,))
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
