"""Diagnosis (landing page): classify uploaded CT slices and explain each result.

Upload up to MAX_FILES slices at a time (PNG, JPEG, TIFF, BMP or DICOM, with
or without a file extension: the format is read from the content). Each slice
gets the predicted class in plain words with its calibrated probabilities, or
an explicit "uncertain" state with the reasons; a class-activation map beside
the slice; and a one-page HTML report, built when its button is pressed.
Every diagnosis goes to the audit log (file hash, model, result; never names
or pixels). DICOM header fields are never shown; file names and decoding notes
are shown as text (``markdown_text``), never as Markdown.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from ctapp import figures, ui_cache
from ctapp.checkpoint import CheckpointError
from ctapp.imaging import LUNG_WINDOW, ImageDecodeError, Slice, Window
from ctapp.inference import (
    NOT_CHEST_CT,
    NOT_CT_REASON,
    OTHER_FINDING,
    UNLIKE_TRAINING,
    UNLIKE_TRAINING_REASON,
    Analysis,
    LoadedModel,
    Prediction,
    cam_methods,
)
from ctapp.model_folders import ModelEntry
from ctapp.report import DISCLAIMER, ModelResult, csv_text, markdown_text, result_cell, safe_stem, slice_report
from ctapp.series_figures import WINDOW_PRESETS
from ctapp.series_inputs import holds_series

log = logging.getLogger(__name__)

PREDICTED = ""  # "class to explain": the predicted class
BATCH_PROGRESS_FROM = 3  # show a progress bar from this many files on
MAX_FILES = 20  # files analysed per upload
VIEWER_HANDOFF = "viewer_handoff"  # uploads handed to the series viewer (pages/viewer.py reads this key)
DETAIL_SLICE = "detail_slice"  # the batch's slice shown in detail (its unique name)


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes = field(repr=False)
    sha256: str


@dataclass
class SliceResult:
    upload: Upload
    predictions: list[Prediction] = field(default_factory=list)  # one per chosen model
    error: str = ""


@dataclass
class Explanation:
    model: LoadedModel
    analysis: Analysis
    cam_class: str  # readable name of the explained class


# --------------------------------------------------------------------------- plain functions


def read_uploads(files) -> list[Upload]:
    """Uploaded files (anything with ``.name`` and ``.getvalue()``) with their SHA-256."""
    uploads = []
    for f in (files or [])[:MAX_FILES]:
        data = f.getvalue()
        uploads.append(Upload(f.name, data, hashlib.sha256(data).hexdigest()))
    return uploads


def model_summary(entry: ModelEntry) -> str:
    """Architecture and headline macro-F1 of a model, from its card: out-of-fold
    with its spread and image count for a cross-validated model."""
    card = entry.card
    parts = []
    if card.get("architecture_title") or card.get("architecture"):
        parts.append(card.get("architecture_title") or card["architecture"])
    validation = card.get("validation") or {}
    f1 = validation.get("macro_f1")
    std = ((validation.get("fold_spread") or {}).get("macro_f1") or {}).get("std")
    if f1 is not None and std is not None:
        parts.append(f"out-of-fold macro-F1 {f1:.2f} ± {std:.2f} ({validation.get('images', '?')} images)")
    elif f1 is not None:
        parts.append(f"validation macro-F1 {f1:.2f} ({validation.get('images', '?')} images)")
    return " · ".join(parts)


def clean_error(message: str) -> str:
    """An ImageDecodeError message without the 'upload: ' prefix decode gives bytes."""
    return re.sub(r"^upload: ", "", message)


def flags(prediction: Prediction) -> list[str]:
    """Short flags for the table, the CSV and the audit log."""
    out = []
    if prediction.state in (NOT_CHEST_CT, UNLIKE_TRAINING, OTHER_FINDING):
        out.append(prediction.state)
    if any(reason.startswith("low confidence") for reason in prediction.reasons):
        out.append("low confidence")
    return out


def predicted(entry: ModelEntry, upload: Upload) -> Prediction:
    """The cached prediction of ``upload`` by the model of ``entry``."""
    return ui_cache.predict(entry.path, upload.sha256, upload.data)


def classify(uploads: list[Upload], models: list[ModelEntry], on_progress=None,
             answer: Callable[[ModelEntry, Upload], Prediction] = predicted) -> list[SliceResult]:
    """Every upload through every chosen model (``answer`` gives one
    prediction); an unreadable file gets its error message and the others are
    still classified."""
    results = []
    for i, upload in enumerate(uploads):
        result = SliceResult(upload)
        try:
            result.predictions = [answer(m, upload) for m in models]
        except ImageDecodeError as exc:
            result.error = clean_error(str(exc))
        except Exception as exc:  # never a traceback in front of a user
            log.exception("classifying %s failed", upload.sha256)
            result.error = f"the file could not be analysed ({type(exc).__name__}); the server log has details"
        results.append(result)
        if on_progress:
            on_progress(i + 1, len(uploads))
    return results


def record_diagnoses(results: list[SliceResult], models: list[ModelEntry], loaded: list[LoadedModel],
                     logged: set) -> int:
    """Append each new (image, model) diagnosis to the audit log once per
    session (``logged`` holds what this session already recorded), under the
    signed-in user, all in one transaction; returns the number of records written."""
    records, keys = [], []
    for result in results:
        if result.error:
            continue
        for entry, model, prediction in zip(models, loaded, result.predictions):
            key = (result.upload.sha256, str(entry.path), model.version)
            if key in logged or key in keys:
                continue
            records.append(dict(model=model.name, model_version=model.version, image_sha256=result.upload.sha256,
                                prediction=prediction.label, state=prediction.state,
                                probabilities=prediction.probabilities, flags=flags(prediction)))
            keys.append(key)
    if records:
        user = ui_cache.user_identity()
        ui_cache.audit_log().record_many([{**r, "user": user} for r in records])
        logged.update(keys)
    return len(records)


def results_table(results: list[SliceResult], models: list[ModelEntry], loaded: list[LoadedModel]) -> list[dict]:
    """One row per file: result and confidence per model, and the flags
    (with two models: whether they agree). An uncertain answer has no
    confidence: its result cell says its state and the class it leans to."""
    rows = []
    several = len(models) > 1
    for result in results:
        row: dict = {"File": result.upload.name}
        notes = []
        for i, (entry, model) in enumerate(zip(models, loaded)):
            prefix = f"{entry.name}: " if several else ""
            p = None if result.error else result.predictions[i]
            row[prefix + "Result"] = result_cell(p, _display(model, p.label)) if p else "Unreadable"
            row[prefix + "Confidence"] = p.confidence if p and not p.uncertain else None
            if p and flags(p):
                notes.append(prefix + ", ".join(flags(p)))
        if several:
            row["Models agree"] = None if result.error else len({p.label for p in result.predictions}) == 1
        row["Flags"] = result.error or "; ".join(notes)
        rows.append(row)
    return rows


def table_csv(rows: list[dict]) -> str:
    """The results table as CSV; a cell a spreadsheet would run as a formula is written as text."""
    return csv_text(rows)


def _display(model: LoadedModel, key: str) -> str:
    return model.display_names[model.class_names.index(key)] if key in model.class_names else key


def display_map(model: LoadedModel) -> dict[str, str]:
    return dict(zip(model.class_names, model.display_names))


def analysis(entry: ModelEntry, model: LoadedModel, upload: Upload, method: str, target: str) -> Analysis:
    """The cached prediction and class-activation map of ``upload`` by one model;
    a target class the model does not know falls back to its predicted class."""
    key = target if target in model.class_names else None
    return ui_cache.analyse(entry.path, upload.sha256, upload.data, method=method, target=key)


def explain(upload: Upload, models: list[ModelEntry], loaded: list[LoadedModel], method: str,
            target: str) -> list[Explanation]:
    """One class-activation map per model."""
    out = []
    for entry, model in zip(models, loaded):
        analysed = analysis(entry, model, upload, method, target)
        out.append(Explanation(model, analysed, _display(model, analysed.cam_class)))
    return out


def answer_with_map(models: list[ModelEntry], loaded: list[LoadedModel], method: str,
                    target: str) -> Callable[[ModelEntry, Upload], Prediction]:
    """``classify``'s answer for a slice that is shown in detail: the prediction
    of its analysis, which one pass gives with the map (then cached for
    :func:`show_detail`), where predict would run every network a second time;
    predict's alone when the map cannot be computed."""
    model_of = {str(entry.path): model for entry, model in zip(models, loaded)}

    def answer(entry: ModelEntry, upload: Upload) -> Prediction:
        try:
            return analysis(entry, model_of[str(entry.path)], upload, method, target).prediction
        except ImageDecodeError:
            raise
        except Exception:  # the prediction must not be lost with its map
            log.exception("explaining %s failed; classifying it without a map", upload.sha256)
            return predicted(entry, upload)

    return answer


