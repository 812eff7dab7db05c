"""AppTest smoke and behaviour tests of every page: uploads (PNG, DICOM, a
batch with bad files), the comparison dashboard, evaluation of a folder, and
the model cards. Uploads go through ``st.file_uploader`` itself: AppTest's
``FileUploader.set_value`` registers the bytes as a browser upload would."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import re
import sqlite3

import pandas as pd

from app_fixtures import APP, PATIENT_ID, PATIENT_NAME, TASK, app_env, app_settings, dicom_bytes, png_bytes  # noqa: F401
from streamlit.testing.v1 import AppTest

TIMEOUT = 120  # seconds per script run: the CPU is shared with a training job


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def run(target) -> AppTest:
    """Run the app after a widget change (``target`` is the widget) or as it is."""
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def choose_tiny_task(at: AppTest, key: str) -> AppTest:
    # models/ of the repository may hold real models of other tasks.
    if at.selectbox(key=key).value != TASK:
        at = run(at.selectbox(key=key).set_value(TASK))
    return at


def plain(markdown: str) -> str:
    """Markdown source without its backslash escapes (file names are shown escaped)."""
    return re.sub(r"\\(.)", r"\1", str(markdown))


def all_text(at: AppTest) -> str:
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success", "text"):
        parts += [plain(element.value) for element in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    parts += [frame.value.to_string() for frame in [*at.dataframe, *at.table]]
    parts += [caption for image in at.image for caption in image.captions]
    parts += [str(option) for box in at.selectbox for option in box.options]
    return "\n".join(parts)


def audit_rows(path) -> list[tuple]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return db.execute("SELECT model, image_sha256, prediction, probabilities, flags FROM diagnoses").fetchall()


def table(at: AppTest, column: str):
    """The first table (as a DataFrame) with a column named ``column``."""
    for frame in at.dataframe:
        if column in frame.value.columns:
            return frame.value
    raise AssertionError(f"no table with a column {column!r}")


def comparison_table(at: AppTest):
    """The dashboard's metrics table: one row per metric, one column per report."""
    return at.table[0].value.set_index("Metric")


def plotly_charts(at: AppTest) -> list:
    return at.get("plotly_chart")


# --------------------------------------------------------------------------- diagnosis


def test_no_models_gives_a_helpful_message(tmp_path, monkeypatch):
    import ctapp.model_folders

    monkeypatch.setattr(ctapp.model_folders, "DEFAULT_MODELS_DIR", tmp_path / "none")
    monkeypatch.setenv("CTAPP_MODELS_DIR", str(tmp_path / "empty"))
    at = start()
    assert "No trained models were found" in all_text(at)
    assert "Research use only" in at.warning[0].value
    (hint,) = [w for w in at.warning if "No trained models" in w.value]
    assert hint.value == ("**No trained models were found.** Train one, for example\n\n"
                          "`python -m training.fit --data DATA_FOLDER --arch resnet50 --out models/NAME`\n\n"
                          "then reload this page. Models are read from `models/` in the app folder and from the "
                          "folders listed in the `CTAPP_MODELS_DIR` environment variable.")
    assert hint.proto.icon == ":material/info:"
    for page in ("pages/compare.py", "pages/model_card.py"):
        at.switch_page(page).run()
        assert not at.exception
        assert "No trained models were found" in all_text(at)


def test_png_upload_shows_prediction_overlay_and_report(app_settings):
    at = choose_tiny_task(start(), "task")
    assert "Research use only" in at.warning[0].value
    assert at.file_uploader(key="uploads").allowed_type == []  # any file: the format is read from the content
    data = png_bytes(label=0, seed=3)
    before = len(audit_rows(app_settings.audit_log))
    run(at.file_uploader(key="uploads").set_value(("slice.png", data, "image/png")))

    assert plain(at.subheader[0].value) == "slice.png"
    assert len(at.image) == 2  # the slice and its Grad-CAM overlay, side by side
    assert "Grad-CAM for" in at.image[1].captions[0]
    verdict = [*at.info, *at.warning[1:], *at.error]
    assert len(verdict) == 1
    text = verdict[0].value
    # One verdict in one of the answer states (which one is up to a two-epoch model with 8 validation
    # images behind its thresholds; the states' words are pinned in test_pinned_confidence.py).
    assert sum(words in text for words in ("Prediction: ", "Uncertain", "Unlike the training images",
                                          "Not a chest CT")) == 1, text
    assert len(plotly_charts(at)) == 1  # probabilities
    assert at.download_button(key="report_html").label == "Download report (HTML)"
    assert not at.dataframe  # one file: no batch table

    rows = audit_rows(app_settings.audit_log)
    assert len(rows) == before + 1
    import hashlib

    model, sha, prediction, _probabilities, _flags = rows[-1]
    assert model == "tiny-a" and sha == hashlib.sha256(data).hexdigest() and prediction in ("alpha", "beta")
    assert "slice.png" not in "".join(map(str, rows[-1]))

    # Another method, class and opacity: explanation only, no new diagnosis in the log.
    at.sidebar.selectbox(key="cam_method").set_value("EigenCAM")
    at.sidebar.selectbox(key="cam_target").set_value("alpha")
    run(at.sidebar.slider(key="opacity").set_value(0.8))
    assert "EigenCAM for Alpha" in at.image[1].captions[0]
    assert len(audit_rows(app_settings.audit_log)) == before + 1


