"""PACS worklist: CT studies found in the department's PACS (QIDO-RS) by date
range, modality, accession number and study description; a study's series
with slice counts and thickness. Opening a series retrieves it (WADO-RS,
within the upload limits) and shows it in the series viewer with the chosen
model, where "Store result in PACS" files the verdict back into its study.

Listed only when ``.streamlit/secrets.toml`` has a ``[pacs]`` section
(``ctapp.pacs``). Patient names and IDs, birth dates, accession numbers and
descriptions are shown only to signed-in users whose role the section names;
everyone else sees opaque study and series ids.
"""
from __future__ import annotations

from datetime import date, timedelta

import streamlit as st

from ctapp import ui_cache
from ctapp.model_folders import ModelEntry
from ctapp.pacs import Pacs, PacsError, SeriesEntry, StudyEntry
from ctapp.pacs_settings import SECTION, PacsConfig, PacsConfigError, may_see_identifiers
from ctapp.report import DISCLAIMER, markdown_text


PACS_HANDOFF = "pacs_handoff"  # a retrieved series for the viewer: {"files": [(name, bytes)], "series": id, ...}
VIEWER_HANDOFF = "viewer_handoff"  # the diagnosis page's handoff to the viewer, which a PACS series replaces
STUDIES = "pacs_studies"


# --------------------------------------------------------------------------- shared with the viewer and the admin page


def pacs_configured() -> bool:
    """Whether the secrets have a ``[pacs]`` section (an unusable one is shown as an error on the pages)."""
    try:
        return SECTION in st.secrets
    except FileNotFoundError:
        return False


def pacs_config() -> PacsConfig | None:
    """The ``[pacs]`` settings; None (with an error on the page) when they cannot be used."""
    if not pacs_configured():
        return None
    try:
        return PacsConfig.from_mapping(st.secrets[SECTION])
    except PacsConfigError as exc:
        st.error(markdown_text(str(exc)), icon=":material/error:")
        return None


def record(model, handoff: dict, status: str, *, slices: int | None = None, verdict: str = "",
           message: str = "") -> None:
    ui_cache.audit_log().record_pacs_result(user=ui_cache.user_identity(), model=model.name,
                                            model_version=model.version, study=handoff["study"],
                                            series=handoff["record_key"], status=status, slices=slices,
                                            verdict=verdict, message=message)


def store_in_pacs(model, series, result) -> None:
    """The viewer's "Store result in PACS" for a series retrieved from the PACS."""
    from ctapp.series import summarise

    handoff = st.session_state.get(PACS_HANDOFF)
    if not handoff or handoff["series"] != series.id or series.reference is None:
        return
    config = pacs_config()
    if config is None:
        return
    st.subheader("Result to the PACS")
    capture = st.checkbox("Also store the first key slice with its Grad-CAM overlay (secondary capture)",
                          key="pacs_capture")
    if not st.button("Store result in PACS", type="primary", icon=":material/cloud_upload:", key="pacs_store"):
        st.caption(f"Stores the series verdict as a DICOM SR (research use only, {markdown_text(model.name)}) in "
                   "the series' study. Storing again writes nothing new.")
        return
    with st.spinner("Storing the result in the PACS..."):
        try:
            stored = Pacs(config).store_result(model, series, result, capture=capture)
        except PacsError as exc:
            record(model, handoff, "failed", slices=len(series), message=str(exc))
            st.error(markdown_text(str(exc)), icon=":material/error:")
            return
    record(model, handoff, "stored" if stored.instances else "already stored", slices=len(series),
           verdict=summarise(series.id, result).verdict)
    if stored.instances:
        st.success(f"Stored in the PACS: {stored.instances} instance{'s' if stored.instances > 1 else ''} in the "
                   f"study of series {series.id}.", icon=":material/cloud_done:")
    else:
        st.info("This model version's result for this series was already in the PACS; nothing was written again.",
                icon=":material/cloud_done:")


# --------------------------------------------------------------------------- plain functions


def study_rows(studies: list[StudyEntry], identifiers: bool) -> list[dict]:
    rows = []
    for study in studies:
        row = {"Study": study.key, "Date": study.date, "Modalities": ", ".join(study.modalities),
               "Series": study.series_count}
        if identifiers:
            ids = study.identifiers
            row.update({"Patient": ids.patient_name.replace("^", " "), "Patient ID": ids.patient_id,
                        "Born": ids.birth_date, "Accession": ids.accession, "Description": ids.description})
        rows.append(row)
    return rows


