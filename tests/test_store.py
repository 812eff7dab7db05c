"""The store (audit log + evaluation index) on both engines: SQLite files and a
real PostgreSQL server started here on loopback (those cases are skipped, with
the reason, when Debian's server binaries are absent).

Covers the URL forms, migrating a log of the first layout, filters and counts,
all-or-nothing writes, the CSV export, replicas migrating at the same moment,
concurrent writers in several processes, and a writer killed mid-run."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from multiprocessing import get_context

import pytest
from pg_cluster import PostgresCluster, postgres_missing

from ctapp import store as store_module
from ctapp.store import SCHEMA_VERSION, Store, StoreConfigError, audit_csv, database_url

PG_MISSING = postgres_missing()
needs_postgres = pytest.mark.skipif(PG_MISSING is not None, reason=f"no PostgreSQL to test against: {PG_MISSING}")
SHA = "9f" * 32


@pytest.fixture(scope="module")
def cluster():
    if PG_MISSING:
        pytest.skip(f"no PostgreSQL to test against: {PG_MISSING}")
    with PostgresCluster() as pg:
        yield pg


_databases = iter(range(10**6))


def fresh_database(cluster) -> str:
    """The URL of a new, empty database on the cluster."""
    name = f"t{next(_databases)}"
    cluster.psql(f"CREATE DATABASE {name} OWNER {cluster.user}")
    return cluster.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def location(request, tmp_path) -> dict:
    """Store() keyword arguments for an empty store of each engine."""
    if request.param == "sqlite":
        return {"path": str(tmp_path / "audit" / "audit.sqlite")}
    return {"url": fresh_database(request.getfixturevalue("cluster"))}


def open_store(location: dict) -> Store:
    return Store(location.get("path"), url=location.get("url"))


def diagnosis(i: int = 0, **changes) -> dict:
    record = dict(model="tiny", model_version="2025-01-01T00:00:00", image_sha256=f"{i:064x}", prediction="alpha",
                  probabilities={"alpha": 0.75, "beta": 0.25}, flags=[], user="")
    return {**record, **changes}


# ---------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("given, driver, database", [
    ("postgresql://ct:pw@db.example:5433/ctapp", "postgresql+psycopg", "ctapp"),
    ("postgres://ct:pw@db.example/ctapp", "postgresql+psycopg", "ctapp"),
    ("postgresql+psycopg://ct:p%40ss@db.example/ctapp", "postgresql+psycopg", "ctapp"),
    ("  sqlite:////srv/ctapp/audit.sqlite ", "sqlite", "/srv/ctapp/audit.sqlite"),
])
def test_database_url_forms(given, driver, database):
    url = database_url(given)
    assert (url.drivername, url.database) == (driver, database)


def test_a_percent_encoded_password_reaches_the_driver_decoded():
    assert database_url("postgresql://ct:p%40ss%2Fw@db.example/ctapp").password == "p@ss/w"


@pytest.mark.parametrize("given, words", [
    ("", "not a database URL"),
    ("db.example:5432/ctapp", "not a database URL"),
    ("mysql://ct:secret-pw@db.example/ctapp", "'mysql' databases are not supported"),
    ("postgresql://ct:secret-pw@db.example", "names no database"),
    ("postgresql+asyncpg://ct:secret-pw@db.example/ctapp", "driver 'asyncpg'"),
    ("sqlite://", "needs a file"),
    ("sqlite:///:memory:", "needs a file"),  # an in-memory audit log would vanish with the process
])
def test_unusable_database_urls_say_why_without_the_password(given, words):
    with pytest.raises(StoreConfigError) as caught:
        database_url(given)
    assert words in str(caught.value)
    assert "secret-pw" not in str(caught.value)
    assert "postgresql://user:password@host:port/database" in str(caught.value) or "sqlite" in given


@needs_postgres
def test_the_store_never_shows_its_password(cluster):
    store = Store(url=cluster.url)
    try:
        assert cluster.password not in repr(store) and "***" in repr(store)
    finally:
        store.close()


@needs_postgres
def test_postgres_sessions_carry_the_apps_name(cluster):
    """A DBA sees the app's sessions in pg_stat_activity by name."""
    from sqlalchemy import text

    store = Store(url=cluster.url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW application_name")).scalar() == "ctapp"
    finally:
        store.close()


def test_the_environment_chooses_the_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("CTAPP_AUDIT_LOG", str(tmp_path / "log.sqlite"))
    monkeypatch.delenv("CTAPP_DATABASE_URL", raising=False)
    store = Store.from_environment()
    assert store.dialect == "sqlite" and store.path == tmp_path / "log.sqlite"
    store.close()
    monkeypatch.setenv("CTAPP_DATABASE_URL", "oracle://x@y/z")
    with pytest.raises(StoreConfigError, match="'oracle' databases are not supported"):
        Store.from_environment()
    monkeypatch.delenv("CTAPP_DATABASE_URL")
    monkeypatch.setenv("CTAPP_AUDIT_LOG", str(tmp_path / "new" / "audit" / "log.sqlite"))  # folders made, private
    Store.from_environment().close()
    assert (tmp_path / "new" / "audit" / "log.sqlite").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new" / "audit").stat().st_mode & 0o777 == 0o700


class _Refusing:
    """A DB-API connection still in rollback-journal mode whose switch to WAL fails."""

    def __init__(self, message: str):
        self.message, self.switches = message, 0

    def execute(self, sql: str):
        if sql == "PRAGMA journal_mode":
            return self
        self.switches += 1
        raise sqlite3.OperationalError(self.message)

    def fetchone(self):
        return ("delete",)


def test_switching_to_wal_retries_only_a_locked_database_and_only_until_its_deadline():
    """Replicas starting together race for the switch ("database is locked"): that
    is retried until the timeout; any other error is raised at once."""
    broken = _Refusing("disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        store_module._use_wal(broken, timeout=5.0)
    assert broken.switches == 1
    locked = _Refusing("database is locked")
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store_module._use_wal(locked, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 3 and locked.switches > 2


# ----------------------------------------------------------------------------------- schema


def test_a_log_of_the_first_layout_is_migrated_and_keeps_its_records(tmp_path, caplog):
    path = tmp_path / "audit.sqlite"
    with sqlite3.connect(path) as db:  # the layout ctapp wrote before the schema table existed
        db.execute("CREATE TABLE diagnoses (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, model TEXT "
                   "NOT NULL, model_version TEXT NOT NULL, image_sha256 TEXT NOT NULL, prediction TEXT NOT NULL, "
                   "confidence REAL NOT NULL, probabilities TEXT NOT NULL, flags TEXT NOT NULL)")
        db.execute("INSERT INTO diagnoses VALUES (7, '2024-05-01T10:00:00.000+00:00', 'old', 'v0', ?, 'beta', 0.6, "
                   "'{\"beta\": 0.6}', '[]')", (SHA,))
    with caplog.at_level("INFO", logger="ctapp.store"):
        store = Store(path)
    try:
        # Recognised as the first version (not an empty database), and the step said in the server log.
        assert "audit log schema brought from version 1 to 4" in caplog.messages
        assert store.schema_version() == SCHEMA_VERSION == 4
        (old,) = store.recent()
        assert (old["id"], old["model"], old["image_sha256"], old["username"]) == (7, "old", SHA, "")
        assert (old["state"], old["prediction"], old["series_id"], old["slices"]) == ("confident", "beta", "", 1)
        new = store.record(**diagnosis(1, user="dr.a@example.org"))
        assert new == 8
        assert store.diagnoses(user="dr.a@example.org")[0]["id"] == 8
        assert store.migrate() == SCHEMA_VERSION  # a restart finds nothing to do
    finally:
        store.close()


def test_the_migrations_build_the_schema_the_code_declares(location):
    """Column types aside, a migrated database has exactly the declared columns, NOT NULL where declared, and
    the indexes the audit log's filters use."""
    from sqlalchemy import inspect

    store = open_store(location)
    try:
        found = inspect(store.engine)
        for table in (store_module.diagnoses, store_module.evaluation_reports):
            columns = {c["name"]: c["nullable"] for c in found.get_columns(table.name)}
            assert columns == {c.name: bool(c.nullable) for c in table.columns}, table.name
        indexes = {(t, i["name"], tuple(i["column_names"])) for t in ("diagnoses", "evaluation_reports")
                   for i in found.get_indexes(t)}
        assert indexes == {("diagnoses", "ix_diagnoses_time", ("time",)),
                           ("diagnoses", "ix_diagnoses_username", ("username",)),
                           ("diagnoses", "ix_diagnoses_model", ("model",)),
                           ("diagnoses", "ix_diagnoses_state", ("state",)),
                           ("evaluation_reports", "ix_evaluation_reports_time", ("time",))}
    finally:
        store.close()


# Records as version 2 stored them: the class (leaning, for an uncertain answer) and the flags, no state.
V2_RECORDS = [("doc", "squamous", '{"squamous": 0.504, "normal": 0.496}', '["not a chest CT", "low confidence"]'),
              ("odd", "normal", '{"normal": 0.9995, "squamous": 0.0005}', '["unlike the training images"]'),
              ("low", "normal", '{"normal": 0.55, "squamous": 0.45}', '["low confidence"]'),
              ("sure", "squamous", '{"squamous": 0.97, "normal": 0.03}', '[]')]


def test_a_version_2_log_gets_each_records_state_from_its_flags_and_loses_none(location, monkeypatch):
    """Migration 3 on both engines: every record kept, the state read back from its flags, the leaning class
    left where it was; the audit log's filters then tell a document image from a confident finding."""
    with monkeypatch.context() as old_app:
        old_app.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:2])
        old_app.setattr(store_module, "SCHEMA_VERSION", 2)
        store = open_store(location)
        with store.engine.begin() as conn:
            for name, prediction, probabilities, flags in V2_RECORDS:
                conn.execute(store_module.text(
                    "INSERT INTO diagnoses (time, model, model_version, image_sha256, prediction, confidence, "
                    "probabilities, flags, username) VALUES ('2025-03-01T08:00:00.000+00:00', 'm', 'v', :sha, "
                    ":prediction, 0.5, :probabilities, :flags, 'dr.a')"),
                    dict(sha=name, prediction=prediction, probabilities=probabilities, flags=flags))
        assert store.schema_version() == 2
        store.close()
    store = open_store(location)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        rows = {r["image_sha256"]: r for r in store.diagnoses()}
        assert {name: (rows[name]["state"], rows[name]["prediction"]) for name in rows} == {
            "doc": ("not a chest CT", "squamous"), "odd": ("unlike the training images", "normal"),
            "low": ("low confidence", "normal"), "sure": ("confident", "squamous")}
        assert [r["image_sha256"] for r in store.diagnoses(prediction="squamous", state="confident")] == ["sure"]
        assert sorted(store.choices()["result"]) == [("confident", "squamous"), ("low confidence", "normal"),
                                                     ("not a chest CT", "squamous"),
                                                     ("unlike the training images", "normal")]
        assert all(rows[name]["slices"] == 1 and rows[name]["series_id"] == "" for name in rows)
    finally:
        store.close()


def test_a_series_is_one_record_with_its_id_slice_count_and_state(location):
    store = open_store(location)
    try:
        store.record(**diagnosis(1, state="no result", series_id="S-0badc0de", slices=40, prediction="alpha",
                                 probabilities={"alpha": 0.05, "beta": 0.0}, flags=["uncertain slices: 38 of 40"]))
        (row,) = store.diagnoses()
        assert (row["state"], row["prediction"], row["series_id"], row["slices"]) == ("no result", "alpha",
                                                                                      "S-0badc0de", 40)
        with pytest.raises(ValueError, match="at least one slice"):
            store.record(**diagnosis(2, slices=0))
        assert store.count() == 1
        # no state given: the diagnosis page's flags name it
        store.record(**diagnosis(3, flags=["unlike the training images", "low confidence"]))
        assert store.diagnoses(limit=1)[0]["state"] == "unlike the training images"
    finally:
        store.close()


def test_a_database_newer_than_the_app_is_refused(tmp_path):
    store = Store(tmp_path / "audit.sqlite")
    with store.engine.begin() as conn:
        conn.execute(store_module.schema_version.update().values(version=SCHEMA_VERSION + 1))
    store.close()
    with pytest.raises(RuntimeError, match="newer than this app"):
        Store(tmp_path / "audit.sqlite")


def _open_at(location: dict, start: float) -> int:
    time.sleep(max(0.0, start - time.time()))
    store = open_store(location)
    try:
        return store.schema_version()
    finally:
        store.close()


def test_replicas_starting_together_migrate_once(location):
    start = time.time() + 1.0  # every process opens the empty database at this moment
    with get_context("fork").Pool(8) as pool:  # 4 lost the race for SQLite's WAL switch about once in 200 runs
        versions = pool.starmap(_open_at, [(location, start)] * 8)
    assert versions == [SCHEMA_VERSION] * 8
    store = open_store(location)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(store_module.select(store_module.schema_version.c.version)).scalars().all() == [
                SCHEMA_VERSION]
        store.record(**diagnosis())
        assert store.count() == 1
    finally:
        store.close()


# ------------------------------------------------------------------------------ reads and writes


def test_filters_counts_per_day_and_choices(location, monkeypatch):
    times = iter(["2025-03-01T08:00:00.000+00:00", "2025-03-01T23:59:59.999+00:00", "2025-03-02T00:00:00.000+00:00",
                  "2025-03-04T12:00:00.000+00:00", "2025-03-04T12:30:00.000+00:00"])
    monkeypatch.setattr(store_module, "now_text", lambda: next(times))
    store = open_store(location)
    try:
        store.record(**diagnosis(1, user="a@x.org"))
        store.record(**diagnosis(2, user="b@x.org", prediction="beta", probabilities={"alpha": 0.1, "beta": 0.9}))
        store.record(**diagnosis(3, user="a@x.org", model="other"))
        store.record(**diagnosis(4, user="a@x.org", flags=["low confidence"]))
        store.record(**diagnosis(5))
        assert store.count() == 5
        assert store.counts_per_day() == [("2025-03-01", 2), ("2025-03-02", 1), ("2025-03-04", 2)]
        assert store.counts_per_day(since=date(2025, 3, 2), until=date(2025, 3, 3)) == [("2025-03-02", 1)]
        assert [r["image_sha256"][-1] for r in store.diagnoses(until=date(2025, 3, 1))] == ["2", "1"]
        assert [r["image_sha256"][-1] for r in store.diagnoses(user="a@x.org")] == ["4", "3", "1"]
        assert [r["image_sha256"][-1] for r in store.diagnoses(user="a@x.org", model="tiny")] == ["4", "1"]
        assert [r["image_sha256"][-1] for r in store.diagnoses(prediction="beta")] == ["2"]
        assert [r["image_sha256"][-1] for r in store.diagnoses(user="")] == ["5"]
        assert store.choices() == {"user": ["", "a@x.org", "b@x.org"], "model": ["other", "tiny"],
                                   "prediction": ["alpha", "beta"],
                                   "result": [("confident", "alpha"), ("confident", "beta"),
                                              ("low confidence", "alpha")]}
        assert [r["image_sha256"][-1] for r in store.diagnoses(state="low confidence")] == ["4"]
        confident_alpha = store.diagnoses(state="confident", prediction="alpha")
        assert [r["image_sha256"][-1] for r in confident_alpha] == ["5", "3", "1"]
        assert store.counts_per_day(state="low confidence") == [("2025-03-04", 1)]
        (row,) = store.diagnoses(prediction="beta")
        assert row["confidence"] == 0.9 and json.loads(row["probabilities"]) == {"alpha": 0.1, "beta": 0.9}
        assert json.loads(store.diagnoses(user="a@x.org", limit=1)[0]["flags"]) == ["low confidence"]
    finally:
        store.close()


def test_several_records_are_written_all_or_none(location):
    store = open_store(location)
    try:
        with pytest.raises(ValueError, match="SHA-256"):
            store.record_many([diagnosis(1), diagnosis(2), diagnosis(3, image_sha256="")])
        assert store.count() == 0
        assert len(store.record_many([diagnosis(1), diagnosis(2)])) == 2
        assert store.count() == 2
    finally:
        store.close()


def test_folder_evaluations_are_indexed(location):
    store = open_store(location)
    try:
        store.add_report(user="admin@x.org", model="tiny", model_version="v1", report="/srv/reports/tiny--test--1.json",
                         evaluated_on="test", images=12, accuracy=0.75, macro_f1=0.7)
        store.add_report(user="", model="tiny", model_version="v1", report="tiny--valid--2.json", evaluated_on="valid",
                         images=4)
        first, second = store.reports()
        assert (first["report"], first["images"], first["accuracy"]) == ("tiny--valid--2.json", 4, None)
        assert (second["report"], second["username"], second["macro_f1"]) == ("tiny--test--1.json", "admin@x.org", 0.7)
    finally:
        store.close()


def test_the_csv_export_neutralises_formula_cells(tmp_path):
    store = Store(tmp_path / "audit.sqlite")
    try:
        store.record(**diagnosis(1, user="=HYPERLINK(\"http://evil.example\")", prediction="+cmd"))
        store.record(**diagnosis(2, user="plain@x.org", model="-tiny"))
        text = audit_csv(store.diagnoses())
    finally:
        store.close()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["username"] for r in rows] == ["plain@x.org", "'=HYPERLINK(\"http://evil.example\")"]
    assert rows[0]["model"] == "'-tiny" and rows[1]["prediction"] == "'+cmd"
    assert rows[0]["image_sha256"] == f"{2:064x}" and float(rows[0]["confidence"]) == 0.75
    assert (rows[0]["state"], rows[0]["series_id"], rows[0]["slices"]) == ("confident", "", "1")


