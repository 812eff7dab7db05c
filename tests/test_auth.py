"""Roles from the [roles] config, and sign-in in the app (AppTest with
``at.secrets`` and ``at.user``): the sign-in page gates every page; a
clinician diagnoses under their name but neither evaluates folders nor sees
the audit log; an admin does both; without [auth] the app says sign-in is off."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import csv
import hashlib
import io
import re

import pytest
from app_fixtures import APP, PATIENT_NAME, REPO, TASK, app_env, app_settings, dicom_bytes, png_bytes  # noqa: F401
from streamlit.testing.v1 import AppTest

from ctapp.auth import ADMIN, CLINICIAN, RoleConfig, RoleConfigError, identity, role, user_from_claims
from ctapp.store import Store

TIMEOUT = 120
AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32, "client_id": "ctapp",
        "client_secret": "s", "server_metadata_url": "http://localhost:9400/.well-known/openid-configuration"}
ROLES = {"admin_emails": ["Admin@Example.org"], "admin_claim": "groups", "admin_claim_values": ["ct-admins"]}
CONFIG = RoleConfig.from_mapping(ROLES)


# ------------------------------------------------------------------------------------- roles


@pytest.mark.parametrize("claims, expected", [
    ({"email": "ADMIN@example.org ", "email_verified": True}, ADMIN),
    ({"email": "admin@example.org", "email_verified": "true"}, ADMIN),  # some providers send a string
    # An address the provider has not verified could be anyone's: claiming it makes no admin.
    ({"email": "admin@example.org"}, CLINICIAN),
    ({"email": "admin@example.org", "email_verified": False}, CLINICIAN),
    ({"email": "admin@example.org", "email_verified": "false"}, CLINICIAN),
    ({"email": "admin@example.org", "email_verified": 1}, CLINICIAN),
    ({"email": "dr.b@example.org", "groups": ["radiology", "ct-admins"]}, ADMIN),
    ({"email": "dr.b@example.org", "groups": "ct-admins"}, ADMIN),
    ({"email": "dr.b@example.org", "groups": ["radiology"]}, CLINICIAN),
    ({"email": "dr.b@example.org", "groups": {"nested": "ct-admins"}}, CLINICIAN),
    ({"sub": "12345"}, CLINICIAN),
])
def test_roles_from_claims(claims, expected):
    assert role(claims, CONFIG) == expected


@pytest.mark.parametrize("verified_claim, expected", [(None, ADMIN), (True, ADMIN), (False, CLINICIAN),
                                                     ("false", CLINICIAN)])
def test_a_provider_that_sends_no_verified_claim_is_trusted_only_when_the_config_says_so(verified_claim, expected):
    config = RoleConfig.from_mapping({**ROLES, "emails_verified_by_provider": True})
    claims = {"email": "admin@example.org"} if verified_claim is None else \
        {"email": "admin@example.org", "email_verified": verified_claim}
    assert role(claims, config) == expected  # an explicit "not verified" still counts


def test_without_roles_config_everyone_is_a_clinician():
    assert role({"email": "admin@example.org", "groups": ["ct-admins"]}, RoleConfig.from_mapping(None)) == CLINICIAN


def test_identity_is_the_email_else_the_subject():
    assert identity({"email": "dr.a@example.org", "sub": "abc"}) == "dr.a@example.org"
    assert identity({"email": "", "sub": "abc"}) == "abc"
    assert user_from_claims({"sub": "abc"}, CONFIG).identity == "abc"
    with pytest.raises(ValueError) as caught:
        identity({"name": "Dr A"})
    assert str(caught.value) == "the identity provider gave neither an e-mail address nor a subject for this user"


@pytest.mark.parametrize("section, message", [
    ({"admins": ["a@x.org"]}, "unknown setting(s) admins; use admin_claim, admin_claim_values, admin_emails, "
                               "emails_verified_by_provider"),
    ({"admin_emails": "a@x.org", "admin_claim": 3}, 'admin_claim must be the name of one claim, e.g. "groups"'),
    ({"admin_emails": ["a@x.org", ""]}, "admin_emails must be a list of non-empty strings"),
    ({"admin_claim": "groups"}, "admin_claim and admin_claim_values go together"),
    ({"admin_claim": "groups", "admin_claim_values": [7]}, "admin_claim_values must be a list of non-empty strings"),
    ({"emails_verified_by_provider": "yes"}, "emails_verified_by_provider must be true or false"),
])
def test_unusable_role_config_says_what_to_fix(section, message):
    with pytest.raises(RoleConfigError) as caught:
        RoleConfig.from_mapping(section)
    assert str(caught.value) == f"[roles]: {message}"


# ------------------------------------------------------------------------------- in the app


def app(user: dict | None, secrets: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if secrets is not False:
        at.secrets.update(secrets or {"auth": AUTH, "roles": ROLES})
    if user is not None:
        at.user = user
    return at


def run(target) -> AppTest:
    """Run the app (``target``) or run it after a widget change (``target`` is the widget)."""
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    return "\n".join(re.sub(r"\\(.)", r"\1", str(e.value)) for kind in ("title", "caption", "info", "error", "markdown", "subheader")
                     for e in getattr(at, kind))


def audit_rows(path) -> list[dict]:
    store = Store(path)
    try:
        return store.diagnoses()
    finally:
        store.close()


def test_signed_out_users_see_only_the_sign_in_page(app_settings):
    at = run(app({"is_logged_in": False}))
    assert [b.label for b in at.button] == ["Sign in"]
    assert "CT slice diagnosis" not in texts(at)
    with pytest.raises(ValueError, match="navigation page"):  # the page is not declared for them
        at.switch_page("pages/audit_log.py")


def test_a_clinician_diagnoses_under_their_name_but_cannot_evaluate_or_read_the_log(app_settings):
    at = run(app({"is_logged_in": True, "email": "dr.b@example.org", "groups": ["radiology"]}))
    assert "Signed in as dr.b@example.org (clinician)" in texts(at)
    assert "Sign out" in [b.label for b in at.sidebar.button]
    with pytest.raises(ValueError, match="navigation page"):  # not among a clinician's pages
        at.switch_page("pages/audit_log.py")
    if at.selectbox(key="task").value != TASK:
        run(at.selectbox(key="task").set_value(TASK))
    data = png_bytes(label=1, seed=41)
    run(at.file_uploader(key="uploads").set_value(("Doe_Jane-slice.png", data, "image/png")))
    (row,) = [r for r in audit_rows(app_settings.audit_log) if r["image_sha256"] == hashlib.sha256(data).hexdigest()]
    assert row["username"] == "dr.b@example.org" and row["model"] == "tiny-a"
    assert "Doe_Jane" not in "".join(map(str, row.values()))

    run(at.switch_page("pages/compare.py"))
    assert "Evaluating models on server folders is open to admins." in texts(at)
    assert not [w for w in at.text_input if w.key == "eval_folder"]


def test_an_admin_reads_filters_and_exports_the_audit_log(app_settings):
    store = Store(app_settings.audit_log)
    try:
        store.record(model="tiny-a", model_version="v1", image_sha256="ab" * 32, prediction="alpha",
                     probabilities={"alpha": 0.8, "beta": 0.2}, user="dr.c@example.org")
        store.record(model="tiny-b", model_version="v1", image_sha256="cd" * 32, prediction="=beta",
                     probabilities={"alpha": 0.3, "beta": 0.7}, user="dr.d@example.org")
    finally:
        store.close()
    at = run(app({"is_logged_in": True, "email": "dr.e@example.org", "groups": ["ct-admins"]}))
    assert "(admin)" in texts(at)
    at = run(at.switch_page("pages/audit_log.py"))
    assert [t.value for t in at.title] == ["Audit log"]
    run(at.selectbox(key="audit_user").set_value("dr.d@example.org"))
    shown = at.dataframe[0].value  # the records; the folder evaluations' table is not shown (none yet)
    assert len(at.dataframe) == 1
    assert list(shown["user"]) == ["dr.d@example.org"] and list(shown["result"]) == ["=beta"]
    assert at.metric[0].value == "1"
    button = at.get("download_button")[0]
    assert button.proto.label == "Export as CSV"
    exported = audit_csv_of(app_settings, user="dr.d@example.org")
    assert exported[0]["prediction"] == "'=beta"  # a formula in a spreadsheet otherwise


def audit_csv_of(app_settings, **filters) -> list[dict]:
    from ctapp.store import audit_csv

    store = Store(app_settings.audit_log)
    try:
        return list(csv.DictReader(io.StringIO(audit_csv(store.diagnoses(**filters)))))
    finally:
        store.close()


def test_an_unusable_roles_section_is_explained_after_sign_in(app_settings):
    at = run(app({"is_logged_in": True, "email": "dr.b@example.org"}, {"auth": AUTH, "roles": {"admins": ["x"]}}))
    assert "Sign-in cannot be completed: [roles]: unknown setting(s) admins" in texts(at)
    assert [b.label for b in at.button] == ["Sign out"]


def test_without_auth_the_app_says_sign_in_is_off_and_the_user_has_every_page(app_settings):
    at = run(app(None, secrets=False))
    assert "Sign-in is off: local single-user mode" in texts(at)
    assert "CT slice diagnosis" in texts(at)
    run(at.switch_page("pages/audit_log.py"))
    assert [t.value for t in at.title] == ["Audit log"]
    # DICOM header values never reach the log, whoever is signed in.
    run(at.switch_page("pages/diagnosis.py"))
    if at.selectbox(key="task").value != TASK:
        run(at.selectbox(key="task").set_value(TASK))
    run(at.file_uploader(key="uploads").set_value(("IM0001", dicom_bytes(seed=5), "application/dicom")))
    assert all(PATIENT_NAME.split("^")[0] not in str(v) for r in audit_rows(app_settings.audit_log) for v in r.values())


def test_the_secrets_example_configures_sign_in_and_roles():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    example = tomllib.loads((REPO / ".streamlit" / "secrets.toml.example").read_text())
    assert {"redirect_uri", "cookie_secret", "client_id", "client_secret", "server_metadata_url"} <= set(example["auth"])
    config = RoleConfig.from_mapping(example["roles"])
    assert role({"email": "head.radiologist@example.org", "email_verified": True}, config) == ADMIN
    assert role({"email": "head.radiologist@example.org"}, config) == CLINICIAN  # no verified claim
    assert role({"email": "someone@example.org", "groups": ["ct-admins"]}, config) == ADMIN
    assert ".streamlit/secrets.toml" in (REPO / ".gitignore").read_text().splitlines()  # real secrets stay out of git


@pytest.mark.parametrize("page", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "pages").glob("*.py")))
def test_a_page_run_without_app_py_shows_nothing_to_a_signed_out_user(app_settings, page):
    """Defence in depth: each page refuses to render when sign-in is on and nobody has signed in,
    even when it runs without app.py's sign-in (as Streamlit's legacy pages/ mode once ran it)."""
    at = AppTest.from_file(str(REPO / page), default_timeout=TIMEOUT)
    at.secrets.update({"auth": AUTH, "roles": ROLES})
    at.user = {"is_logged_in": False}
    at = run(at)
    shown = [kind for kind in ("title", "subheader", "markdown", "file_uploader", "dataframe", "metric", "button",
                               "selectbox") if len(getattr(at, kind, []))]
    assert shown == [], shown
    at.user = {"is_logged_in": True, "email": "dr.e@example.org", "groups": ["ct-admins"]}
    assert len(run(at).title) + len(at.subheader) > 0  # signed in (an admin), the same page renders


def test_with_sign_in_a_page_run_straight_from_pages_runs_again_through_app_py(app_settings):
    """AppTest, like a fresh server, runs a switched-to page straight from pages/ (Streamlit's
    legacy mode): the page's guard sends the run through app.py, which names the user."""
    at = run(app({"is_logged_in": True, "email": "dr.b@example.org"}))
    at = run(at.switch_page("pages/diagnosis.py"))
    assert "Signed in as dr.b@example.org (clinician)" in texts(at)  # app.py's sidebar line
    assert "CT slice diagnosis" in texts(at)