def answer_detail_with_map(models: list[ModelEntry], loaded: list[LoadedModel], method: str, target: str,
                           chosen: str | None, mapped: set) -> Callable[[ModelEntry, Upload], Prediction]:
    """``classify``'s answer for a batch: the upload that will be shown in
    detail (named ``chosen``, the session's pick on an earlier run; else the
    first that reads) gets its prediction with its map in one pass
    (:func:`answer_with_map`), every other one predict's. ``mapped`` holds
    what this session answered with a map (model, upload, method, class),
    answered from its cached map again rather than predicted anew; the
    answers given with a map here are added."""
    with_map = answer_with_map(models, loaded, method, target)
    detail: list[Upload] = []  # the upload answered with its map, once one is

    def answer(entry: ModelEntry, upload: Upload) -> Prediction:
        shown = upload is detail[0] if detail else chosen in (None, upload.name)
        key = (str(entry.path), upload.sha256, method, target)
        if not shown and key not in mapped:
            return predicted(entry, upload)
        prediction = with_map(entry, upload)  # an unreadable upload raises: the next one is tried
        mapped.add(key)
        if shown:
            detail[:] = [upload]
        return prediction

    return answer


def build_report(result: SliceResult, shown: Slice, explanations: list[Explanation], overlays: list,
                 method: str) -> str:
    upload = result.upload
    results = [ModelResult(e.model.name, e.model.version, prediction, display_map(e.model), overlay, method,
                           e.cam_class) for e, prediction, overlay in zip(explanations, result.predictions, overlays)]
    return slice_report(image=shown.pixels, results=results, filename=upload.name, sha256=upload.sha256,
                        notes=shown.notes)


