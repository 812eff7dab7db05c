"""CT slice classifier: the Streamlit entry point. Declares the pages and runs
the chosen one; each page lives in ``pages/``.

    streamlit run app.py
"""
import streamlit as st

from ctapp import ui_cache
from ctapp.report import markdown_text
from pages.worklist import pacs_configured

st.set_page_config(page_title="CT slice classifier", page_icon=":material/radiology:", layout="wide")


problem = ""  # why a signed-in user cannot go on (shown on the sign-in page)


def sign_in() -> None:
    st.title("CT slice classifier")
    if problem:
        st.error(f"Sign-in cannot be completed: {markdown_text(problem)}", icon=":material/error:")
        if st.button("Sign out", icon=":material/logout:"):
            st.logout()
        return
    st.info("Sign in with your organisation's account to use this app.", icon=":material/login:")
    if st.button("Sign in", type="primary", icon=":material/login:"):
        st.login()


# With an [auth] section in .streamlit/secrets.toml every page needs sign-in
# (docs/deploying.md); without one, the app is a local single-user tool.
if ui_cache.sign_in_enabled():
    try:
        user = ui_cache.current_user()
    except ValueError as exc:  # an unusable [roles] section, or a user the provider gave no identity
        problem, user = str(exc), None
    if user is None:
        # The only page: every URL of the app leads here until the user has signed in.
        st.navigation([st.Page(sign_in, title="Sign in", icon=":material/login:")], position="hidden").run()
        st.stop()
    st.sidebar.caption(f"Signed in as {markdown_text(user.identity)} ({user.role})")
    if st.sidebar.button("Sign out", icon=":material/logout:"):
        st.logout()
else:
    st.sidebar.caption("Sign-in is off: local single-user mode. Diagnoses are recorded without a user name.")

pages = [
    st.Page("pages/diagnosis.py", title="Diagnosis", icon=":material/radiology:", default=True),
    st.Page("pages/viewer.py", title="Series viewer", icon=":material/view_carousel:"),
    st.Page("pages/compare.py", title="Model comparison", icon=":material/compare_arrows:"),
    st.Page("pages/model_card.py", title="Model cards", icon=":material/description:"),
]
if ui_cache.is_admin():
    pages.append(st.Page("pages/audit_log.py", title="Audit log", icon=":material/history:"))
if pacs_configured():  # a [pacs] section in the secrets (docs/deploying.md, "Reading from a PACS")
    pages.append(st.Page("pages/worklist.py", title="PACS worklist", icon=":material/lan:"))
    if ui_cache.is_admin():
        pages.append(st.Page("pages/pacs_admin.py", title="PACS batch", icon=":material/playlist_play:"))
st.navigation(pages).run()
