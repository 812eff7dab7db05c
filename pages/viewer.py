"""Series viewer: a whole CT series, a volume or a batch of loose slices in a
reading view.

Upload loose DICOM files (several series may be mixed, names and extensions
do not matter), a folder, a ``.zip`` of either, a NIfTI volume or PNG/JPEG
slices. Every slice is classified in batches in the background, with a progress
bar: the first slices' answers show within seconds and the page can be used
meanwhile; the Grad-CAM is computed only for the slice on screen. Once every
slice is answered, the series gets a verdict under a stated rule, and one
record in the audit log (below). The viewer scrolls
the slices (slider, previous/next, a click on the probability profile or on a
row of the table), windows them (presets or custom; contrast and brightness
for PNG/JPEG), zooms and pans (the image is a plotly figure), and overlays the
Grad-CAM of the slice shown. Downloads: the series CSV, an HTML report and,
for DICOM series, a DICOM Structured Report.

Series are named by an opaque short id and slices by their number (1 = most
superior); no DICOM header value that could identify a patient is shown.

The audit log gets one record per series and model (per session), not one per
slice: what was answered is the series verdict, and the record holds what an
audit needs to find and re-check it (user, model and version, series id, the
hash of its pixel values, slice count, the verdict's state and class, and the
uncertain slices by state). Its per-slice answers follow from the hash and the
model version; a record per slice would count a 300-slice study as 300
diagnoses beside single slices.
"""
from __future__ import annotations

import logging

import streamlit as st

from ctapp import figures, ui_cache
from ctapp.checkpoint import CheckpointError
from ctapp.imaging import LUNG_WINDOW, Window
from ctapp.inference import CONFIDENT, LOW_CONFIDENCE, NOT_CHEST_CT, OTHER_FINDING, UNLIKE_TRAINING
from ctapp.model_folders import ModelEntry
from ctapp.report import DISCLAIMER, KeySlice, markdown_text, result_cell, safe_stem, series_report, verdict
from ctapp.series import SeriesPredictions, finding_classes, series_csv, slice_rows, summarise
from ctapp.series_background import BackgroundClassification
from ctapp.series_inputs import images_series
from ctapp.volumes import Input, Series
from ctapp.series_figures import (
    WINDOW_PRESETS,
    adjust,
    probability_profile,
    selected_slice,
    slice_figure,
)
from pages.worklist import PACS_HANDOFF, store_in_pacs

log = logging.getLogger(__name__)

HANDOFF = "viewer_handoff"  # uploads handed over by the diagnosis page: [(name, bytes), ...]
AUDIT_LOGGED = "audit_logged"  # what this session recorded (the diagnosis page's set too)
REPORT_KEY_SLICES = 4
POLL_SECONDS = 1.0  # how often the page shows a background classification's new slices
NO_RESULT = "no result"  # a series' state with too few confident slices
NO_FINDING = "no finding"  # the class of a series without a finding, in a task with no negative class


# --------------------------------------------------------------------------- plain functions


def stack_label(series: Series) -> str:
    return f"{series.id} · {series.description()}" if series.kind != "images" else \
        f"Loose slices · {series.description()}"


def table_rows(series: Series, result: SeriesPredictions, thumbnails: list[str]) -> list[dict]:
    """The slice table (the slices classified so far): thumbnail, slice
    number, name, result and confidence; an uncertain slice has no confidence,
    its result says its state and the class it leans to."""
    names = dict(zip(result.class_names, result.display_names))
    rows = []
    for row, prediction, thumb in zip(slice_rows(series, result), result.predictions, thumbnails):
        rows.append({"Slice": row["slice"], "Thumbnail": thumb, "Name": row["name"],
                     "Result": result_cell(prediction, names[prediction.label]),
                     "Confidence": None if prediction.uncertain else row["confidence"]})
    return rows