# ------------------------------------------------------------------------------ concurrency


def _writer(location: dict, prefix: str, threads: int, count: int) -> list[str]:
    store = open_store(location)

    def one(k: int) -> list[str]:
        done = []
        for i in range(count):
            sha = f"{prefix}t{k}:{i:05d}"
            store.record(**diagnosis(image_sha256=sha, model=f"model-{prefix}"))
            done.append(sha)
        return done

    try:
        with ThreadPoolExecutor(threads) as pool:
            return [sha for part in pool.map(one, range(threads)) for sha in part]
    finally:
        store.close()


def test_concurrent_writers_in_several_processes_lose_nothing(location):
    open_store(location).close()  # the schema exists before the race (replicas race on it above)
    with get_context("fork").Pool(3) as pool:
        acknowledged = [sha for part in pool.starmap(_writer, [(location, f"p{p}", 3, 25) for p in range(3)])
                        for sha in part]
    store = open_store(location)
    try:
        stored = [r["image_sha256"] for r in store.diagnoses(limit=10**6)]
        assert len(acknowledged) == 3 * 3 * 25
        assert sorted(stored) == sorted(acknowledged)  # every record once, nothing else
        assert all(r["model"] == "model-" + r["image_sha256"].split("t")[0] for r in store.diagnoses(limit=10**6))
    finally:
        store.close()


