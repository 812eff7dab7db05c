"""Model comparison: every model of a task side by side, from their evaluation reports.

Metrics (accuracy, macro-F1, per-class precision/recall/F1, AUC, sensitivity
and specificity for binary tasks, calibration error, size, latency), ROC
curves, confusion matrices, reliability diagrams, an exact McNemar test between
two models on the images both were evaluated on, the images they disagree on
with both Grad-CAMs, and evaluation of a model on a server folder (written to
the user-reports folder and added to this dashboard).

Rows name their image independently of the machine (its path below a data
root and its content hash), so reports written elsewhere pair up and open here.
Only files that resolve inside a data root are read: when a folder is
evaluated (a symlink leading outside is skipped) and when a report's row is
opened to show its Grad-CAMs. One folder evaluation runs at a time on the
server, and only the newest MAX_USER_REPORTS user reports are kept.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import streamlit as st

from ctapp import figures, ui_cache
from ctapp.data import DatasetError, scan_dataset
from ctapp.evaluation import IMAGE_COLUMNS, evaluate_files, locate_image, predictions_path, write_report
from ctapp.imaging import ImageDecodeError
from ctapp.model_folders import ModelEntry
from ctapp.metrics import mcnemar
from ctapp.paths import PathNotAllowed, data_roots, files_inside, resolve_data_file, resolve_data_folder
from ctapp.report import DISCLAIMER, markdown_text, safe_stem

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
REPORTS_ENV = "CTAPP_REPORTS_DIR"
DEFAULT_REPORTS_DIR = REPO / "reports"
MAX_DISAGREEMENTS_LISTED = 200
MAX_USER_REPORTS = 50
USER_REPORT_NAME = re.compile(r"--(\d{8}T\d{6})\.json$")  # the timestamp user_report_path() ends with


@dataclass
class ReportEntry:
    label: str  # unique on the dashboard, e.g. "lung-resnet50 · validation split"
    model: ModelEntry
    path: Path
    report: dict


@dataclass
class Pairing:
    """Two reports' per-image rows matched on the same image files."""

    pairs: list[tuple[dict, dict]]
    label_mismatches: int  # images both evaluated but with different true labels (left out)

    @property
    def correct(self) -> tuple[np.ndarray, np.ndarray]:
        a = np.array([ra["pred"] == ra["true"] for ra, _ in self.pairs], dtype=bool)
        b = np.array([rb["pred"] == rb["true"] for _, rb in self.pairs], dtype=bool)
        return a, b

    @property
    def disagreements(self) -> list[tuple[dict, dict]]:
        return [(ra, rb) for ra, rb in self.pairs if ra["pred"] != rb["pred"]]


# --------------------------------------------------------------------------- plain functions


def reports_dir() -> Path:
    return Path(os.environ.get(REPORTS_ENV) or DEFAULT_REPORTS_DIR)


def collect_reports(models: list[ModelEntry], user_dir: Path) -> list[ReportEntry]:
    """Each model's own validation report, then the user reports (written by
    "Evaluate on a folder") of these models, newest first."""
    found: list[ReportEntry] = []
    labels: set[str] = set()

    def add(model: ModelEntry, path: Path, report: dict) -> None:
        base = f"{model.name} · {figures.evaluated_on(report)}"
        label, n = base, 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels.add(label)
        found.append(ReportEntry(label, model, path, report))

    for model in models:
        report = ui_cache.read_json(model.report_path)
        if report:
            add(model, model.report_path, report)
    if user_dir.is_dir():
        by_path = {str(m.path.resolve()): m for m in models}
        user = []
        for path in user_dir.glob("*.json"):
            report = ui_cache.read_json(path)
            model = by_path.get(str(Path(report.get("model_path", "")).resolve())) if report else None
            if model is not None:
                user.append((report.get("created", ""), path, model, report))
        for _, path, model, report in sorted(user, key=lambda u: u[0], reverse=True):
            add(model, path, report)
    return found


