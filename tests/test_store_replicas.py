"""Two replicas of the app (``streamlit run app.py`` processes) with
``CTAPP_DATABASE_URL`` write the diagnoses made through either of them into
one PostgreSQL database started here; a real browser makes them. Skipped,
with the reason, without PostgreSQL's server binaries or Chromium."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import hashlib

import pytest
from app_fixtures import TASK, app_env, png_bytes  # noqa: F401
from app_server import CHROMIUM_ARGS, chromium_path, diagnose, replicas
from pg_cluster import PostgresCluster, postgres_missing

from ctapp.store import Store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(postgres_missing() is not None, reason=f"no PostgreSQL: {postgres_missing()}"),
    pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed (apt-get install chromium)"),
]


def test_two_replicas_write_every_diagnosis_into_one_database(app_env, tmp_path):
    from playwright.sync_api import sync_playwright

    uploads = []
    for i in range(2):
        path = tmp_path / f"Doe_Jane-{i}.png"  # a name that must not reach the database
        path.write_bytes(png_bytes(label=i, seed=70 + i))
        uploads.append(path)
    with PostgresCluster() as pg:
        env = {**app_env.env, "CTAPP_DATABASE_URL": pg.url, "CTAPP_AUDIT_LOG": str(tmp_path / "unused.sqlite")}
        with replicas(2, env, tmp_path) as servers, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
            try:
                for (_, url), upload in zip(servers, uploads):
                    page = browser.new_page(viewport={"width": 1400, "height": 1200})
                    page.goto(url, wait_until="networkidle")
                    diagnose(page, upload, TASK)
            finally:
                browser.close()
        store = Store(url=pg.url)
        try:
            rows = store.diagnoses()
        finally:
            store.close()
    assert sorted(r["image_sha256"] for r in rows) == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in uploads)
    assert {r["model"] for r in rows} == {"tiny-a"} and {r["username"] for r in rows} == {""}
    assert not any("Doe_Jane" in str(value) for row in rows for value in row.values())
    assert not (tmp_path / "unused.sqlite").exists()  # the SQLite log is not used beside PostgreSQL
    for i in range(2):
        log = (tmp_path / f"replica-{i}.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
