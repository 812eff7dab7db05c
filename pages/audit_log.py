"""Audit log (admins only): who diagnosed what with which model, and when.

Filters by day (UTC), user, model and result (answer state and class: an
uncertain answer is shown by its state and the class it leans to, never as a
result); shows diagnoses per day, the matching records (a series is one record
with its id and number of slices), and the folder evaluations run on this
server; exports the matching records as CSV (cells a spreadsheet would run as
formulas are neutralised). Records hold file hashes, never file names or pixels.
"""
from __future__ import annotations

import logging
from datetime import date, datetime, timedelta, timezone

import streamlit as st

from ctapp import ui_cache
from ctapp.store import CONFIDENT_STATE, audit_csv

log = logging.getLogger(__name__)

ALL = "(all)"
SHOWN_ROWS = 1_000  # rows in the table; the CSV holds up to EXPORT_ROWS
EXPORT_ROWS = 100_000
DEFAULT_DAYS = 30


def filter_value(choice: str) -> str | None:
    return None if choice == ALL else choice


def result_text(state: str, prediction: str) -> str:
    """A record's result: the class when the answer was confident, else its
    state and the class it leans to (records older than states have none)."""
    if state in (CONFIDENT_STATE, ""):
        return prediction
    return f"{state} (leans {prediction})"


def main() -> None:
    # The page is only declared for admins, but a fresh server can run a pages/ file directly
    # before app.py has declared its navigation: nothing of the page is drawn for anyone else.
    if not ui_cache.is_admin():
        st.error("The audit log is open to admins only.", icon=":material/lock:")
        return
    st.title("Audit log")
    try:
        store = ui_cache.audit_log()
        choices = store.choices()
    except Exception as exc:
        log.exception("reading the audit log failed")
        st.error(f"The audit log could not be read ({type(exc).__name__}); the server log has details.")
        return

    today = datetime.now(timezone.utc).date()
    cols = st.columns(4)
    days = cols[0].date_input("Days (UTC)", value=(today - timedelta(days=DEFAULT_DAYS - 1), today), key="audit_days",
                              max_value=today)
    user = cols[1].selectbox("User", [ALL, *choices["user"]], key="audit_user",
                             format_func=lambda u: "(sign-in off)" if u == "" else u)
    model = cols[2].selectbox("Model", [ALL, *choices["model"]], key="audit_model")
    result = cols[3].selectbox("Result", [ALL, *choices["result"]], key="audit_result",
                               format_func=lambda r: r if r == ALL else result_text(*r),
                               help="Answer state and class: an uncertain answer is listed by its state and the "
                                    "class it leans to.")
    since, until = (days[0], days[-1]) if isinstance(days, (tuple, list)) and days else (None, None)
    if isinstance(days, date):
        since = until = days
    state, prediction = (None, None) if result == ALL else result
    filters = dict(since=since, until=until, user=filter_value(user), model=filter_value(model),
                   prediction=prediction, state=state)

    try:
        rows = store.diagnoses(**filters, limit=EXPORT_ROWS)
        per_day = store.counts_per_day(**filters)
        reports = store.reports()
    except Exception as exc:
        log.exception("reading the audit log failed")
        st.error(f"The audit log could not be read ({type(exc).__name__}); the server log has details.")
        return

    st.metric("Diagnoses matching", f"{sum(n for _, n in per_day):,}")
    if per_day:
        st.bar_chart({"day": [d for d, _ in per_day], "diagnoses": [n for _, n in per_day]}, x="day", y="diagnoses",
                     height=220)
    if not rows:
        st.info("No diagnosis matches these filters.", icon=":material/info:")
    else:
        st.download_button("Export as CSV", lambda: audit_csv(rows), file_name=f"audit-log-{today.isoformat()}.csv",
                           mime="text/csv", on_click="ignore", icon=":material/download:", key="audit_csv")
        if len(rows) > SHOWN_ROWS:
            st.caption(f"The newest {SHOWN_ROWS:,} of {len(rows):,} records are shown; the CSV holds all of them.")
        st.dataframe([{"time": r["time"], "user": r["username"], "model": r["model"], "version": r["model_version"],
                       "result": result_text(r["state"], r["prediction"]), "confidence": round(r["confidence"], 3),
                       "series": r["series_id"], "slices": r["slices"], "flags": r["flags"],
                       "file SHA-256": r["image_sha256"]} for r in rows[:SHOWN_ROWS]],
                     hide_index=True, width="stretch", key="audit_table")
        st.caption("A series is one record: its id, its number of slices and the hash of its pixels; its result is "
                   "the series verdict, its confidence the share of its slices confidently answered as that class.")

    st.subheader("Folder evaluations")
    if reports:
        st.dataframe([{"time": r["time"], "user": r["username"], "model": r["model"], "evaluated on": r["evaluated_on"],
                       "images": r["images"], "accuracy": r["accuracy"], "macro-F1": r["macro_f1"],
                       "report": r["report"]} for r in reports], hide_index=True, width="stretch", key="audit_reports")
    else:
        st.caption("No folder has been evaluated on this server yet.")


if __name__ == "__main__":
    ui_cache.guard_page()
    main()
