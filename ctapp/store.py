"""The app's records: the audit log of diagnoses and the index of folder
evaluations, in one store with two engines (SQLAlchemy 2).

* SQLite (the default): one file, ``audit_log/audit_log.sqlite`` beside the
  app or ``CTAPP_AUDIT_LOG``, in its own folder (0700), the file 0600, WAL mode.
* PostgreSQL when ``CTAPP_DATABASE_URL`` is set, in libpq's form
  ``postgresql://user:password@host:port/database`` (driven by psycopg 3), so
  that several replicas of the app write to one database.

A diagnosis record holds the UTC time, the signed-in user ('' when sign-in is
off), model name and version, the SHA-256 of the uploaded file, the answer
state and, apart from it, the class (for an uncertain answer the class it
leans to, never a result), calibrated probabilities and flags: never a file
name, a header value or pixels. A series is one record: its opaque id, its
number of slices and the hash of its pixel values (see :meth:`Store.record`).
Every write is one transaction, committed before it returns.

The schema is created on first use and brought up to date by the explicit
steps in ``MIGRATIONS``; each process migrates under a database-wide lock
(PostgreSQL's advisory lock, SQLite's write lock), so replicas starting
together apply every step exactly once.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .report import spreadsheet_cell

AUDIT_LOG_ENV = "CTAPP_AUDIT_LOG"
DATABASE_URL_ENV = "CTAPP_DATABASE_URL"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "audit_log" / "audit_log.sqlite"
URL_FORM = "postgresql://user:password@host:port/database"
# Any constant shared by every replica: the key of PostgreSQL's advisory lock around migrations.
_MIGRATION_LOCK = 0x63746170

log = logging.getLogger(__name__)


class StoreConfigError(ValueError):
    """A database URL the store cannot use (the message never shows a password)."""


metadata = MetaData()
# Times are ISO 8601 text in UTC with milliseconds ("2025-01-31T12:00:00.123+00:00"), as the
# first SQLite logs stored them: one format on both engines, ordered like the times themselves,
# and the first 10 characters are the day.
diagnoses = Table(
    "diagnoses", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("image_sha256", Text, nullable=False),
    Column("prediction", Text, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("probabilities", Text, nullable=False),
    Column("flags", Text, nullable=False),
    Column("username", Text, nullable=False, server_default=""),
    # The answer state apart from the class: "confident" (only then is the class a result), "low confidence",
    # "unlike the training images", "not a chest CT"; a series also "no result" (too few confident slices).
    Column("state", Text, nullable=False, server_default=""),
    Column("series_id", Text, nullable=False, server_default=""),  # '' for a single slice
    Column("slices", Integer, nullable=False, server_default="1"),
    sqlite_autoincrement=True,
)
evaluation_reports = Table(
    "evaluation_reports", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Text, nullable=False),
    Column("username", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("report", Text, nullable=False),  # the report's file name in the reports folder
    Column("evaluated_on", Text, nullable=False),  # the server data folder's name (and split)
    Column("images", Integer, nullable=False),
    Column("accuracy", Float),
    Column("macro_f1", Float),
    sqlite_autoincrement=True,
)
# What the PACS batch and the worklist stored back (ctapp.pacs): one row per model version and
# series, by opaque keys only (a hash of the series UID, a short hash of the study UID).
pacs_results = Table(
    "pacs_results", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Text, nullable=False),
    Column("username", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("study", Text, nullable=False),
    Column("series", Text, nullable=False),
    Column("status", Text, nullable=False),  # "stored", "already stored" or "failed"
    Column("slices", Integer),
    Column("verdict", Text, nullable=False),
    Column("message", Text, nullable=False),  # why it failed
    UniqueConstraint("model", "model_version", "series", name="uq_pacs_results_series"),
    sqlite_autoincrement=True,
)
schema_version = Table("ctapp_schema", metadata, Column("version", Integer, nullable=False))


def _v1_diagnoses(conn: Connection) -> None:
    """The first layout (no user column); SQLite logs written before the schema table have it."""
    Table("diagnoses", MetaData(),
          Column("id", Integer, primary_key=True, autoincrement=True),
          *(Column(name, kind, nullable=False) for name, kind in [
              ("time", Text), ("model", Text), ("model_version", Text), ("image_sha256", Text),
              ("prediction", Text), ("confidence", Float), ("probabilities", Text), ("flags", Text)]),
          sqlite_autoincrement=True).create(conn, checkfirst=True)


def _v2_users_and_reports(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE diagnoses ADD COLUMN username TEXT NOT NULL DEFAULT ''"))
    evaluation_reports.create(conn)
    for name, column in [("ix_diagnoses_time", "time"), ("ix_diagnoses_username", "username"),
                         ("ix_diagnoses_model", "model"), ("ix_evaluation_reports_time", "time")]:
        table = "evaluation_reports" if name.startswith("ix_evaluation") else "diagnoses"
        conn.execute(text(f"CREATE INDEX {name} ON {table} ({column})"))


# The flags diagnoses carry for an answer state other than confident, most severe first: the words
# every record so far was written with (pages/diagnosis.py), which migration 3 reads states from.
_STATE_FLAGS = ("not a chest CT", "unlike the training images", "low confidence")
CONFIDENT_STATE = "confident"


def _v3_answer_states_and_series(conn: Connection) -> None:
    """The answer state in a column of its own (records before it kept only the
    leaning class, so a document image read as a cancer class): read back from
    the flags those records carry."""
    for column in ("state TEXT NOT NULL DEFAULT ''", "series_id TEXT NOT NULL DEFAULT ''",
                   "slices INTEGER NOT NULL DEFAULT 1"):
        conn.execute(text(f"ALTER TABLE diagnoses ADD COLUMN {column}"))
    cases = " ".join(f"WHEN flags LIKE '%\"{flag}\"%' THEN '{flag}'" for flag in _STATE_FLAGS)
    conn.execute(text(f"UPDATE diagnoses SET state = CASE {cases} ELSE '{CONFIDENT_STATE}' END"))
    conn.execute(text("CREATE INDEX ix_diagnoses_state ON diagnoses (state)"))


def _v4_pacs_results(conn: Connection) -> None:
    pacs_results.create(conn)


# Step n brings the schema from version n-1 to n. Append steps, never edit one that has shipped.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1_diagnoses, _v2_users_and_reports,
                                                  _v3_answer_states_and_series, _v4_pacs_results]
SCHEMA_VERSION = len(MIGRATIONS)


def database_url(text_url: str) -> URL:
    """``CTAPP_DATABASE_URL`` as a SQLAlchemy URL: libpq's ``postgresql://`` (or
    ``postgres://``) runs on psycopg 3; ``sqlite:///path`` is accepted too."""
    shown = "CTAPP_DATABASE_URL"
    try:
        url = make_url((text_url or "").strip())
    except ArgumentError:
        raise StoreConfigError(f"{shown} is not a database URL; expected {URL_FORM}") from None
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise StoreConfigError(f"{shown}: the driver '{driver}' is not installed here; use {URL_FORM} (psycopg 3)")
        url = url.set(drivername="postgresql+psycopg")
        if not url.database:
            raise StoreConfigError(f"{shown} names no database: expected {URL_FORM}")
    elif backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StoreConfigError(f"{shown}: a SQLite URL needs a file, e.g. sqlite:////srv/ctapp/audit.sqlite")
    else:
        raise StoreConfigError(f"{shown}: '{backend}' databases are not supported; use {URL_FORM}")
    return url