def report_file_name(upload_name: str) -> str:
    return f"{safe_stem(Path(upload_name).stem)}-report.html"


# --------------------------------------------------------------------------- UI: widgets in, plain values out



def choose_models(by_task: dict[str, list[ModelEntry]]) -> list[ModelEntry]:
    """Sidebar: task, model and optionally a second model of the same task."""
    st.sidebar.header("Model")
    task = st.sidebar.selectbox("Task", list(by_task), key="task")
    paths = {str(e.path): e for e in by_task[task]}
    first = st.sidebar.selectbox("Model", list(paths), format_func=lambda p: paths[p].name, key="model")
    chosen = [paths[first]]
    st.sidebar.caption(model_summary(paths[first]))
    compare = st.sidebar.toggle("Compare with a second model", key="compare", disabled=len(paths) < 2,
                                help="Runs a second model of the same task on the same slices, side by side."
                                if len(paths) > 1 else "This task has only one model.")
    if compare and len(paths) > 1:
        others = [p for p in paths if p != first]
        second = st.sidebar.selectbox("Second model", others, format_func=lambda p: paths[p].name, key="model_b")
        chosen.append(paths[second])
        st.sidebar.caption(model_summary(paths[second]))
    return chosen


def explanation_controls(model: LoadedModel) -> tuple[str, str, float]:
    """Sidebar: CAM method, class to explain (a class key, or PREDICTED) and overlay opacity."""
    st.sidebar.header("Explanation")
    method = st.sidebar.selectbox("Method", list(cam_methods()), key="cam_method",
                                  help="Grad-CAM and Grad-CAM++ explain one class; EigenCAM shows the main "
                                       "activation pattern whatever the class.")
    names = display_map(model)
    target = st.sidebar.selectbox("Class to explain", [PREDICTED, *model.class_names], key="cam_target",
                                  format_func=lambda k: "Predicted class" if k == PREDICTED else names[k])
    opacity = st.sidebar.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key="opacity")
    return method, target, opacity


