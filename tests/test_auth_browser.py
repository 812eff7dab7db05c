"""Sign-in end to end in a real browser: the app (``streamlit run app.py`` with
an ``[auth]`` secrets file) signs users in through a local mock OpenID Connect
provider (the ``oidc-provider-mock`` package). On a freshly started server,
every page's URL opened first and signed out shows the sign-in page only. A
clinician diagnoses a slice and is named in its audit record, and cannot reach
the Audit log page, not even by its URL; an admin sees the page and the
clinician's record there. Skipped, with the reason, without Chromium or the
mock provider."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import hashlib

import pytest
from app_fixtures import REPO, TASK, app_env, png_bytes  # noqa: F401
from app_server import chromium, chromium_path, diagnose, secrets_toml, sign_in, start_replica, stop, wait_healthy
from pg_cluster import free_port

from ctapp.store import Store

oidc_provider_mock = pytest.importorskip("oidc_provider_mock", reason="oidc-provider-mock is not installed "
                                         "(pip install -r requirements-dev.txt)")
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed (apt-get install chromium)")]

CLINICIAN, ADMIN = "dr.b@example.org", "head.radiologist@example.org"
WAIT_MS = 120_000


def new_page(browser, height: int):
    context = browser.new_context(viewport={"width": 1400, "height": height})
    context.set_default_timeout(WAIT_MS)  # a first render on a loaded CI machine can take longer than 30 s
    return context.new_page()


def test_sign_in_names_the_user_in_the_audit_log_and_roles_gate_the_audit_page(app_env, tmp_path):
    port = free_port()
    audit = tmp_path / "audit.sqlite"
    upload = tmp_path / "Doe_Jane.png"
    upload.write_bytes(png_bytes(label=0, seed=90))
    # The provider vouches for the admin's address (email_verified); the mock sends no such claim
    # unless told to, and an unverified address makes no admin.
    verified_admin = oidc_provider_mock.User(sub=ADMIN, claims={"email": ADMIN, "email_verified": True})
    with oidc_provider_mock.run_server_in_thread(user_claims=[verified_admin]) as provider:
        secrets_file = secrets_toml(tmp_path, port, provider.server_port, ADMIN)
        process, url = start_replica({**app_env.env, "CTAPP_AUDIT_LOG": str(audit)}, tmp_path / "server.log", port=port,
                                     args=["--secrets.files", str(secrets_file)])
        try:
            wait_healthy(url, process)
            with chromium() as browser:
                clinician = new_page(browser, 1200)
                clinician.goto(url + "/audit_log", wait_until="networkidle")  # signed out: no page but sign-in
                clinician.wait_for_timeout(3000)
                assert clinician.get_by_role("heading", name="Audit log").count() == 0

                sign_in(clinician, url, CLINICIAN)
                assert clinician.get_by_text(f"Signed in as {CLINICIAN} (clinician)").count() == 1
                assert clinician.get_by_role("link", name="Audit log").count() == 0
                diagnose(clinician, upload, TASK)
                clinician.goto(url + "/audit_log", wait_until="networkidle")
                clinician.wait_for_timeout(3000)
                assert clinician.get_by_role("heading", name="Audit log").count() == 0

                admin = new_page(browser, 1400)
                sign_in(admin, url, ADMIN)
                assert admin.get_by_text(f"Signed in as {ADMIN} (admin)").count() == 1
                admin.get_by_role("link", name="Audit log").click()
                admin.get_by_role("heading", name="Audit log").wait_for(timeout=WAIT_MS)
                admin.get_by_text("Export as CSV").wait_for(timeout=WAIT_MS)
                assert admin.locator("[data-testid='stMetricValue']").first.inner_text() == "1"
                admin.wait_for_timeout(1500)
                (REPO / "test-artifacts").mkdir(exist_ok=True)
                admin.screenshot(path=str(REPO / "test-artifacts" / "audit-log.png"), full_page=True)

                clinician.goto(url, wait_until="networkidle")
                clinician.get_by_role("button", name="Sign out").click()
                clinician.wait_for_timeout(3000)
                clinician.goto(url, wait_until="networkidle")
                clinician.get_by_role("button", name="Sign in").wait_for(timeout=WAIT_MS)
        finally:
            stop(process)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    store = Store(audit)
    try:
        (row,) = store.diagnoses()
    finally:
        store.close()
    assert row["username"] == CLINICIAN
    assert row["image_sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()
    assert not any("Doe_Jane" in str(value) for value in row.values())


def test_a_fresh_server_shows_every_page_url_only_the_sign_in_page(app_env, tmp_path):
    """Before anyone has opened ``/``, Streamlit ran a page straight from ``pages/`` (its legacy
    multipage mode) without app.py's sign-in: every page's URL, opened first on a fresh server,
    must show the sign-in page and nothing of the page (issue 24, item 1)."""
    port = free_port()
    paths = sorted(f"/{page.stem}" for page in (REPO / "pages").glob("*.py")) + ["/"]
    with oidc_provider_mock.run_server_in_thread() as provider:
        secrets_file = secrets_toml(tmp_path, port, provider.server_port, ADMIN)
        process, url = start_replica({**app_env.env, "CTAPP_AUDIT_LOG": str(tmp_path / "audit.sqlite")},
                                     tmp_path / "server.log", port=port, args=["--secrets.files", str(secrets_file)])
        try:
            wait_healthy(url, process)  # /_stcore/health runs no script: the first page below is the first run
            with chromium() as browser:
                for path in paths:
                    page = new_page(browser, 1200)  # a new browser context: no cookie, no session
                    media = []
                    page.on("request", lambda request: media.append(request.url)
                            if request.url.startswith(url + "/media/") else None)  # slices, overlays
                    page.goto(url + path, wait_until="networkidle")
                    page.get_by_role("button", name="Sign in").wait_for(timeout=WAIT_MS)
                    page.wait_for_timeout(2000)  # anything a page would render after the button
                    # Streamlit's "Page not found" notice for a URL the signed-out navigation lacks.
                    headings = {h.strip() for h in page.locator("h1, h2, h3").all_inner_texts()}
                    assert headings - {"Page not found"} == {"CT slice classifier"}, (path, headings)
                    for shown in ("stFileUploader", "stSidebarNav", "stImage", "stDataFrame", "stMetric"):
                        assert page.locator(f"[data-testid='{shown}']").count() == 0, (path, shown)
                    for words in ("Prediction:", "Uncertain:", "Model card", "Signed in as"):
                        assert page.get_by_text(words, exact=False).count() == 0, (path, words)
                    assert media == [], (path, media)
                    page.context.close()
        finally:
            stop(process)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