def audit_record(series: Series, result: SeriesPredictions, model) -> dict:
    """The series' record in the audit log (keywords of ``Store.record``): its
    verdict as state and class (a finding; the negative class, or 'no finding',
    without one; 'no result' leaning to the class most slices lean to), the
    share of its slices confidently answered as each class, and its uncertain
    slices by state."""
    summary = summarise(series.id, result)
    n = len(result.predictions)
    counts = summary.confident_counts
    negatives = [c for c in result.class_names if c not in finding_classes(result.class_names)]
    if summary.label is not None:
        state, label = CONFIDENT, summary.label
    elif summary.has_result:
        state, label = CONFIDENT, max(negatives, key=lambda c: counts[c]) if negatives else NO_FINDING
    else:
        leanings = [p.label for p in result.predictions]
        state, label = NO_RESULT, max(result.class_names, key=leanings.count)
    flags = [f"{state_name}: {k} of {n} slices" for state_name, k in summary.uncertain_by_state.items() if k]
    return dict(model=model.name, model_version=model.version, image_sha256=series.digest, series_id=series.id,
                slices=n, state=state, prediction=label,
                probabilities={c: counts[c] / n for c in result.class_names}, flags=flags)


# --------------------------------------------------------------------------- UI


def uploaded_inputs() -> list[Input]:
    files = st.file_uploader(
        "Upload a series, a volume or slices", type=None, accept_multiple_files=True, key="viewer_files",
        help="DICOM files of one or several series (any names, with or without extension), a .zip of them, a NIfTI "
             "volume (.nii, .nii.gz), multi-frame DICOM, or PNG/JPEG slices. The content decides, not the name.")
    folder = st.file_uploader("...or a whole folder", accept_multiple_files="directory", key="viewer_folder",
                              help="Every file of the folder and its sub-folders.")
    items = [Input(f.name, f.getvalue()) for f in [*(files or []), *(folder or [])]]
    if not items and st.session_state.get(HANDOFF):
        items = [Input(name, data) for name, data in st.session_state[HANDOFF]]
        st.caption(f"{len(items)} files handed over from the Diagnosis page.")
    elif not items and st.session_state.get(PACS_HANDOFF):
        retrieved = st.session_state[PACS_HANDOFF]
        items = [Input(name, data) for name, data in retrieved["files"]]
        st.caption(f"Series {retrieved['series']} retrieved from the PACS ({len(items)} files).")
    return items


def slice_key(series: Series) -> str:
    return f"viewer_slice_{series.id}"


def _step(key: str, delta: int, n: int) -> None:
    st.session_state[key] = min(n, max(1, int(st.session_state.get(key, 1)) + delta))


def _go(key: str, number: int) -> None:
    st.session_state[key] = number


def _jump_from_profile(key: str, chart_key: str, n: int) -> None:
    index = selected_slice(st.session_state.get(chart_key), n)
    if index is not None:
        st.session_state[key] = index + 1


def _jump_from_table(key: str, table_key: str, n: int) -> None:
    event = st.session_state.get(table_key)
    rows = (event or {}).get("selection", {}).get("rows", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "rows", [])
    if rows and 0 <= int(rows[0]) < n:
        st.session_state[key] = int(rows[0]) + 1


def record_series(entry: ModelEntry, model, series: Series, result: SeriesPredictions) -> None:
    """The series' audit record, once per session, model version and series."""
    logged = st.session_state.setdefault(AUDIT_LOGGED, set())
    key = (series.digest, str(entry.path), model.version)
    if key in logged:
        return
    try:
        ui_cache.audit_log().record(user=ui_cache.user_identity(), **audit_record(series, result, model))
    except Exception as exc:
        log.exception("audit log write failed")
        st.warning(f"The audit log could not be written ({type(exc).__name__}); results are shown but not recorded.")
        return
    logged.add(key)