def image_path(report: dict, row_path: str) -> Path:
    """The file a row of a report written before rows carried ``image`` and
    ``sha256`` names (nothing is opened): relative rows are under the report's
    data folder (itself relative to the repository when it is a relative path)."""
    path = Path(row_path)
    if not path.is_absolute() and report.get("data"):
        path = Path(report["data"]) / path
    return path if path.is_absolute() else REPO / path


def image_file(report: dict, row: dict) -> Path | None:
    """The file a per-image row names, if this server holds it inside a data
    root: by its name below a root or its content hash (see
    :func:`ctapp.evaluation.locate_image`), or, for a row written before rows
    carried those, by its path relative to the report's data folder."""
    if any(row.get(column) for column in IMAGE_COLUMNS):
        return locate_image(row)
    if not report.get("data"):
        return None
    try:
        return resolve_data_file(row.get("path", ""), REPO / report["data"])
    except PathNotAllowed:
        return None


def image_keys(report: dict, row: dict) -> list[str]:
    """The names under which a row's image meets another report's row, surest
    first: its name below a data root, else its content hash, else (rows written
    before they carried either) its path below the report's data folder."""
    if row.get("image"):
        return [f"image:{row['image']}"] + ([f"sha256:{row['sha256']}"] if row.get("sha256") else [])
    if row.get("sha256"):
        return [f"sha256:{row['sha256']}"]
    return [f"path:{os.path.normpath(str(image_path(report, row['path'])))}"]


def pair_predictions(report_a: dict, rows_a: list[dict], report_b: dict, rows_b: list[dict]) -> Pairing:
    """Match two reports' per-image rows on the image, wherever each report's
    machine kept its data; each row of B pairs once, and two rows whose recorded
    hashes differ are never the same image."""
    waiting: dict[str, list[int]] = {}
    for n, row in enumerate(rows_b):
        for key in image_keys(report_b, row):
            waiting.setdefault(key, []).append(n)
    used: set[int] = set()
    pairs, mismatches = [], 0
    for row in rows_a:
        n = next((n for key in image_keys(report_a, row) for n in waiting.get(key, []) if n not in used), None)
        if n is None:
            continue
        other = rows_b[n]
        if row.get("sha256") and other.get("sha256") and row["sha256"] != other["sha256"]:
            continue
        used.add(n)
        if other["true"] != row["true"]:
            mismatches += 1
            continue
        pairs.append((row, other))
    return Pairing(pairs, mismatches)


def target_accuracies(chosen: list[ReportEntry]) -> list[float]:
    """The accuracy each model's confidence threshold was chosen for, as its card records it."""
    targets = (((e.model.card or {}).get("selective_answers") or {}).get("target_accuracy") for e in chosen)
    return [t for t in targets if isinstance(t, (int, float))]


def answer_kind(report: dict) -> str:
    """Whose answers a report's rows are: a cross-validation model's that never
    saw the image, or the model's as it was when the report was written."""
    return "out of fold" if report.get("out_of_fold") else "this report"


def significance_sentence(result: dict, name_a: str, name_b: str, n: int) -> str:
    p = result["p_value"]
    if result["only_a_correct"] + result["only_b_correct"] == 0:
        return f"On these {n} images both models are right and wrong on exactly the same images: no difference to test."
    better = name_a if result["only_a_correct"] > result["only_b_correct"] else name_b
    if result["significant_at_0.05"]:
        return (f"The difference is statistically significant at the 5% level (exact McNemar test, p = {p:.3g}): "
                f"{better} is right more often on these {n} images.")
    return (f"The difference is not statistically significant at the 5% level (exact McNemar test, p = {p:.3g}); "
            f"on these {n} images the two models cannot be told apart.")


def user_report_path(model_name: str, folder: Path, split: str, now: datetime | None = None) -> Path:
    now = now or datetime.now(timezone.utc)
    parts = [safe_stem(model_name), safe_stem(folder.name)] + ([split] if split != "all" else [])
    return reports_dir() / f"{'--'.join(parts)}--{now.strftime('%Y%m%dT%H%M%S')}.json"