def default_path() -> Path:
    return Path(os.environ.get(AUDIT_LOG_ENV) or DEFAULT_PATH)


def configured_location() -> str:
    """Where the app's store is: the database URL from ``CTAPP_DATABASE_URL``,
    else the SQLite file (``CTAPP_AUDIT_LOG`` or the default path)."""
    return os.environ.get(DATABASE_URL_ENV, "").strip() or str(default_path())


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _private_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Created (or tightened) before SQLite opens it, whatever the umask; SQLite gives its
    # -wal and -shm files the database's permissions.
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)


class Store:
    """The audit log and the evaluation index. ``Store(path)`` opens a SQLite
    file, ``Store(url=...)`` any URL :func:`database_url` accepts,
    ``Store.from_environment()`` what the app is configured with."""

    def __init__(self, path: str | Path | None = None, *, url: str | None = None, timeout: float = 30.0):
        if url is not None:
            self.url = database_url(url)
        else:
            self.url = URL.create("sqlite", database=str(Path(path) if path is not None else default_path()))
        self.dialect = self.url.get_backend_name()
        self.path = Path(self.url.database) if self.dialect == "sqlite" else None
        if self.path is not None:
            _private_file(self.path)
            self.engine = create_engine(self.url, connect_args={"timeout": timeout})
            event.listen(self.engine, "connect", functools.partial(_sqlite_connect, timeout=timeout))
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True, pool_size=4, max_overflow=4,
                                        connect_args={"connect_timeout": int(timeout), "application_name": "ctapp"})
        self.migrate()

    @classmethod
    def from_environment(cls) -> Store:
        location = configured_location()
        return cls(url=location) if os.environ.get(DATABASE_URL_ENV, "").strip() else cls(location)

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------------ transactions and schema

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One transaction that holds the write lock from its start (SQLite:
        BEGIN IMMEDIATE, so it never fails half-way on a busy database)."""
        with self.engine.connect() as conn:
            conn.execution_options(ctapp_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def migrate(self) -> int:
        """Create or update the schema; returns the version it was at before."""
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            tables = set(inspect(conn).get_table_names())
            if "ctapp_schema" not in tables:
                schema_version.create(conn)
                conn.execute(schema_version.insert().values(version=1 if "diagnoses" in tables else 0))
            found = conn.execute(select(schema_version.c.version)).scalar_one()
            if found > SCHEMA_VERSION:
                raise RuntimeError(f"the database's schema is version {found}, newer than this app's "
                                   f"{SCHEMA_VERSION}: update the app")
            for step in MIGRATIONS[found:]:
                step(conn)
            if found < SCHEMA_VERSION:
                conn.execute(schema_version.update().values(version=SCHEMA_VERSION))
                log.info("audit log schema brought from version %d to %d", found, SCHEMA_VERSION)
        return found

    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute(select(schema_version.c.version)).scalar_one()

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ diagnoses

    def record(self, *, model: str, model_version: str, image_sha256: str, prediction: str,
               probabilities: dict[str, float], flags: Iterable[str] = (), user: str = "", state: str | None = None,
               series_id: str = "", slices: int = 1) -> int:
        """Append one diagnosis; returns its id once it is committed.

        ``prediction`` is the class (the leaning class when ``state`` is not
        "confident"); without ``state`` it is read from ``flags`` as the
        diagnosis page writes them. A series: ``image_sha256`` is the hash of
        its pixel values, ``series_id`` its opaque id, ``slices`` its length.
        """
        return self.record_many([dict(model=model, model_version=model_version, image_sha256=image_sha256,
                                      prediction=prediction, probabilities=probabilities, flags=flags,
                                      user=user, state=state, series_id=series_id, slices=slices)])[0]

    def record_many(self, records: list[dict]) -> list[int]:
        """Append several diagnoses (keyword sets of :meth:`record`) in one
        transaction: all of them or, on an error, none."""
        time = now_text()
        rows = [_diagnosis_row(time, **r) for r in records]
        with self._write() as conn:
            return [conn.execute(diagnoses.insert().values(**row)).inserted_primary_key[0] for row in rows]

    def count(self) -> int:
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(diagnoses)).scalar_one()

    def recent(self, limit: int = 100) -> list[dict]:
        with self._read() as conn:
            result = conn.execute(select(diagnoses).order_by(diagnoses.c.id.desc()).limit(limit))
            return [dict(row._mapping) for row in result]

    def diagnoses(self, *, since: date | None = None, until: date | None = None, user: str | None = None,
                  model: str | None = None, prediction: str | None = None, state: str | None = None,
                  limit: int = 10_000) -> list[dict]:
        """Diagnoses newest first, filtered by day (``since`` and ``until``
        inclusive, UTC), user, model, class (leaning or not) and answer state."""
        query = _filtered(select(diagnoses), since, until, user, model, prediction, state)
        with self._read() as conn:
            result = conn.execute(query.order_by(diagnoses.c.time.desc(), diagnoses.c.id.desc()).limit(limit))
            return [dict(row._mapping) for row in result]

    def counts_per_day(self, *, since: date | None = None, until: date | None = None, user: str | None = None,
                       model: str | None = None, prediction: str | None = None,
                       state: str | None = None) -> list[tuple[str, int]]:
        """(UTC day 'YYYY-MM-DD', diagnoses) for each day with any, oldest first."""
        day = func.substr(diagnoses.c.time, 1, 10)
        query = _filtered(select(day, func.count()), since, until, user, model, prediction, state)
        with self._read() as conn:
            return [(d, int(n)) for d, n in conn.execute(query.group_by(day).order_by(day))]

    def choices(self) -> dict[str, list]:
        """The users, models, classes and (state, class) results that occur, for filters."""
        out: dict[str, list] = {}
        with self._read() as conn:
            for name, column in [("user", diagnoses.c.username), ("model", diagnoses.c.model),
                                 ("prediction", diagnoses.c.prediction)]:
                out[name] = [v for (v,) in conn.execute(select(column).distinct().order_by(column))]
            pairs = select(diagnoses.c.state, diagnoses.c.prediction).distinct()
            out["result"] = [tuple(r) for r in conn.execute(pairs.order_by(diagnoses.c.state, diagnoses.c.prediction))]
        return out

    # ------------------------------------------------------------------ folder evaluations

    def add_report(self, *, user: str, model: str, model_version: str, report: str, evaluated_on: str,
                   images: int, accuracy: float | None = None, macro_f1: float | None = None) -> int:
        """Index one folder evaluation (``report``: its file name in the reports folder)."""
        row = dict(time=now_text(), username=user or "", model=model, model_version=model_version,
                   report=Path(report).name, evaluated_on=evaluated_on, images=int(images),
                   accuracy=None if accuracy is None else float(accuracy),
                   macro_f1=None if macro_f1 is None else float(macro_f1))
        with self._write() as conn:
            return conn.execute(evaluation_reports.insert().values(**row)).inserted_primary_key[0]

    def reports(self, limit: int = 200) -> list[dict]:
        """Indexed folder evaluations, newest first."""
        query = select(evaluation_reports).order_by(evaluation_reports.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # ------------------------------------------------------------------ PACS results

    def record_pacs_result(self, *, user: str, model: str, model_version: str, study: str, series: str,
                           status: str, slices: int | None = None, verdict: str = "", message: str = "") -> None:
        """What happened to one series for one model version (replacing an
        earlier attempt's row), committed before it returns."""
        row = dict(time=now_text(), username=user or "", model=model, model_version=model_version, study=study,
                   series=series, status=status, slices=slices, verdict=verdict, message=message)
        key = (pacs_results.c.model == model) & (pacs_results.c.model_version == model_version) & \
            (pacs_results.c.series == series)
        with self._write() as conn:
            if conn.execute(pacs_results.update().where(key).values(**row)).rowcount == 0:
                conn.execute(pacs_results.insert().values(**row))

    def pacs_done(self, model: str, model_version: str) -> set[str]:
        """The series keys whose result this model version has in the PACS."""
        query = select(pacs_results.c.series).where(
            (pacs_results.c.model == model) & (pacs_results.c.model_version == model_version)
            & pacs_results.c.status.in_(("stored", "already stored")))
        with self._read() as conn:
            return {key for (key,) in conn.execute(query)}

    def pacs_results(self, limit: int = 500) -> list[dict]:
        """PACS results, newest first."""
        query = select(pacs_results).order_by(pacs_results.c.time.desc(), pacs_results.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]


def state_from_flags(flags: Iterable[str]) -> str:
    """The answer state a record's flags name ("confident" when none does)."""
    flags = set(flags)
    return next((state for state in _STATE_FLAGS if state in flags), CONFIDENT_STATE)


def _diagnosis_row(time: str, *, model: str, model_version: str, image_sha256: str, prediction: str,
                   probabilities: dict[str, float], flags: Iterable[str] = (), user: str = "",
                   state: str | None = None, series_id: str = "", slices: int = 1) -> dict:
    if not (isinstance(image_sha256, str) and image_sha256):
        raise ValueError("a diagnosis record needs the file's SHA-256")
    if int(slices) < 1:
        raise ValueError(f"a diagnosis record covers at least one slice, not {slices}")
    flags = list(flags)
    return dict(time=time, username=user or "", model=model, model_version=model_version, image_sha256=image_sha256,
                prediction=prediction, confidence=float(max(probabilities.values(), default=0.0)),
                probabilities=json.dumps({k: round(float(v), 6) for k, v in probabilities.items()}),
                flags=json.dumps(flags), state=state or state_from_flags(flags), series_id=series_id or "",
                slices=int(slices))


def _filtered(query, since, until, user, model, prediction, state=None):
    if since is not None:
        query = query.where(diagnoses.c.time >= since.isoformat())
    if until is not None:
        query = query.where(diagnoses.c.time < (until + timedelta(days=1)).isoformat())
    for column, value in [(diagnoses.c.username, user), (diagnoses.c.model, model),
                          (diagnoses.c.prediction, prediction), (diagnoses.c.state, state)]:
        if value is not None:
            query = query.where(column == value)
    return query


def _sqlite_connect(dbapi_connection, _record, *, timeout: float) -> None:
    # SQLAlchemy's recipe for real SQLite transactions: the driver stays out of
    # the way (autocommit) and the "begin" listener below issues BEGIN itself.
    dbapi_connection.isolation_level = None
    _use_wal(dbapi_connection, timeout)
    dbapi_connection.execute("PRAGMA synchronous=FULL")


def _use_wal(dbapi_connection, timeout: float) -> None:
    # WAL mode is stored in the file, so only the first opener switches it; the
    # switch needs an exclusive lock and SQLite answers "database is locked" at
    # once, without its busy timeout, when replicas starting together race for it.
    deadline = time.monotonic() + timeout
    while dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ctapp_write") else "BEGIN")


# --------------------------------------------------------------------------- CSV export

AUDIT_CSV_COLUMNS = ["time", "username", "model", "model_version", "image_sha256", "series_id", "slices", "state",
                     "prediction", "confidence", "probabilities", "flags"]


def audit_csv(rows: list[dict]) -> str:
    """Diagnosis records as CSV; text cells that a spreadsheet would run as a
    formula are neutralised the way every CSV of the app is."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(AUDIT_CSV_COLUMNS)
    for row in rows:
        writer.writerow([spreadsheet_cell(row.get(c, "")) for c in AUDIT_CSV_COLUMNS])
    return out.getvalue()