def show_summary(series: Series, result: SeriesPredictions, key: str) -> None:
    summary = summarise(series.id, result)
    names = dict(zip(result.class_names, result.display_names))
    text = f"**{markdown_text(summary.verdict)}**"
    if summary.outcome == "no result":
        st.warning(text, icon=":material/help:")
    elif summary.outcome == "finding":
        st.info(text, icon=":material/radiology:")
    else:  # no finding class reached: neutral, never a reassurance
        st.info(text, icon=":material/remove:")
    by_state = summary.uncertain_by_state
    with st.container(horizontal=True, gap="large"):
        for cls, count in summary.confident_counts.items():
            st.metric(f"{names[cls]} (confident)", count, width="content")
        st.metric("Uncertain (no result)", summary.uncertain, width="content",
                  help=f"low confidence {by_state[LOW_CONFIDENCE]}, unlike the training images "
                       f"{by_state[UNLIKE_TRAINING]}, not a chest CT {by_state[NOT_CHEST_CT]}, another finding "
                       f"{by_state[OTHER_FINDING]}")
    st.caption(f"How the series verdict is reached: {summary.rule}")
    if summary.key_slices:
        st.markdown("Key slices: " + ("the slices that drive the verdict" if summary.label else
                                      "the slices closest to a finding, for reference"))
        buttons = st.columns(len(summary.key_slices))
        for button, index in zip(buttons, summary.key_slices):
            button.button(f"Slice {index + 1}", key=f"viewer_key_{series.id}_{index}", on_click=_go,
                          args=(key, index + 1), width="stretch")


def display_controls(series: Series) -> tuple[Window | None, float, float]:
    """Window (HU series) or contrast and brightness (PNG/JPEG stacks)."""
    if series.is_hu:
        preset = st.radio("Window", [*WINDOW_PRESETS, "Custom"], horizontal=True, key="viewer_window",
                          help="Display only: the model reads every slice with its own training window.")
        if preset in WINDOW_PRESETS:
            return WINDOW_PRESETS[preset], 1.0, 0.0
        left, right = st.columns(2)
        center = left.slider("Level / centre (HU)", -1400, 1500, int(LUNG_WINDOW.center), 10, key="viewer_center")
        width = right.slider("Width (HU)", 50, 4000, int(LUNG_WINDOW.width), 10, key="viewer_width")
        return Window(float(center), float(width)), 1.0, 0.0
    left, right = st.columns(2)
    contrast = left.slider("Contrast", 0.5, 3.0, 1.0, 0.1, key="viewer_contrast")
    brightness = right.slider("Brightness", -0.5, 0.5, 0.0, 0.05, key="viewer_brightness")
    return None, contrast, brightness