def evaluate_folder(model_entry: ModelEntry, folder: Path, split: str, dedupe: bool, on_progress=None,
                    roots: list[Path] | None = None) -> Path:
    """Evaluate a model on the labelled images of ``folder`` (every split, or one)
    that lie inside the data ``roots`` (symlinks followed; the others are
    counted, never read) and write the report and per-image CSV to the
    user-reports folder, keeping the newest MAX_USER_REPORTS."""
    model = ui_cache.loaded_model(model_entry.path)
    index = scan_dataset(folder, class_names=model.class_names)
    samples = [s for s in index.samples if split == "all" or s.split == split]
    inside, outside = files_inside([s.path for s in samples], roots)
    allowed = set(inside)
    samples = [s for s in samples if s.path in allowed]
    if not samples:
        raise DatasetError(f"{folder.name}: no images in the {split} split inside the data folders (found splits: "
                           f"{', '.join(index.splits) or 'none, only class folders'}"
                           + (f"; {len(outside)} file(s) lead outside the data folders" if outside else "") + ")")
    report, rows = evaluate_files(model, [s.path for s in samples], [s.label for s in samples], dedupe=dedupe,
                                  on_progress=on_progress, root=folder, image_roots=roots)
    where = folder.name + ("" if split == "all" else f" ({figures.SPLIT_NAMES.get(split, split)})")
    report.update(data=str(folder), split=split, evaluated_on=where, task=model_entry.task,
                  model_path=str(model_entry.path.resolve()), outside_data_roots=len(outside))
    path = user_report_path(model.name, folder, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, rows, path)
    prune_reports(path.parent)
    return path


def prune_reports(folder: Path, keep: int = MAX_USER_REPORTS) -> list[Path]:
    """Delete all but the newest ``keep`` user reports (JSON and CSV) of ``folder``;
    returns the deleted JSON paths. Other files are left alone."""
    reports = sorted((p for p in folder.glob("*.json") if USER_REPORT_NAME.search(p.name)),
                     key=lambda p: USER_REPORT_NAME.search(p.name).group(1), reverse=True)
    for old in reports[keep:]:
        old.unlink(missing_ok=True)
        predictions_path(old).unlink(missing_ok=True)
    return reports[keep:]


# --------------------------------------------------------------------------- UI


def show_metrics(chosen: list[ReportEntry]) -> None:
    reports = {e.label: e.report for e in chosen}
    rows = figures.metrics_table(reports, {e.label: e.model.card for e in chosen})
    st.table(figures.metrics_by_model(rows), hide_index=True, border="horizontal")
    st.caption("ECE: expected calibration error of the calibrated probabilities (0 is perfect). Size: the stored "
               "weights. Latency: median CPU time per slice measured when the model was trained (n/a when the "
               "model card does not record it).")
    st.markdown("**Per class**")
    per_class = figures.per_class_table(reports)
    # Widths of their own: stretched to the page, the grid cut the class names behind ellipses.
    st.dataframe(per_class, hide_index=True, key="per_class_table", column_config={
        "Model": st.column_config.TextColumn("Model", width="large"),
        "Class": st.column_config.TextColumn("Class", width="medium"),
        **{k: st.column_config.NumberColumn(k, format="percent") for k in ("Precision", "Recall")},
        **{k: st.column_config.NumberColumn(k, format="%.3f") for k in ("F1", "AUC")}})
    st.caption("Click a column header to sort.")


def show_confusions(chosen: list[ReportEntry]) -> None:
    for n, entry in enumerate(chosen):
        st.markdown(f"**{markdown_text(entry.label)}** ({entry.report.get('images', '?')} images)")
        left, right = st.columns(2, gap="medium")
        left.plotly_chart(figures.confusion_figure(entry.report, title="Counts"), key=f"cm_counts_{n}")
        right.plotly_chart(figures.confusion_figure(entry.report, normalize=True, title="Share of each true class"),
                           key=f"cm_norm_{n}")