def window_controls() -> Window:
    """The display window of a DICOM slice (the model always reads its own training window)."""
    preset = st.radio("DICOM display window", [*WINDOW_PRESETS, "Custom"], horizontal=True, key="window_preset",
                      help="Changes how the slice is displayed. The model reads the slice with the window "
                           "it was trained with, so the prediction does not change.")
    if preset in WINDOW_PRESETS:
        window = WINDOW_PRESETS[preset]
        st.caption(f"center {window.center:g} HU, width {window.width:g} HU")
        return window
    left, right = st.columns(2)
    center = left.slider("Center (HU)", -1400, 1500, int(LUNG_WINDOW.center), 10, key="window_center")
    width = right.slider("Width (HU)", 50, 4000, int(LUNG_WINDOW.width), 10, key="window_width")
    return Window(float(center), float(width))


def show_verdict(prediction: Prediction, model: LoadedModel) -> None:
    """The result in plain words, or one of the uncertain states, each in its own
    words, with its reasons and no verdict headline."""
    label = markdown_text(_display(model, prediction.label))
    # The state's own reason is the headline; list only the others (low confidence).
    reasons = "".join(f"\n- {markdown_text(r)}" for r in prediction.reasons
                      if r not in (NOT_CT_REASON, UNLIKE_TRAINING_REASON))
    if prediction.state == NOT_CHEST_CT:
        st.error(f"**Not a chest CT slice: no result.** This looks like something else (blank, noise, a photo, a "
                 f"document or another body part), so the model's classes do not apply.{reasons}",
                 icon=":material/block:")
    elif prediction.state == UNLIKE_TRAINING:
        st.warning(f"**Unlike the training images: no reliable result.** This looks like a CT slice, but from "
                   f"another scanner, hospital or export than the model learned from; it may misread it."
                   f"{reasons}\n\nIt leans {label} ({prediction.confidence:.0%}), for reference only.",
                   icon=":material/help:")
    elif prediction.state == OTHER_FINDING:
        st.warning(f"**Another finding: not what this model was trained for, no result.**{reasons}",
                   icon=":material/report:")
    elif prediction.uncertain:
        st.warning(f"**Uncertain: no confident answer.**{reasons}\n\nMost likely class, for reference only: "
                   f"{label} ({prediction.confidence:.0%}).", icon=":material/help:")
    else:
        statement = (model.card.get("selective_answers") or {}).get("statement", "")
        st.info(f"**Prediction: {label}**  \nCalibrated probability {prediction.confidence:.0%} "
                f"(above the model's confidence threshold of {model.confidence_threshold:.0%})."
                + (f"  \n{markdown_text(statement)}" if statement else ""),
                icon=":material/check_circle:")


def show_probabilities(prediction: Prediction, model: LoadedModel, key: str) -> None:
    fig = figures.probability_bars(prediction.probabilities, display_map(model), predicted=prediction.label,
                                   threshold=model.confidence_threshold, muted=prediction.uncertain)
    st.plotly_chart(fig, key=key, config={"displayModeBar": False})


