"""PACS batch (admins): classify every CT series of the PACS's studies in a
date range that the chosen model version has not stored a result for, and
store each verdict back as a DICOM SR, as ``python -m ctapp.pacs`` does; then
the record of what was stored or failed, by opaque ids."""
from __future__ import annotations

from datetime import date, timedelta

import streamlit as st

from ctapp import ui_cache
from ctapp.pacs import Pacs, PacsError, run_batch
from ctapp.report import DISCLAIMER, markdown_text
from pages.worklist import pacs_config

RECORD_COLUMNS = {"time": "Time (UTC)", "username": "User", "model": "Model", "model_version": "Version",
                  "study": "Study", "status": "Status", "slices": "Slices", "verdict": "Verdict",
                  "message": "Message"}


def outcome_rows(outcomes) -> list[dict]:
    return [{"Study": o.study, "Series": o.series, "Slices": o.slices, "Status": o.status,
             "Seconds": round(o.seconds, 1), "Verdict or message": o.message or o.verdict} for o in outcomes]


def record_rows(records: list[dict]) -> list[dict]:
    # The store keeps the series' full UID hash; its first 8 hex digits are the id the viewer shows.
    return [{"Series": f"S-{row['series'][:8]}", **{label: row[key] for key, label in RECORD_COLUMNS.items()}}
            for row in records]


def run(pacs: Pacs, entry, since: date, until: date, capture: bool) -> None:
    model = ui_cache.loaded_model(entry.path)
    bar = st.progress(0.0, text="Searching the PACS for new CT series...")

    def progress(done: int, total: int, outcome) -> None:
        bar.progress(done / total if total else 1.0, text=f"{done} of {total} series" + (
            f" · {outcome.series}: {outcome.status}" if outcome else ""))

    try:
        outcomes = run_batch(pacs, ui_cache.audit_log(), model, since=since, until=until, capture=capture,
                             user=ui_cache.user_identity(), on_progress=progress)
    except PacsError as exc:
        bar.empty()
        st.error(markdown_text(str(exc)), icon=":material/error:")
        return
    failed = sum(o.status == "failed" for o in outcomes)
    if not outcomes:
        st.info("No new CT series: every one in these days was done by this model version.", icon=":material/done_all:")
        return
    (st.warning if failed else st.success)(f"{len(outcomes) - failed} of {len(outcomes)} series done, {failed} failed.")
    st.dataframe(outcome_rows(outcomes), hide_index=True)


def main() -> None:
    st.title("PACS batch")
    st.warning(DISCLAIMER, icon=":material/warning:")
    if not ui_cache.is_admin():
        st.error("Only admins may run the PACS batch.", icon=":material/block:")
        return
    config = pacs_config()
    by_task = ui_cache.models_by_task()
    if config is None or not by_task:
        return
    entry = ui_cache.sidebar_model_choice(by_task, "worklist")
    with st.form("pacs_batch"):
        today = date.today()
        left, right = st.columns(2)
        since = left.date_input("Studies from", today - timedelta(days=1), key="batch_since")
        until = right.date_input("Studies until", today, key="batch_until")
        capture = st.checkbox("Also store the first key slice with its Grad-CAM (secondary capture)", key="batch_cap")
        start = st.form_submit_button("Classify new CT series and store the results", type="primary",
                                      icon=":material/playlist_play:")
    st.caption(f"PACS: {markdown_text(config.host)}. Series this model version has stored already are skipped; "
               "failed ones are tried again. The command line does the same: "
               "`python -m ctapp.pacs --since YYYY-MM-DD --model models/NAME`.")
    if start:
        run(Pacs(config), entry, since, until, capture)
    st.subheader("Results stored in the PACS")
    records = ui_cache.audit_log().pacs_results()
    if records:
        st.dataframe(record_rows(records), hide_index=True)
    else:
        st.caption("None yet.")


if __name__ == "__main__":
    ui_cache.guard_page()
    main()