def show_viewer(entry: ModelEntry, model, series: Series, result: SeriesPredictions) -> None:
    n = len(series)
    key = slice_key(series)
    st.session_state.setdefault(key, 1)
    left, right = st.columns([1.15, 1], gap="large")
    with left:
        # A row in which each button is as wide as its label (in fixed columns, "Prev" and "Next" were cut to
        # "P" and "N" at 1500 px) and the slider takes the rest.
        with st.container(horizontal=True, wrap=False, vertical_alignment="bottom"):
            st.button("Prev", key=f"viewer_prev_{series.id}", on_click=_step, args=(key, -1, n),
                      icon=":material/arrow_upward:", help="Previous slice (toward the head)", width="content")
            number = st.slider("Slice (1 = most superior)", 1, n, key=key) if n > 1 else 1
            st.button("Next", key=f"viewer_next_{series.id}", on_click=_step, args=(key, 1, n),
                      icon=":material/arrow_downward:", help="Next slice (toward the feet)", width="content")
        index = number - 1
        classified = index < len(result.predictions)
        window, contrast, brightness = display_controls(series)
        controls = st.columns([1, 2], vertical_alignment="center")
        show_cam = controls[0].toggle("Grad-CAM overlay", value=True, key="viewer_cam")
        opacity = controls[1].slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key="viewer_opacity",
                                     disabled=not show_cam)
        image = series.slice(index, model.preprocess.window)
        shown = series.slice(index, window).pixels if window is not None else adjust(image.pixels, contrast,
                                                                                      brightness)
        prediction = result.predictions[index] if classified else None
        cam = None
        # A slice not answered yet gets its map with its answer: the model is busy with the series meanwhile.
        if show_cam and classified and prediction.state == NOT_CHEST_CT:
            st.info("No Grad-CAM map: this slice is not a chest CT for the model.", icon=":material/block:")
        elif show_cam and classified:
            try:
                cam = ui_cache.analyse_series_slice(entry.path, series, index, image).cam
            except Exception:  # the map must not hide the slice or its prediction
                log.exception("Grad-CAM of a series slice failed")
                st.error("The Grad-CAM map could not be computed for this slice.")
        st.plotly_chart(slice_figure(shown, cam, opacity=opacity, revision=series.id), key="viewer_image",
                        config={"scrollZoom": True, "displaylogo": False})
        st.caption(f"{markdown_text(series.slice_name(index))} · scroll to zoom, drag to pan, double-click to reset"
                   + (" · Grad-CAM: warm colours weighed most" if cam is not None else ""))
    with right:
        names = dict(zip(result.class_names, result.display_names))
        if not classified:
            st.markdown(f"**Slice {number} of {n}:** not classified yet ({len(result.predictions)} of {n} are).")
        else:
            st.markdown(f"**Slice {number} of {n}:** {markdown_text(verdict(prediction, names[prediction.label]))}")
            st.plotly_chart(figures.probability_bars(prediction.probabilities, names, predicted=prediction.label,
                                                     threshold=model.confidence_threshold,
                                                     muted=prediction.uncertain),
                            key="viewer_probs", config={"displayModeBar": False})
        chart_key = f"viewer_profile_{series.id}"
        st.plotly_chart(probability_profile(result, current=index if classified else None), key=chart_key,
                        on_select=lambda: _jump_from_profile(key, chart_key, n), selection_mode="points",
                        config={"displayModeBar": False})
        st.caption("Class probabilities along the series; grey crosses mark uncertain slices. Click a point to open "
                   "that slice.")
        notes = [*series.notes, *image.notes]
        if notes:
            st.caption("How the series was read: " + markdown_text("; ".join(dict.fromkeys(notes)) + "."))


def show_table(series: Series, result: SeriesPredictions) -> None:
    key = slice_key(series)
    table_key = f"viewer_table_{series.id}"
    st.subheader("All slices")
    rows = table_rows(series, result, ui_cache.series_thumbnails(series))
    st.dataframe(rows, hide_index=True, key=table_key, on_select=lambda: _jump_from_table(key, table_key, len(series)),
                 selection_mode="single-row", height=min(420, 40 + 35 * len(rows)), column_config={
                     "Thumbnail": st.column_config.ImageColumn("Thumbnail", width="small"),
                     "Name": st.column_config.TextColumn("Name", width="large"),
                     "Confidence": st.column_config.ProgressColumn("Confidence", format="percent", min_value=0.0,
                                                                   max_value=1.0)})
    st.caption("Select a row to open its slice. Confidence is the calibrated probability of the most likely class, "
               "shown only for a confident answer: an uncertain slice says its state and the class it leans to.")


def show_downloads(entry: ModelEntry, model, series: Series, result: SeriesPredictions) -> None:
    stem = safe_stem(series.id)
    cols = st.columns(3)
    cols[0].download_button("Series CSV", lambda: series_csv(series, result), file_name=f"{stem}-slices.csv",
                            mime="text/csv", on_click="ignore", icon=":material/download:", key="viewer_csv")
    cols[1].download_button("Series report (HTML)", lambda: build_report(model, series, result),
                            file_name=f"{stem}-report.html", mime="text/html", on_click="ignore",
                            icon=":material/download:", key="viewer_report", type="primary")
    if series.kind == "DICOM" and series.reference is not None:
        cols[2].download_button("DICOM Structured Report", lambda: build_sr(model, series, result),
                                file_name=f"{stem}-sr.dcm", mime="application/dicom", on_click="ignore",
                                icon=":material/download:", key="viewer_sr")