def show_results_table(rows: list[dict]) -> None:
    st.subheader("All slices")
    config = {k: st.column_config.ProgressColumn(k, format="percent", min_value=0.0, max_value=1.0)
              for k in rows[0] if k.endswith("Confidence")}
    config["File"] = st.column_config.TextColumn("File", width="medium")
    st.dataframe(rows, hide_index=True, column_config=config, key="results_table")
    st.download_button("Download table (CSV)", table_csv(rows), file_name="ct-slice-results.csv", mime="text/csv",
                       on_click="ignore", icon=":material/download:", key="results_csv")
    st.caption("Click a column header to sort. Confidence is the calibrated probability of the most likely class, "
               "shown only for a confident answer: an uncertain one says its state and the class it leans to.")


def unique_names(results: list[SliceResult]) -> list[str]:
    """File names, numbered where two uploads share one."""
    seen: dict[str, int] = {}
    names = []
    for result in results:
        name = result.upload.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return names


def pick_slice(results: list[SliceResult]) -> SliceResult:
    if len(results) == 1:
        return results[0]
    names = unique_names(results)
    chosen = st.selectbox("Slice to view in detail", names, key=DETAIL_SLICE)
    return results[names.index(chosen)]


def show_maps(columns: list, window_slot, explanations: list[Explanation], predictions: list[Prediction],
              method: str, opacity: float) -> tuple[Slice, list]:
    """The slice (a DICOM one in the chosen display window) and each model's
    map beside it; returns the slice as shown and the overlays."""
    image = explanations[0].analysis.image
    if image.hu is not None:
        with window_slot.container():
            shown = image.rewindow(window_controls())
    else:
        shown = image
    overlays = [figures.cam_overlay(shown.pixels, e.analysis.cam, opacity) for e in explanations]
    columns[0].image(shown.pixels, caption=f"Slice ({image.source_format}, {image.size[0]}x{image.size[1]} px)",
                     clamp=True, width="stretch", output_format="PNG")
    for column, e, prediction, overlay in zip(columns[1:], explanations, predictions, overlays):
        who = f"{e.model.name}: " if len(explanations) > 1 else ""
        if prediction.state == NOT_CHEST_CT:
            # A map of where a cancer class 'was found' on a blank page or a photo would mislead.
            column.info(f"{who}no {method} map: this is not a chest CT slice.", icon=":material/block:")
            continue
        column.image(overlay, caption=f"{who}{method} for {e.cam_class} (warm colours weighed most)",
                     width="stretch", output_format="PNG")
    return shown, overlays


def show_detail(result: SliceResult, models: list[ModelEntry], loaded: list[LoadedModel], method: str,
                target: str, opacity: float) -> None:
    """Each model's verdict, the slice with its maps, and the probabilities.
    Drawn in that order into a fixed layout: a verdict is known before its map
    is computed (in a batch) and is what is read first; the charts, least
    needed, come last."""
    upload = result.upload
    several = len(models) > 1
    st.subheader(markdown_text(upload.name))
    window_slot = st.empty()  # a DICOM slice's window controls, once the slice is decoded
    columns = st.columns(1 + len(models) if several else [1, 1, 1.15], gap="medium")
    panels = st.columns(len(models), gap="medium") if several else [columns[2]]
    for panel, entry, model, prediction in zip(panels, models, loaded, result.predictions):
        with panel:
            if several:
                st.markdown(f"**{entry.name}**")
            show_verdict(prediction, model)
    try:
        explanations = explain(upload, models, loaded, method, target)
    except Exception:  # an explanation failure must not hide the prediction
        log.exception("explaining %s failed", upload.sha256)
        explanations = []
    if explanations:
        shown, overlays = show_maps(columns, window_slot, explanations, result.predictions, method, opacity)
    for panel, entry, model, prediction in zip(panels, models, loaded, result.predictions):
        with panel:
            show_probabilities(prediction, model, key=f"probs_{upload.sha256[:12]}_{entry.name}")
    if not explanations:
        st.error("The explanation could not be computed for this slice; the prediction above still stands.")
        return
    if shown.notes:
        st.caption("How the image was read: " + markdown_text("; ".join(shown.notes) + "."))
    # Built only when the button is pressed (Streamlit calls it then), not on every rerun.
    st.download_button("Download report (HTML)", lambda: build_report(result, shown, explanations, overlays, method),
                       file_name=report_file_name(upload.name), mime="text/html", on_click="ignore",
                       icon=":material/download:", key="report_html", type="primary")