def test_dicom_upload_is_windowed_and_shows_no_patient_identifiers(app_settings):
    at = choose_tiny_task(start(), "task")
    run(at.file_uploader(key="uploads").set_value(("IM000123", dicom_bytes(), "application/octet-stream")))
    # The tiny models never saw a DICOM-windowed slice: far beyond their OOD range, it is 'not a chest
    # CT' for them, which shows the slice and no Grad-CAM map (a map of a class on a non-CT would mislead).
    assert "Not a chest CT slice: no result" in all_text(at)
    assert len(at.image) == 1 and "no Grad-CAM map" in all_text(at)
    assert "DICOM" in at.image[0].captions[0]
    assert at.radio(key="window_preset").value == "Lung"
    assert at.radio(key="window_preset").options == ["Lung", "Mediastinum", "Bone", "Custom"]  # the viewer's list
    assert "lung window" in all_text(at)
    run(at.radio(key="window_preset").set_value("Custom"))
    run(at.slider(key="window_width").set_value(400))
    run(at.radio(key="window_preset").set_value("Mediastinum"))
    text = all_text(at)
    for identifier in (PATIENT_NAME, "Doe", "Jane", PATIENT_ID, "19510203", "Nowhere"):
        assert identifier not in text


def test_batch_with_bad_files_table_csv_and_detail(app_settings):
    at = choose_tiny_task(start(), "task")
    good = [(f"ok{i}.png", png_bytes(label=i % 2, seed=10 + i), "image/png") for i in range(3)]
    bad = [("notes.txt", b"patient notes, not an image", "text/plain"),
           ("cut.png", png_bytes(seed=1)[:120], "image/png")]
    run(at.file_uploader(key="uploads").set_value(good[:2] + bad + good[2:]))

    errors = [plain(e.value) for e in at.error]
    assert any("notes.txt" in e and "not an image file" in e for e in errors)
    assert any("cut.png" in e for e in errors)
    assert "Traceback" not in all_text(at)
    results = table(at, "File")
    assert list(results["File"]) == ["ok0.png", "ok1.png", "notes.txt", "cut.png", "ok2.png"]
    assert list(results.columns) == ["File", "Result", "Confidence", "Flags"]
    assert list(results["Result"][2:4]) == ["Unreadable", "Unreadable"]
    assert results["Result"][0] in ("Alpha", "Beta") or results["Result"][0].startswith("Uncertain (leans ")
    assert "not an image file" in results["Flags"][2]
    for result, confidence in zip(results["Result"], results["Confidence"]):  # a bar only for a confident answer
        assert (0.0 < confidence <= 1.0) if result in ("Alpha", "Beta") else pd.isna(confidence), (result, confidence)
    # The audit log holds each answer's state apart from its class: confident exactly where the table says so.
    import hashlib

    with sqlite3.connect(app_settings.audit_log) as db:
        states = dict(db.execute("SELECT image_sha256, state FROM diagnoses WHERE model = 'tiny-a'").fetchall())
    for (name, data, _), result in zip(good, results["Result"][[0, 1, 4]]):
        assert (states[hashlib.sha256(data).hexdigest()] == "confident") == (result in ("Alpha", "Beta")), name
    assert at.download_button(key="results_csv").label == "Download table (CSV)"

    picker = at.selectbox(key="detail_slice")
    assert picker.options == ["ok0.png", "ok1.png", "ok2.png"]
    at = run(picker.set_value("ok2.png"))
    assert plain(at.subheader[-1].value) == "ok2.png"
    assert len(at.image) == 2