def local_bytes(path: Path | None) -> bytes | None:
    try:
        return path.read_bytes() if path is not None and path.is_file() else None
    except OSError:
        return None


def show_paired(chosen: list[ReportEntry], task: str, opacity: float = 0.4) -> None:
    """Two reports on their shared images. Widget keys carry the task: the
    choices of one task are never offered under another."""
    if len(chosen) < 2:
        st.info("Choose at least two reports above to compare two models on the same images.")
        return
    labels = [e.label for e in chosen]
    left, right = st.columns(2)
    a = left.selectbox("Model A", range(len(chosen)), format_func=lambda i: labels[i], key=f"pair_a_{task}")
    b = right.selectbox("Model B", range(len(chosen)), index=1, format_func=lambda i: labels[i],
                        key=f"pair_b_{task}")
    if a == b:
        st.info("Choose two different reports.")
        return
    ea, eb = chosen[a], chosen[b]
    rows_a, rows_b = ui_cache.predictions(ea.path), ui_cache.predictions(eb.path)
    if not rows_a or not rows_b:
        st.warning("A per-image CSV is missing for one of these reports, so images cannot be matched.")
        return
    pairing = pair_predictions(ea.report, rows_a, eb.report, rows_b)
    if not pairing.pairs:
        st.warning("These two reports share no images: McNemar's test needs both models evaluated on the same "
                   "images. Evaluate both on one folder below.")
        return
    correct_a, correct_b = pairing.correct
    result = mcnemar(correct_a, correct_b)
    n = len(pairing.pairs)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Images in common", n)
    c2.metric(f"Only {ea.model.name} right", result["only_a_correct"])
    c3.metric(f"Only {eb.model.name} right", result["only_b_correct"])
    c4.metric("McNemar p-value", f"{result['p_value']:.3g}")
    st.markdown(significance_sentence(result, ea.model.name, eb.model.name, n))
    if pairing.label_mismatches:
        st.caption(f"{pairing.label_mismatches} image(s) carry different true labels in the two reports and were "
                   "left out.")

    disagreements = pairing.disagreements
    st.markdown(f"#### Images the models disagree on ({len(disagreements)})")
    if not disagreements:
        st.caption("The two models give the same class on every shared image.")
        return
    names = dict(zip(ea.report.get("class_names", []), ea.report.get("display_names", [])))
    column_a, column_b = (f"{e.model.name} ({answer_kind(e.report)})" for e in (ea, eb))
    listed = [Path(ra.get("image") or ra["path"]) for ra, _ in disagreements[:MAX_DISAGREEMENTS_LISTED]]
    table = [{"Image": image.name, "True class": names.get(ra["true"], ra["true"]),
              column_a: names.get(ra["pred"], ra["pred"]), f"{column_a} confidence": float(ra["confidence"]),
              column_b: names.get(rb["pred"], rb["pred"]), f"{column_b} confidence": float(rb["confidence"]),
              "Right": ea.model.name if ra["pred"] == ra["true"] else eb.model.name if rb["pred"] == rb["true"]
              else "neither", "Folder": str(image.parent)} for image, (ra, rb) in zip(listed, disagreements)]
    widths = {k: st.column_config.TextColumn(k, width="medium") for k in ("Image", "True class", column_a, column_b)}
    confidence = {k: st.column_config.ProgressColumn(k, format="percent", min_value=0.0, max_value=1.0)
                  for k in table[0] if k.endswith("confidence")}
    st.dataframe(table, hide_index=True, column_config=widths | confidence, key="disagreements")
    if any(e.report.get("out_of_fold") for e in (ea, eb)):
        st.caption("The table gives each model's out-of-fold answer: that of its cross-validation model that never "
                   "saw the image. The Grad-CAMs below come from the shipped model now, trained on every image "
                   "(this one included), so its answer can differ from the table's.")
    pick = st.selectbox("Image to explain", range(len(table)), format_func=lambda i: str(listed[i]),
                        key=f"disagreement_pick_{task}_{a}_{b}")
    ra, rb = disagreements[pick]
    data = local_bytes(image_file(ea.report, ra) or image_file(eb.report, rb))
    if data is None:
        st.info("This image file is not available in this server's data folders, so its Grad-CAMs cannot be shown.")
        return
    sha = hashlib.sha256(data).hexdigest()
    try:
        analyses = [ui_cache.analyse(e.model.path, sha, data) for e in (ea, eb)]
    except ImageDecodeError as exc:
        st.error(f"The image could not be read: {markdown_text(exc)}")
        return
    cols = st.columns(3, gap="medium")
    cols[0].image(analyses[0].image.pixels, caption=f"{markdown_text(table[pick]['Image'])} "
                  f"(true: {table[pick]['True class']})", clamp=True, width="stretch", output_format="PNG")
    for col, e, analysis in zip(cols[1:], (ea, eb), analyses):
        p = analysis.prediction
        label = dict(zip(e.report.get("class_names", []), e.report.get("display_names", []))).get(p.label, p.label)
        col.image(figures.cam_overlay(analysis.image.pixels, analysis.cam, opacity), width="stretch",
                  output_format="PNG",
                  caption=f"{e.model.name}, shipped model now: {label} ({p.confidence:.0%}), Grad-CAM of {label}")