def build_report(model, series: Series, result: SeriesPredictions) -> str:
    summary = summarise(series.id, result)
    names = dict(zip(result.class_names, result.display_names))
    key_slices = []
    for index in summary.key_slices[:REPORT_KEY_SLICES]:
        image = series.slice(index, model.preprocess.window)
        prediction = result.predictions[index]
        overlay = None
        if prediction.state != NOT_CHEST_CT:
            overlay = figures.cam_overlay(image.pixels, model.analyse(image).cam, 0.4)
        key_slices.append(KeySlice(index + 1, image.pixels, overlay, prediction))
    return series_report(series_id=series.id, description=series.description(), summary=summary,
                         key_slices=key_slices, model_name=model.name, model_version=model.version,
                         display_names=names, notes=series.notes)


def build_sr(model, series: Series, result: SeriesPredictions) -> bytes:
    from ctapp.structured_report import series_sr_bytes

    return series_sr_bytes(series.reference, summarise(series.id, result), model_name=model.name,
                           model_version=model.version, display_names=dict(zip(result.class_names,
                                                                               result.display_names)))


# --------------------------------------------------------------------------- page


def main() -> None:
    st.title("Series viewer")
    st.warning(DISCLAIMER, icon=":material/warning:")
    by_task = ui_cache.models_by_task()
    if not by_task:
        return
    entry = ui_cache.sidebar_model_choice(by_task, "viewer")
    try:
        model = ui_cache.loaded_model(entry.path)
    except (CheckpointError, OSError, ValueError):
        log.exception("loading a model failed")
        st.error("The model could not be loaded; the server log has details.")
        return
    inputs = uploaded_inputs()
    if not inputs:
        st.info("Upload a CT series (DICOM files, a folder or a .zip), a NIfTI volume, or PNG/JPEG slices to read "
                "them slice by slice.", icon=":material/upload_file:")
        return
    with st.spinner("Reading the files..."):
        read = ui_cache.read_series(inputs)
    for error in read.errors:
        st.error(markdown_text(error.message), icon=":material/error:")
    stacks = [*read.series, *([images_series(read.images)] if read.images else [])]
    if not stacks:
        return
    labels = [stack_label(s) for s in stacks]
    chosen = st.selectbox("Series", range(len(stacks)), format_func=lambda i: labels[i], key="viewer_series",
                          disabled=len(stacks) == 1)
    series = stacks[chosen]
    job = ui_cache.series_classification(entry.path, series)
    polling = not job.finished
    # While the series is classified, only this part of the page is redrawn, every POLL_SECONDS.
    st.fragment(show_classification, run_every=POLL_SECONDS if polling else None)(entry, model, series, job,
                                                                                   polling)


def show_classification(entry: ModelEntry, model, series: Series, job: BackgroundClassification,
                        polling: bool) -> None:
    """The slices classified so far with a progress bar; once every one is,
    the verdict, the audit record and the downloads."""
    if job.finished and polling:
        st.rerun()  # drawn once more as a whole, without polling
    if job.failed:
        st.error("The series could not be classified; the server log has details.", icon=":material/error:")
        return
    result = job.snapshot()
    n = len(series)
    if not job.finished:
        done = job.slices_done()
        st.progress(done / n, text=f"Classifying in the background: {done} of {n} slices; the slices answered so "
                                   "far are shown below, the series verdict once all are.")
    if not result.predictions:
        return
    if job.finished:
        record_series(entry, model, series, result)
        show_summary(series, result, slice_key(series))
    st.divider()
    show_viewer(entry, model, series, result)
    st.divider()
    show_table(series, result)
    if job.finished:
        show_downloads(entry, model, series, result)
        store_in_pacs(model, series, result)


if __name__ == "__main__":
    ui_cache.guard_page()
    main()