def test_two_models_side_by_side(app_settings):
    at = choose_tiny_task(start(), "task")
    run(at.sidebar.toggle(key="compare").set_value(True))
    assert at.sidebar.selectbox(key="model_b").value != at.sidebar.selectbox(key="model").value
    files = [("a.png", png_bytes(seed=5), "image/png"), ("b.png", png_bytes(label=1, seed=6), "image/png")]
    run(at.file_uploader(key="uploads").set_value(files))
    assert len(at.image) == 3  # the slice and one overlay per model
    captions = [c for image in at.image for c in image.captions]
    assert any(c.startswith("tiny-a: ") for c in captions) and any(c.startswith("tiny-b: ") for c in captions)
    assert len(plotly_charts(at)) == 2
    assert list(table(at, "File").columns) == ["File", "tiny-a: Result", "tiny-a: Confidence", "tiny-b: Result",
                                               "tiny-b: Confidence", "Models agree", "Flags"]


VERDICT_WORDS = ("Prediction: ", "Uncertain", "Unlike the training images", "Not a chest CT")


def test_one_upload_runs_the_model_once_for_its_verdict_and_map(app_settings, monkeypatch):
    """A single slice's prediction comes with its map from one pass of the
    network (no second pass to predict it), and the verdict is the recorded one."""
    import ctapp.inference

    calls = []
    for name in ("predict", "analyse"):
        real = getattr(ctapp.inference.LoadedModel, name)
        monkeypatch.setattr(ctapp.inference.LoadedModel, name, lambda self, *args, _name=name, _real=real, **kw:
                            calls.append(_name) or _real(self, *args, **kw))
    at = choose_tiny_task(start(), "task")
    run(at.file_uploader(key="uploads").set_value(("one.png", png_bytes(label=1, seed=41), "image/png")))
    assert calls == ["analyse"]
    assert len(at.image) == 2 and len(plotly_charts(at)) == 1
    _model, _sha, label, _probabilities, _flags = audit_rows(app_settings.audit_log)[-1]
    (verdict,) = [plain(v.value) for v in [*at.info, *at.warning[1:], *at.error]]
    assert label.capitalize() in verdict or "Not a chest CT" in verdict, (label, verdict)


def test_a_failed_map_leaves_the_verdict_of_one_upload_on_screen_and_recorded(app_settings, monkeypatch):
    import ctapp.inference

    def broken(self, *args, **kwargs):
        raise RuntimeError("Grad-CAM exploded")

    monkeypatch.setattr(ctapp.inference.LoadedModel, "analyse", broken)
    at = choose_tiny_task(start(), "task")
    before = len(audit_rows(app_settings.audit_log))
    run(at.file_uploader(key="uploads").set_value(("one.png", png_bytes(seed=42), "image/png")))
    text = all_text(at)
    assert "The explanation could not be computed for this slice; the prediction above still stands" in text
    assert sum(words in text for words in VERDICT_WORDS) == 1, text
    assert len(plotly_charts(at)) == 1 and not at.image
    assert len(audit_rows(app_settings.audit_log)) == before + 1


# --------------------------------------------------------------------------- comparison dashboard


def test_compare_dashboard_metrics_figures_and_mcnemar(app_settings):
    at = choose_tiny_task(start("pages/compare.py"), "compare_task")
    assert "Research use only" in at.warning[0].value
    assert at.multiselect(key="compare_reports").value == ["tiny-a · validation split", "tiny-b · validation split"]
    metrics = comparison_table(at)
    assert list(metrics.columns) == ["tiny-a · validation split", "tiny-b · validation split"]
    for name in ("Evaluated on", "Accuracy", "Macro-F1", "ROC AUC (macro)", "Sensitivity (Beta)", "Specificity", "ECE",
                 "Size (MB)", "Latency, prediction (ms)", "Latency, with Grad-CAM (ms)"):
        assert name in metrics.index, name
    assert list(metrics.loc["Evaluated on"]) == ["validation split", "validation split"]
    assert metrics.loc["Latency, with Grad-CAM (ms)"].iloc[1] == "31.5"
    assert metrics.loc["Accuracy"].iloc[0].endswith("%")
    assert len(table(at, "Recall")) == 4  # 2 models x 2 classes
    # ROC, 2 confusion matrices per model, reliability, risk-coverage (the reports carry its curve)
    assert [c.key for c in plotly_charts(at)] == ["roc", "cm_counts_0", "cm_norm_0", "cm_counts_1", "cm_norm_1",
                                                   "reliability", "risk_coverage"]
    assert metrics.loc["Answered (not uncertain)"].iloc[0].endswith("%")

    values = {m.label: m.value for m in at.metric}
    assert values["Images in common"] == "8"
    assert "McNemar p-value" in values
    assert "exact McNemar test" in all_text(at)
    disagreements = table(at, "True class")
    assert len(disagreements) == 3  # every third prediction of tiny-b is flipped
    assert len(at.image) == 3  # the image and both Grad-CAMs (the files exist locally)