def evaluation_form(models: list[ModelEntry], task: str = "") -> tuple[ModelEntry, str, str, bool] | None:
    """The 'Evaluate on a folder' form; returns its values when submitted."""
    roots = data_roots()
    with st.form("evaluate_form"):
        paths = {str(m.path): m for m in models}
        model = st.selectbox("Model", list(paths), format_func=lambda p: paths[p].name, key=f"eval_model_{task}")
        folder = st.text_input(
            "Data folder on the server", key="eval_folder", placeholder="e.g. chest-ct-scan-images/Data/test",
            help="A folder of class sub-folders (or train/valid/test folders of class sub-folders), relative to "
                 "a data folder of this server: " + (", ".join(map(str, roots)) or "none configured"),
        )
        split = st.selectbox("Images", ["all", "test", "valid", "train"], key="eval_split",
                             format_func=lambda s: "every image in the folder" if s == "all" else f"the {s} split only")
        dedupe = st.checkbox("Count an image repeated under several names once", value=True, key="eval_dedupe")
        submitted = st.form_submit_button("Evaluate", type="primary")
    return (paths[model], folder, split, dedupe) if submitted else None


def run_evaluation(model: ModelEntry, folder_text: str, split: str, dedupe: bool) -> str | None:
    """Validate the folder, evaluate with a progress bar (one evaluation at a
    time on the server); returns the new report's path or None."""
    try:
        folder = resolve_data_folder(folder_text)
    except PathNotAllowed as exc:
        st.error(f"This folder cannot be used: {markdown_text(exc)}")
        return None
    with ui_cache.evaluation_slot() as ours:
        if not ours:
            st.warning("Another folder evaluation is running on this server; evaluations run one at a time. "
                       "Try again when it has finished.", icon=":material/hourglass:")
            return None
        bar = st.progress(0.0, text="Reading images...")
        try:
            path = evaluate_folder(model, folder, split, dedupe, on_progress=lambda done, total: bar.progress(
                done / total, text=f"Reading images: {done} of {total}"))
        except DatasetError as exc:  # our own words about the folder
            bar.empty()
            st.error(f"The evaluation could not run: {markdown_text(exc)}")
            return None
        except ValueError:  # no readable image, or metrics that cannot be computed: a library's words, logged
            log.exception("evaluation of %s on %s could not run", model.name, folder)
            bar.empty()
            st.error("The evaluation could not run: none of the images could be read, or the metrics could not "
                     "be computed on them; the server log has details.")
            return None
        except Exception as exc:
            log.exception("evaluation of %s on %s failed", model.name, folder)
            bar.empty()
            st.error(f"The evaluation failed ({type(exc).__name__}); the server log has details.")
            return None
    bar.empty()
    try:
        ui_cache.record_evaluation(path, ui_cache.read_json(path) or {})
    except Exception as exc:
        log.exception("indexing the evaluation of %s failed", model.name)
        st.warning(f"The report was written but not indexed in the audit log ({type(exc).__name__}).")
    return str(path)