def _endless_writer(location: dict, fd: int) -> None:
    store = open_store(location)
    i = 0
    while True:
        sha = f"crash:{i:06d}"
        store.record(**diagnosis(image_sha256=sha, model="model-crash"))
        os.write(fd, f"{sha}\n".encode())  # acknowledged: the record is committed
        i += 1


def test_a_writer_killed_mid_run_loses_nothing_it_acknowledged(location):
    open_store(location).close()
    read_fd, write_fd = os.pipe()
    child = get_context("fork").Process(target=_endless_writer, args=(location, write_fd), daemon=True)
    child.start()
    os.close(write_fd)
    reported, buffer = [], b""
    deadline = time.monotonic() + 60
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while len(reported) < 60 and time.monotonic() < deadline:
            chunk = pipe.read(4096)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            reported += [line.decode() for line in lines]
        os.kill(child.pid, signal.SIGKILL)  # it never stops writing: the kill lands mid-write
        child.join(10)
    assert len(reported) >= 60
    store = open_store(location)  # the restart
    try:
        stored = {r["image_sha256"] for r in store.diagnoses(model="model-crash", limit=10**6)}
        assert set(reported) <= stored
        assert len(stored) - len(reported) <= 1  # at most the one committed before its acknowledgement
        assert store.record(**diagnosis(image_sha256="after-restart")) > 0
    finally:
        store.close()