def test_evaluate_on_a_folder_adds_a_report(app_settings):
    at = choose_tiny_task(start("pages/compare.py"), "compare_task")
    at.text_input(key="eval_folder").input("../../../etc")
    run(at.form_submit_button[0].click())
    assert any("cannot be used" in e.value for e in at.error)
    assert not app_settings.reports.exists() or not list(app_settings.reports.glob("*.json"))

    at.text_input(key="eval_folder").input(str(app_settings.data))
    at.selectbox(key="eval_split").set_value("valid")
    run(at.form_submit_button[0].click())
    written = list(app_settings.reports.glob("*.json"))
    assert len(written) == 1 and written[0].with_suffix(".csv").is_file()
    assert any("Evaluation finished" in s.value for s in at.success)
    selected = at.multiselect(key="compare_reports").value
    assert len(selected) == 3 and selected[-1].startswith("tiny-a · ")
    assert len(comparison_table(at).columns) == 3


# --------------------------------------------------------------------------- audit log


def test_the_audit_log_shows_and_filters_results_by_state_and_class(app_settings):
    """An uncertain answer is listed by its state and the class it leans to, never as that class."""
    from ctapp.store import Store

    store = Store(app_settings.audit_log)
    try:
        common = dict(model="audit-model", model_version="v1", probabilities={"alpha": 0.504, "beta": 0.496})
        store.record(**common, image_sha256="01" * 32, prediction="alpha")
        store.record(**common, image_sha256="02" * 32, prediction="alpha", flags=["not a chest CT", "low confidence"])
        store.record(**common, image_sha256="03" * 32, prediction="beta", state="no result", series_id="S-1234abcd",
                     slices=40)
    finally:
        store.close()
    at = start("pages/audit_log.py")
    at = run(at.selectbox(key="audit_model").set_value("audit-model"))
    shown = table(at, "result")
    assert list(shown["result"]) == ["no result (leans beta)", "not a chest CT (leans alpha)", "alpha"]
    assert list(shown["series"]) == ["S-1234abcd", "", ""] and list(shown["slices"]) == [40, 1, 1]
    results = at.selectbox(key="audit_result")
    labels = results.options
    assert {"alpha", "not a chest CT (leans alpha)", "no result (leans beta)"} <= set(labels)
    at = run(results.select_index(labels.index("not a chest CT (leans alpha)")))
    shown = table(at, "result")
    assert list(shown["result"]) == ["not a chest CT (leans alpha)"] and at.metric[0].value == "1"
    at = run(at.selectbox(key="audit_result").select_index(labels.index("alpha")))
    assert list(table(at, "result")["result"]) == ["alpha"]


# --------------------------------------------------------------------------- model card


def test_model_card_page_shows_card_curves_and_audit(app_settings):
    at = start("pages/model_card.py")
    box = at.selectbox(key="card_model")
    assert "tiny-b · Alpha / Beta" in box.options
    at = run(box.set_value(str(app_settings.model_b)))
    assert "Research use only" in at.warning[0].value
    assert at.header[0].value == "tiny-b"
    labels = [m.label for m in at.metric]
    assert labels[:4] == ["Validation accuracy", "Macro-F1", "ROC AUC (macro)", "ECE after calibration"]
    assert at.metric[0].help == "on a validation split of 8 images; fewer than 20 images: a rough figure"
    assert [t.label for t in at.tabs] == ["Overview", "Training", "Training data and audit", "Full card (JSON)"]
    text = all_text(at)
    for expected in ("Intended use", "Limitations", "Baseline CNN", "Grad-CAM layer", "Calibration",
                     "Out-of-distribution", "Shortcut probe", "Dataset audit", "31.5 ms with Grad-CAM"):
        assert expected in text, expected
    assert any("predict the class" in w.value for w in at.warning)  # the audit's shortcut warning
    assert len(plotly_charts(at)) == 1  # training curves
    assert at.json[0].value  # the full card