def choose_reports(task: str, available: list[ReportEntry]) -> None:
    """Prepare the report selection: each model's validation report when the
    task changes; a report written by the form on the previous run joins it."""
    state = st.session_state
    labels = [e.label for e in available]
    if state.get("compare_reports_task") != task or "compare_reports" not in state:
        state["compare_reports"] = [e.label for e in available if e.path == e.model.report_path] or labels
        state["compare_reports_task"] = task
    selected = [x for x in state["compare_reports"] if x in labels]
    added = state.pop("eval_added", None)
    if added:
        st.success(f"Evaluation finished: {markdown_text(added[1])} is on the dashboard.", icon=":material/check_circle:")
        selected += [e.label for e in available if str(e.path) == added[0] and e.label not in selected]
    state["compare_reports"] = selected


def main() -> None:
    st.title("Model comparison")
    st.warning(DISCLAIMER, icon=":material/warning:")
    by_task = ui_cache.models_by_task()
    if not by_task:
        return
    task = st.selectbox("Task", list(by_task), key="compare_task")
    models = by_task[task]
    available = collect_reports(models, reports_dir())

    choose_reports(task, available)
    st.multiselect("Reports to compare", [e.label for e in available], key="compare_reports",
                   help="Each model's validation report, plus the evaluations run on this page.")
    chosen = [e for e in available if e.label in st.session_state["compare_reports"]]
    without = [m.name for m in models if not any(e.model is m for e in available)]
    if without:
        st.caption("No evaluation report yet: " + ", ".join(without))

    tabs = st.tabs(["Metrics", "ROC curves", "Confusion matrices", "Calibration", "Two models on the same images",
                    "Evaluate on a folder"])
    if not chosen:
        tabs[0].info("No evaluation report to show for this task yet: evaluate a model on a folder "
                     "(last tab).", icon=":material/info:")
    else:
        reports = {e.label: e.report for e in chosen}
        with tabs[0]:
            show_metrics(chosen)
        with tabs[1]:
            st.plotly_chart(figures.roc_figure(reports), key="roc")
            st.caption("One-vs-rest ROC curve of each class (for two classes: of the positive class); the AUC of "
                       "each model is written in each panel.")
        with tabs[2]:
            show_confusions(chosen)
        with tabs[3]:
            st.plotly_chart(figures.reliability_figure(reports), key="reliability")
            if any(r.get("risk_coverage") for r in reports.values()):
                st.markdown("**Selective answers**: how often each model is right when it answers only its most "
                            "confident slices (out-of-fold reports). The diamond is where its confidence threshold "
                            "puts it; the dashed line, the accuracy that threshold was chosen for (its model card).")
                st.plotly_chart(figures.risk_coverage_figure(reports, target=target_accuracies(chosen)),
                                key="risk_coverage")
            st.caption("Points on the dotted diagonal mean the stated probability matches how often the model is "
                       "right; the bars show how many images fall in each confidence bin.")
        with tabs[4]:
            show_paired(chosen, task)
    with tabs[5]:
        if not ui_cache.is_admin():
            st.info("Evaluating models on server folders is open to admins.", icon=":material/lock:")
            return
        st.markdown("Evaluate a model on a labelled folder on this server. The report is saved in the reports "
                    f"folder (`{reports_dir()}`) and joins this dashboard.")
        values = evaluation_form(models, task)
        if values:
            written = run_evaluation(*values)
            if written:
                st.session_state["eval_added"] = (written, Path(written).name)
                st.rerun()


if __name__ == "__main__":
    ui_cache.guard_page()
    main()