def offer_viewer(files) -> bool:
    """A series, a volume or an archive is read in the series viewer (this page
    stops: True); a batch of loose slices may be viewed there as well."""
    items = [(f.name, f.getvalue()) for f in files or []]
    series = holds_series(items)
    if not series and len(items) < 2:
        return False
    if series:
        st.info("These files hold a CT series, a volume or an archive. The series viewer reads them whole: slices "
                "in reading order, a verdict for the series and the probability of each class along it.",
                icon=":material/view_carousel:")
    else:
        st.caption("The series viewer shows these slices in one scrollable view with thumbnails.")
    if st.button("Open in the series viewer", key="open_in_viewer", type="primary" if series else "secondary",
                 icon=":material/view_carousel:"):
        st.session_state[VIEWER_HANDOFF] = items
        st.switch_page("pages/viewer.py")
    return series


# --------------------------------------------------------------------------- page


def main() -> None:
    st.title("CT slice diagnosis")
    st.warning(DISCLAIMER, icon=":material/warning:")
    by_task = ui_cache.models_by_task()
    if not by_task:
        return
    models = choose_models(by_task)
    try:
        loaded = [ui_cache.loaded_model(m.path) for m in models]
    except (CheckpointError, OSError, ValueError) as exc:
        log.exception("loading a model failed")
        reason = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}; the server log has details"
        st.error(f"The model could not be loaded: {markdown_text(reason)}")
        return
    method, target, opacity = explanation_controls(loaded[0])

    files = st.file_uploader(
        "Upload CT slices", type=None, accept_multiple_files=True, key="uploads",
        help=f"PNG, JPEG, TIFF, BMP or DICOM (.dcm or no extension), up to {MAX_FILES} at a time; the format is "
             "detected from the file content.",
    )
    if offer_viewer(files):
        return
    uploads = read_uploads(files)
    if not uploads:
        st.info("Upload one or more chest CT slices (PNG, JPEG, TIFF, BMP or DICOM) to classify them. "
                "Each result shows calibrated probabilities and a map of the regions that weighed most.",
                icon=":material/upload_file:")
        return
    if len(files) > MAX_FILES:
        st.warning(f"{len(files)} files were uploaded; this page analyses at most {MAX_FILES} at a time, so only "
                   f"the first {MAX_FILES} are shown. Remove some files, or upload the rest afterwards.",
                   icon=":material/warning:")

    progress = st.progress(0.0, text="Classifying...") if len(uploads) >= BATCH_PROGRESS_FROM else None
    # One slice is shown in detail at once: its map comes with its prediction.
    chosen = st.session_state.get(DETAIL_SLICE)
    answer = answer_detail_with_map(models, loaded, method, target,
                                    chosen if chosen in {upload.name for upload in uploads} else None,
                                    st.session_state.setdefault("answered_with_map", set()))
    results = classify(uploads, models, answer=answer, on_progress=(lambda done, total: progress.progress(
        done / total, text=f"Classifying {done} of {total}...")) if progress else None)
    if progress:
        progress.empty()
    for result in results:
        if result.error:
            st.error(f"**{markdown_text(result.upload.name)}** could not be read: {markdown_text(result.error)}",
                     icon=":material/error:")
    try:
        record_diagnoses(results, models, loaded, st.session_state.setdefault("audit_logged", set()))
    except Exception as exc:
        log.exception("audit log write failed")
        st.warning(f"The audit log could not be written ({type(exc).__name__}); results are shown but not recorded.")

    readable = [r for r in results if not r.error]
    if len(results) > 1:
        show_results_table(results_table(results, models, loaded))
    if readable:
        st.divider()
        show_detail(pick_slice(readable), models, loaded, method, target, opacity)


if __name__ == "__main__":
    ui_cache.guard_page()
    main()