def series_rows(series: list[SeriesEntry], identifiers: bool) -> list[dict]:
    rows = []
    for entry in series:
        row = {"Series": entry.key, "Number": entry.number, "Modality": entry.modality, "Slices": entry.slices,
               "Thickness (mm)": entry.thickness}
        if identifiers:
            row["Description"] = entry.description
        rows.append(row)
    return rows


def study_label(study: StudyEntry, identifiers: bool) -> str:
    label = f"{study.date or 'no date'} · {study.key} · {', '.join(study.modalities)}"
    if identifiers:
        label += f" · {study.identifiers.patient_name.replace('^', ' ')} · {study.identifiers.description}"
    return label


def series_label(entry: SeriesEntry, identifiers: bool) -> str:
    slices = "?" if entry.slices is None else entry.slices
    thickness = "" if entry.thickness is None else f", {entry.thickness:g} mm"
    return f"{entry.key} · {entry.modality} · {slices} slices{thickness}" + (
        f" · {entry.description}" if identifiers and entry.description else "")


# --------------------------------------------------------------------------- UI


def search(pacs: Pacs) -> None:
    with st.form("pacs_search"):
        left, middle, right = st.columns(3)
        today = date.today()
        days = left.date_input("Study dates", (today - timedelta(days=7), today), key="pacs_dates")
        modality = middle.text_input("Modality", "CT", max_chars=16, key="pacs_modality")
        accession = right.text_input("Accession number", max_chars=64, key="pacs_accession")
        description = st.text_input("Study description contains", max_chars=64, key="pacs_description")
        if not st.form_submit_button("Search the PACS", icon=":material/search:"):
            return
    since, until = (tuple(days) + (None, None))[:2] if isinstance(days, (tuple, list)) else (days, days)
    with st.spinner("Searching the PACS..."):
        try:
            st.session_state[STUDIES] = pacs.studies(since=since, until=until, modality=modality.strip().upper(),
                                                     accession=accession, description=description)
        except PacsError as exc:
            st.session_state.pop(STUDIES, None)
            st.error(markdown_text(str(exc)), icon=":material/error:")


def open_series(pacs: Pacs, entry: SeriesEntry, model: ModelEntry) -> None:
    bar = st.progress(0.0, text=f"Retrieving series {entry.key}...")
    try:
        files = pacs.retrieve(entry, on_progress=lambda done, total: bar.progress(
            done / total, text=f"Retrieving series {entry.key}: {done} of {total} instances"))
    except PacsError as exc:
        bar.empty()
        st.error(markdown_text(str(exc)), icon=":material/error:")
        return
    st.session_state.pop(VIEWER_HANDOFF, None)
    st.session_state[PACS_HANDOFF] = {"files": [(f.name, f.data) for f in files], "series": entry.key,
                                      "study": entry.study_key, "record_key": entry.record_key}
    st.session_state["viewer_task"] = model.task
    st.session_state[f"viewer_model_{model.task}"] = str(model.path)
    st.switch_page("pages/viewer.py")


def main() -> None:
    st.title("PACS worklist")
    st.warning(DISCLAIMER, icon=":material/warning:")
    config = pacs_config()
    by_task = ui_cache.models_by_task()
    if config is None or not by_task:
        return
    model = ui_cache.sidebar_model_choice(by_task, "worklist")
    identifiers = may_see_identifiers(ui_cache.current_user(), config)
    pacs = Pacs(config)
    search(pacs)
    studies = st.session_state.get(STUDIES)
    if studies is None:
        st.info(f"Search the PACS at {markdown_text(config.host)} for studies.", icon=":material/search:")
        return
    if not studies:
        st.info("No study matches.", icon=":material/search_off:")
        return
    st.dataframe(study_rows(studies, identifiers), hide_index=True)
    if not identifiers:
        st.caption("Patient names and IDs, accession numbers and descriptions are shown only to signed-in users whose "
                   "role allows it; studies and series are named by opaque ids.")
    chosen = st.selectbox("Study", range(len(studies)), format_func=lambda i: study_label(studies[i], identifiers),
                          key="pacs_study")
    try:
        series = pacs.series(studies[chosen])
    except PacsError as exc:
        st.error(markdown_text(str(exc)), icon=":material/error:")
        return
    st.dataframe(series_rows(series, identifiers), hide_index=True)
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        st.info("This study has no CT series.", icon=":material/info:")
        return
    pick = st.selectbox("CT series", range(len(ct)), format_func=lambda i: series_label(ct[i], identifiers),
                        key="pacs_series")
    if st.button("Open in the series viewer", type="primary", icon=":material/view_carousel:", key="pacs_open"):
        open_series(pacs, ct[pick], model)


if __name__ == "__main__":
    ui_cache.guard_page()
    main()
