"""The PACS worklist in a real browser (headless Chromium, as ``test_browser``)
against a real Orthanc (``orthanc_server``): search the worklist, open a CT
series in the series viewer, "Store result in PACS", and find the SR in the
study. Screenshots go to a temporary folder (``$CTAPP_SCREENSHOTS`` or
``/tmp/ctapp-pacs-browser``). Skipped without Chromium or Orthanc."""
# ruff: noqa: F811  (fixtures imported from app_fixtures and test_browser are "redefined" as arguments)
from __future__ import annotations

import os
import tempfile
from datetime import date
from pathlib import Path

import pytest
from app_fixtures import PATIENT_NAME, TASK, app_env  # noqa: F401
from app_server import start_replica, stop, wait_healthy
from orthanc_server import OrthancServer, generated_series, orthanc_missing
from synthetic import PATIENT_ID
from test_browser import CHROMIUM_ARGS, WAIT_MS, assert_clean, chromium_path, explained_failure, select_option
from test_browser import pw  # noqa: F401
from test_browser import pytestmark as browser_marks

pytestmark = [*browser_marks, pytest.mark.skipif(orthanc_missing() is not None, reason=str(orthanc_missing()))]

SHOTS = Path(os.environ.get("CTAPP_SCREENSHOTS") or Path(tempfile.gettempdir()) / "ctapp-pacs-browser")
SLICES = 8


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def secrets_file(folder: Path, settings: dict) -> Path:
    path = folder / "secrets.toml"
    path.write_text("[pacs]\n" + "".join(f'{key} = "{value}"\n' for key, value in settings.items()))
    return path


def test_worklist_series_viewer_and_store_in_pacs(app_env, pw, tmp_path):
    from ctapp.store import Store

    with OrthancServer() as orthanc:
        files = generated_series(SLICES, size=64, study_date=date.today().strftime("%Y%m%d"), seed=11)
        orthanc.upload(files)
        secrets = secrets_file(tmp_path, orthanc.pacs_settings())
        process, url = start_replica(app_env.env, tmp_path / "app.log", args=["--secrets.files", str(secrets)])
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1600})
        try:
            wait_healthy(url, process)
            with explained_failure(page, "pacs"):
                page.goto(url, wait_until="networkidle")
                page.get_by_role("link", name="PACS worklist").click()
                page.get_by_role("heading", name="PACS worklist").wait_for(timeout=WAIT_MS)
                select_option(page, "Task", TASK)
                page.get_by_role("button", name="Search the PACS").click()
                page.get_by_text("Open in the series viewer").wait_for(timeout=WAIT_MS)
                page.wait_for_timeout(1000)
                assert_clean(page)
                picker = page.locator("[data-testid='stSelectbox']").filter(has=page.get_by_text("CT series")).first
                shown = picker.inner_text() + picker.locator("input").first.input_value()
                assert f"CT · {SLICES} slices, 2.5 mm" in shown, shown
                shot(page, "1-worklist.png")

                page.get_by_role("button", name="Open in the series viewer").click()
                page.get_by_role("heading", name="Series viewer").wait_for(timeout=WAIT_MS)
                page.get_by_text("retrieved from the PACS", exact=False).wait_for(timeout=WAIT_MS)
                page.get_by_text("How the series verdict is reached", exact=False).wait_for(timeout=WAIT_MS)
                store = page.get_by_role("button", name="Store result in PACS")
                store.wait_for(timeout=WAIT_MS)
                page.wait_for_timeout(1500)
                shot(page, "2-viewer.png")

                store.click()
                page.get_by_text("Stored in the PACS", exact=False).wait_for(timeout=WAIT_MS)
                page.wait_for_timeout(500)
                shot(page, "3-stored.png")
                page.get_by_role("button", name="Store result in PACS").click()
                page.get_by_text("already in the PACS", exact=False).wait_for(timeout=WAIT_MS)
                shot(page, "4-stored-again.png")
                text = page.locator("body").inner_text()
                assert PATIENT_NAME not in text and PATIENT_ID not in text and "Doe" not in text
        finally:
            browser.close()
            stop(process)
        server_log = (tmp_path / "app.log").read_text(errors="replace")
        assert "Traceback" not in server_log, server_log[-4000:]
        assert PATIENT_NAME not in server_log and PATIENT_ID not in server_log

        (study,) = orthanc.rest("GET", "/studies")
        modalities = sorted(orthanc.rest("GET", f"/series/{s}")["MainDicomTags"]["Modality"]
                            for s in orthanc.rest("GET", f"/studies/{study}")["Series"])
        assert modalities == ["CT", "SR"]  # stored once, into the same study
    store = Store(app_env.audit_log)
    records = store.pacs_results()
    store.close()
    assert [r["status"] for r in records][:1] == ["already stored"] and len(records) >= 1
    assert not [r for r in records if PATIENT_NAME in repr(r) or PATIENT_ID in repr(r)]
