"""Figures, tables and the HTML report as plain functions (no Streamlit, no browser)."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image
from synthetic import prediction

from ctapp import figures
from ctapp.imaging import decode
from ctapp.report import DISCLAIMER, ModelResult, slice_report, verdict

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- probability bars and overlay


def test_probability_bars_highlight_the_prediction_and_show_the_threshold():
    fig = figures.probability_bars({"alpha": 0.2, "beta": 0.8}, {"alpha": "Alpha", "beta": "Beta"},
                                   threshold=0.75)
    bar = fig.data[0]
    assert list(bar.y) == ["Alpha", "Beta"] and list(bar.x) == [0.2, 0.8]
    assert list(bar.text) == ["20%", "80%"]
    assert bar.marker.color[1] == figures.ACCENT and bar.marker.color[0] != figures.ACCENT
    assert fig.layout.shapes[0].x0 == 0.75
    assert fig.layout.xaxis.range == (0, 1.12)


def test_probability_bars_accept_a_list_of_names_and_tiny_values():
    fig = figures.probability_bars({"a": 0.999, "b": 0.001}, ["A", "B"])
    assert list(fig.data[0].text) == ["100%", "<1%"]
    assert not fig.layout.shapes


def test_cam_overlay_blends_a_colour_map_onto_the_slice():
    grey = np.full((20, 30), 0.5, np.float32)
    cam = np.zeros((20, 30), np.float32)
    cam[:, 15:] = 1.0
    out = figures.cam_overlay(grey, cam, opacity=0.5)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    # JET: 0 is dark blue (0, 0, 128), 1 is dark red (128, 0, 0); half of each blended with grey 128.
    assert tuple(out[0, 0]) == pytest.approx((64, 64, 128), abs=2)
    assert tuple(out[0, -1]) == pytest.approx((128, 64, 64), abs=2)
    np.testing.assert_array_equal(figures.cam_overlay(grey, cam, opacity=0.0)[..., 0], np.full((20, 30), 128))


def test_cam_overlay_resizes_the_map_and_accepts_uint8():
    grey = np.zeros((40, 60), np.uint8)
    out = figures.cam_overlay(grey, np.ones((7, 7)), opacity=1.0)
    assert out.shape == (40, 60, 3) and (out[..., 0] > 100).all()


@pytest.mark.parametrize("kwargs", [{"opacity": 1.5}, {"opacity": -0.1}])
def test_cam_overlay_refuses_bad_opacity(kwargs):
    with pytest.raises(ValueError, match="opacity"):
        figures.cam_overlay(np.zeros((8, 8)), np.zeros((8, 8)), **kwargs)


def test_cam_overlay_refuses_colour_images():
    with pytest.raises(ValueError, match="2-D grey"):
        figures.cam_overlay(np.zeros((8, 8, 3)), np.zeros((8, 8)))


# --------------------------------------------------------------------------- evaluation figures


def test_roc_figure_has_one_panel_per_class_and_the_auc_of_each_model(three_class):
    other = {**three_class, "roc_auc": {"per_class": {k: 0.5 for k in three_class["class_names"]}, "macro": 0.5}}
    fig = figures.roc_figure({"model A": three_class, "model B": other})
    titles = [a.text for a in fig.layout.annotations[:3]]
    assert titles == ["Adenocarcinoma", "Normal", "Squamous cell carcinoma"]
    curves = [t for t in fig.data if t.name in ("model A", "model B")]
    assert len(curves) == 6 and sum(t.showlegend for t in curves) == 2
    auc_text = fig.layout.annotations[3].text
    assert f"model A: AUC {three_class['roc_auc']['per_class']['adenocarcinoma']:.3f}" in auc_text
    assert "model B: AUC 0.500" in auc_text


def test_roc_figure_of_a_binary_task_shows_the_positive_class(binary):
    fig = figures.roc_figure({"m": binary})
    assert fig.layout.annotations[0].text == "COVID"
    curve = next(t for t in fig.data if t.name == "m")
    assert list(curve.x) == binary["roc_curves"]["covid"]["fpr"]


def test_confusion_figure_counts_and_row_normalised(three_class):
    counts = np.array(three_class["confusion_matrix"])
    fig = figures.confusion_figure(three_class)
    np.testing.assert_array_equal(np.array(fig.data[0].z), counts)
    assert list(fig.data[0].x) == three_class["display_names"]
    norm = figures.confusion_figure(three_class, normalize=True)
    np.testing.assert_allclose(np.array(norm.data[0].z).sum(axis=1), 1.0)
    assert norm.data[0].zmax == 1
    assert f"({counts[0, 0]})" in norm.data[0].text[0][0]


def test_confusion_figure_with_an_empty_class_row_and_a_class_of_one_image():
    report = {"class_names": ["a", "b", "c"], "confusion_matrix": [[0, 0, 0], [1, 3, 0], [0, 0, 1]]}
    z = np.array(figures.confusion_figure(report, normalize=True).data[0].z)
    np.testing.assert_allclose(z, [[0, 0, 0], [0.25, 0.75, 0], [0, 0, 1]])  # a class of one image: 100%


def test_reliability_figure_plots_each_bin(three_class, binary):
    fig = figures.reliability_figure({"A": three_class, "B": binary})
    lines = [t for t in fig.data if isinstance(t, go.Scatter) and t.legendgroup in ("A", "B")]
    assert [t.name.split(" (")[0] for t in lines] == ["A", "B"]
    assert f"ECE {three_class['ece']:.3f}" in lines[0].name
    assert list(lines[0].y) == [b["accuracy"] for b in three_class["reliability"]]
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert sum(bars[0].y) == three_class["images"]
    assert figures.reliability_figure({"A": three_class}, title="Calibration").layout.title.text == "Calibration"


def test_metrics_and_per_class_tables(three_class, binary):
    rows = figures.metrics_table({"A": three_class, "B": binary},
                                 {"A": {"size_bytes": 2_500_000, "latency_ms": {"predict": 12.5, "predict_gradcam": 80,
                                                                                "image": "512x512"}}, "B": {}})
    assert rows[0]["Accuracy"] == three_class["accuracy"] and rows[0]["Size (MB)"] == 2.5
    assert rows[0]["Latency, prediction (ms)"] == 12.5 and rows[0]["Latency, with Grad-CAM (ms)"] == 80.0
    assert rows[1]["Latency, prediction (ms)"] is None
    assert "Specificity" not in rows[0]
    assert rows[1]["Sensitivity (COVID)"] == binary["sensitivity"] and rows[1]["Specificity"] == binary["specificity"]
    per_class = figures.per_class_table({"A": three_class})
    assert [r["Class"] for r in per_class] == three_class["display_names"]
    assert per_class[1]["Recall"] == three_class["per_class"]["normal"]["recall"]
    assert figures.card_latency_ms({"latency_ms": 3}) == {"predict": 3.0}
    assert figures.card_latency_ms({"latency_ms": "fast"}) == {}
    assert rows[0]["Evaluated on"] == "unknown images"
    assert figures.evaluated_on({"split": "valid"}) == "validation split"
    assert figures.evaluated_on({"data": "/x/test-set", "split": "all"}) == "test-set"
    assert figures.evaluated_on({"evaluated_on": "test (test split)", "split": "test"}) == "test (test split)"


def test_metrics_table_shows_selective_answers_and_fold_spread_when_the_report_has_them(three_class):
    cross_validated = {**three_class, "coverage": 0.62, "accuracy_when_confident": 0.95,
                       "fold_spread": {"accuracy": {"mean": 0.8, "std": 0.04}, "macro_f1": {"mean": 0.78, "std": 0.05}}}
    with_, without = figures.metrics_table({"cv": cross_validated, "plain": three_class})
    assert with_["Answered (not uncertain)"] == 0.62 and with_["Accuracy when answered"] == 0.95
    assert with_["Accuracy, sd over folds"] == 0.04 and with_["Macro-F1, sd over folds"] == 0.05
    assert "Answered (not uncertain)" not in without and "Accuracy, sd over folds" not in without


def test_metrics_by_model_reads_one_metric_per_row(three_class, binary):
    rows = figures.metrics_table({"A": three_class, "B": binary}, {"A": {"size_bytes": 2_500_000}})
    table = {row["Metric"]: row for row in figures.metrics_by_model(rows)}
    assert list(table["Accuracy"]) == ["Metric", "A", "B"]
    assert table["Accuracy"]["A"] == f"{three_class['accuracy']:.1%}"
    assert table["Macro-F1"]["B"] == f"{binary['macro_f1']:.3f}"
    assert table["Images"]["A"] == "60" and table["Size (MB)"]["A"] == "2.5" and table["Size (MB)"]["B"] == "n/a"
    assert table["Specificity"]["A"] == "n/a"  # binary-only rows are kept for the multi-class model
    assert figures.metrics_by_model([]) == []


# --------------------------------------------------------------------------- training curves


def test_training_curves_from_a_history_csv(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,lr,train_loss,train_accuracy,images_per_second,seconds,val_loss,val_accuracy,"
                    "val_macro_f1,val_auc,val_ece\n"
                    "1,0.01,1.2,0.5,10,5,1.1,0.55,0.5,0.7,0.1\n"
                    "2,0.005,0.9,0.7,10,5,nan,0.6,0.58,0.75,0.08\n")
    rows = figures.read_history(path)
    assert rows[1]["val_loss"] is None and rows[0]["lr"] == 0.01
    fig = figures.training_curves(path)
    names = [t.name for t in fig.data]
    assert names == ["training loss", "validation loss", "training accuracy", "validation accuracy", "validation macro-F1",
                     "validation ROC AUC", "validation ECE", "learning rate"]
    assert list(fig.data[0].y) == [1.2, 0.9] and list(fig.data[1].y) == [1.1, None]
    assert [a.text for a in fig.layout.annotations] == [p[0] for p in figures.HISTORY_PANELS]
    panels = {}
    for trace in fig.data:
        panels.setdefault(trace.xaxis, []).append(trace.line.color)
    assert all(c is not None and len(set(c)) == len(c) for c in panels.values()), "curves sharing a panel differ in colour"


def test_training_curves_of_a_cross_validated_run_are_the_mean_over_its_folds(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("run,epoch,train_loss,val_accuracy\n"
                    "fold-0,1,1.0,0.5\nfold-0,2,0.6,0.7\n"
                    "fold-1,1,0.8,0.6\nfold-1,2,0.4,\n"
                    "full,1,0.9,\nfull,2,0.3,\n")  # the final model has no held-out images
    rows = figures.fold_mean_history(figures.read_history(path))
    assert rows == [{"epoch": 1.0, "folds": 2, "train_loss": pytest.approx(0.9), "val_accuracy": pytest.approx(0.55)},
                    {"epoch": 2.0, "folds": 2, "train_loss": pytest.approx(0.5), "val_accuracy": pytest.approx(0.7)}]
    fig = figures.training_curves(path)
    assert list(fig.data[0].y) == pytest.approx([0.9, 0.5]) and list(fig.data[0].x) == [1.0, 2.0]
    plain = [{"epoch": 1.0, "train_loss": 0.5}]
    assert figures.fold_mean_history(plain) == plain and figures.fold_mean_history([]) == []


def test_risk_coverage_curves_with_each_models_operating_point_and_the_target():
    a = {"risk_coverage": [{"coverage": 0.2, "accuracy": 1.0}, {"coverage": 1.0, "accuracy": 0.8}],
         "coverage": 0.6, "accuracy_when_confident": 0.93}
    b = {"risk_coverage": [{"coverage": 1.0, "accuracy": 0.7}]}  # no selective answers recorded
    fig = figures.risk_coverage_figure({"A": a, "B": b, "C": {}}, target=0.9)
    assert [t.name for t in fig.data] == ["A", "A: as shipped", "B", "as shipped (its confidence threshold)"]
    assert [t.showlegend is not False for t in fig.data] == [True, False, True, True]  # one entry for every diamond
    assert list(fig.data[0].x) == [0.2, 1.0] and list(fig.data[0].y) == [1.0, 0.8]
    assert (fig.data[1].x[0], fig.data[1].y[0]) == (0.6, 0.93) and fig.data[1].marker.color == fig.data[0].line.color
    assert fig.data[2].line.color != fig.data[0].line.color
    assert fig.layout.shapes[0].y0 == 0.9 and fig.layout.annotations[0].text == "target 90%"
    assert not figures.risk_coverage_figure({"A": a}, target=None).layout.shapes
    assert not figures.risk_coverage_figure({"A": a}).layout.shapes  # no target given: none made up
    two = figures.risk_coverage_figure({"A": a, "B": b}, target=[0.95, 0.9, 0.95])
    assert [a.text for a in two.layout.annotations] == ["target 90%", "target 95%"]
    assert figures.risk_coverage_figure({"A": a}, title="Answers by confidence").layout.title.text == \
        "Answers by confidence"


def legend_entries(fig: go.Figure) -> int:
    return sum(t.showlegend is not False and t.name is not None for t in fig.data)


@pytest.mark.parametrize("make", ["roc", "reliability", "risk_coverage"])
def test_legends_sit_below_the_plot_in_room_of_their_own(make, three_class):
    """Issue 24 item 10: above the plot a horizontal legend wrapped on a narrow page over the
    ROC panel titles, the curves along y = 1 and the calibration points. Now one entry a line
    under the x-axis title, in a bottom margin that holds every entry, whatever the page width."""
    report = {**three_class, "risk_coverage": [{"coverage": 1.0, "accuracy": 0.8}], "coverage": 0.5,
              "accuracy_when_confident": 0.9}
    reports = {f"model {n} · out-of-fold (5-fold cross-validation), mean of 2 members": report for n in range(3)}
    fig = getattr(figures, f"{make}_figure")(reports)
    legend, margin = fig.layout.legend, fig.layout.margin
    assert (legend.orientation, legend.yref, legend.y, legend.yanchor) == ("v", "container", 0, "bottom")
    entries = legend_entries(fig)
    assert entries == 3 + (make != "roc")  # the models, plus 'perfect calibration' or the diamonds' key
    assert margin.b >= figures.BELOW_PLOT_PX + figures.LEGEND_LINE_PX * entries
    plot_height = fig.layout.height - margin.t - margin.b
    assert plot_height >= 300  # the figure grew by the legend; the plot kept its room


def test_roc_curves_stay_visible_where_they_run_together(three_class):
    fig = figures.roc_figure({"A": three_class, "B": three_class, "C": three_class})
    widths = [next(t for t in fig.data if t.name == name).line.width for name in "ABC"]
    assert widths[0] > widths[1] > widths[2] >= 1.5  # each drawn over the one before shows its edges
    for axis in (fig.layout.xaxis, fig.layout.yaxis3):
        assert axis.range[0] < 0 and axis.range[1] > 1 and axis.zeroline is False  # no line over x = 0 or y = 1


def test_training_curves_skip_missing_columns():
    fig = figures.training_curves([{"epoch": "1", "train_loss": "0.5"}])
    assert [t.name for t in fig.data] == ["training loss"]


# --------------------------------------------------------------------------- HTML report


def _images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in re.findall(r"data:image/png;base64,([^'\"]+)", html)]


def test_slice_report_is_self_contained_and_complete():
    overlay = figures.cam_overlay(np.full((32, 40), 0.3), np.eye(32, 40))
    html = slice_report(image=np.full((32, 40), 0.3, np.float32), filename="scan <1>.png", sha256="ab" * 32,
                        notes=["lung window: center -600 HU"],
                        results=[ModelResult("resnet50-lung", "2026-01-02T03:04:05", prediction(),
                                             {"alpha": "Alpha", "beta": "Beta"}, overlay, "Grad-CAM++", "Beta")])
    images = _images(html)
    assert [im.size for im in images] == [(40, 32), (40, 32)]
    assert images[1].mode == "RGB"
    for expected in ("resnet50-lung", "2026-01-02T03:04:05", "Beta (80% calibrated probability)", "80.0%", "20.0%",
                     "Grad-CAM++ for Beta", DISCLAIMER, "scan &lt;1&gt;.png", "lung window", "UTC"):
        assert expected in html, expected
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")
    unnamed = slice_report(image=np.full((32, 40), 0.3, np.float32),
                           results=[ModelResult("m", "v", prediction(), overlay=overlay, cam_method="Grad-CAM")])
    assert "alt='Grad-CAM overlay'" in unnamed and "m: Grad-CAM (warm colours" in unnamed
    assert "Grad-CAM for" not in unnamed
    assert "<title>CT slice report</title>" in unnamed and " file " not in unnamed  # no file named, none shown


def test_slice_report_states_uncertainty_and_reasons():
    from ctapp.inference import NOT_CHEST_CT, NOT_CT_REASON, UNLIKE_TRAINING, UNLIKE_TRAINING_REASON

    unlike = prediction(uncertain=True, out_of_distribution=True, confidence=0.55, state=UNLIKE_TRAINING,
                        reasons=[UNLIKE_TRAINING_REASON])
    html = slice_report(image=np.zeros((20, 20)), results=[ModelResult("m", "v", unlike)])
    assert "Unlike the training images: no reliable result" in html and "another scanner" in html
    assert "NOT A VALID RESULT" in html and "bar muted" in html
    assert "calibrated probability)" not in html
    not_ct = prediction(uncertain=True, out_of_distribution=True, confidence=0.9, state=NOT_CHEST_CT,
                        reasons=[NOT_CT_REASON])
    assert verdict(not_ct) == "Not a chest CT slice: no result."
    assert verdict(prediction(uncertain=True, confidence=0.6)).startswith("Uncertain: no confident answer")
    confident = slice_report(image=np.zeros((20, 20)), results=[ModelResult("m", "v", prediction(confidence=0.9))])
    assert "NOT A VALID RESULT" not in confident and "bar muted" not in confident


def test_another_finding_reads_as_no_result_in_the_report_and_the_tables():
    from ctapp.inference import OTHER_FINDING
    from ctapp.report import result_cell

    why = "another finding: covid-resnet50 sees COVID-19 here (91%; this rule withholds from 57%)"
    other = prediction(uncertain=True, confidence=0.9, state=OTHER_FINDING, reasons=[why])
    assert verdict(other) == "Another finding: not what this model was trained for, no result."
    assert result_cell(other) == "Another finding (no result)"
    html = slice_report(image=np.zeros((20, 20)), results=[ModelResult("m", "v", other)])
    assert "Another finding: not what this model was trained for" in html and "covid-resnet50 sees COVID-19" in html
    assert "NOT A VALID RESULT" in html and "calibrated probability)" not in html


def _summary(**kw):
    from ctapp.series import SeriesSummary

    values = dict(series="S1", slices=3, label="beta", verdict="Beta-like findings on 2 of 3 slices",
                  rule="a finding on at least 2 slices", confident_counts={"alpha": 0, "beta": 2}, uncertain=1,
                  uncertain_by_state={"uncertain": 1}, key_slices=[1], has_result=True)
    return SeriesSummary(**{**values, **kw})


def test_series_report_states_the_verdict_counts_key_slices_and_reading_notes():
    from ctapp.report import KeySlice, series_report

    grey = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))
    html = series_report(series_id="S1", description="3 slices", summary=_summary(), model_name="m",
                         model_version="", display_names={"alpha": "Alpha", "beta": "Beta"},
                         key_slices=[KeySlice(2, grey, None, prediction())],
                         notes=["slices <ordered> by position", "window: lung"])
    for expected in ("Beta-like findings on 2 of 3 slices", "version unknown",
                     "<tr><td>Beta</td><td class='num'>2</td></tr>", "<tr><td>Alpha</td><td class='num'>0</td></tr>",
                     "<tr><td>Uncertain (no result)</td><td class='num'>1</td></tr>",
                     "<td><strong>All slices</strong></td><td class='num'>3</td>", "Slice 2: Beta (80% calibrated",
                     "<h2>How the series was read</h2><ul><li>slices &lt;ordered&gt; by position</li><li>window: lung</li></ul>"):
        assert expected in html, expected
    assert "NOT A VALID RESULT" not in html and "Grad-CAM" not in html
    (shown,) = _images(html)
    np.testing.assert_array_equal(np.asarray(shown), np.round(grey * 255).astype(np.uint8))

    flagged = series_report(series_id="S1", description="", summary=_summary(has_result=False, verdict="No result"),
                            model_name="m", model_version="1", display_names={}, key_slices=[])
    assert "NOT A VALID RESULT" in flagged and "class='verdict flagged'" in flagged
    assert "Key slices" not in flagged and "How the series was read" not in flagged


def test_reports_are_stamped_in_utc_whatever_the_servers_time_zone(monkeypatch):
    """Reports say "UTC" next to their time, so the time must be UTC on a server
    set to another zone (a department's server usually is)."""
    import time
    from datetime import datetime, timedelta, timezone

    from ctapp.report import series_report

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30 all year: no summer-time edge
    time.tzset()
    try:
        reports = [slice_report(image=np.zeros((20, 20)), results=[ModelResult("m", "v", prediction())]),
                   series_report(series_id="S1", description="", summary=_summary(), model_name="m",
                                 model_version="1", display_names={}, key_slices=[])]
    finally:
        monkeypatch.undo()
        time.tzset()
    now = datetime.now(timezone.utc)
    for html in reports:
        stamp = re.search(r"Created (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", html).group(1)
        created = datetime.strptime(stamp, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
        assert timedelta(0) <= now - created < timedelta(minutes=2), stamp


def test_report_of_a_dicom_slice_has_no_patient_identifiers():
    from app_fixtures import PATIENT_ID, dicom_bytes

    image = decode(dicom_bytes())
    html = slice_report(image=image.pixels, results=[ModelResult("m", "v", prediction(notes=image.notes))],
                        filename="IM0001", notes=image.notes)
    for identifier in ("Doe", "Jane", PATIENT_ID, "19510203", "Nowhere"):
        assert identifier not in html


# --------------------------------------------------------------------------- reading view of a series


def _data_uri_image(uri: str) -> np.ndarray:
    (image,) = _images(uri)
    return np.asarray(image)


def test_display_adjustment_about_mid_grey():
    from ctapp.series_figures import adjust

    pixels = np.array([[0.0, 0.25, 0.5, 0.75, 1.0]], np.float32)
    np.testing.assert_allclose(adjust(pixels), pixels)
    np.testing.assert_allclose(adjust(pixels, contrast=2.0), [[0.0, 0.0, 0.5, 1.0, 1.0]])
    np.testing.assert_allclose(adjust(pixels, brightness=0.1), [[0.1, 0.35, 0.6, 0.85, 1.0]])


def test_slice_figure_shows_the_slice_pixel_for_pixel_and_a_colour_bar_only_with_a_map():
    from ctapp.series_figures import slice_figure

    grey = np.tile(np.linspace(0, 1, 30, dtype=np.float32), (20, 1))
    plain = slice_figure(grey)
    np.testing.assert_array_equal(_data_uri_image(plain.data[0].source), np.round(grey * 255).astype(np.uint8))
    assert len(plain.data) == 1
    assert tuple(plain.layout.xaxis.range) == (-0.5, 29.5) and tuple(plain.layout.yaxis.range) == (19.5, -0.5)
    cam = np.zeros((20, 30), np.float32)
    cam[5, 7] = 1.0
    with_map = slice_figure(grey, cam, opacity=0.5, revision="S1")
    np.testing.assert_array_equal(_data_uri_image(with_map.data[0].source), figures.cam_overlay(grey, cam, 0.5))
    assert with_map.data[1].marker.showscale and with_map.layout.uirevision == "S1"
    overshoot = grey.copy()
    overshoot[0, :2] = (1.4, -0.2)  # interpolation can overshoot [0, 1]: white and black, never wrapped
    np.testing.assert_array_equal(_data_uri_image(slice_figure(overshoot).data[0].source)[0, :2], [255, 0])


def test_probability_profile_marks_uncertain_slices_and_the_current_one():
    from ctapp.series import SeriesPredictions
    from ctapp.series_figures import probability_profile

    preds = [prediction(), prediction(uncertain=True, state="uncertain"), prediction(probabilities={"alpha": 0.9,
                                                                                                   "beta": 0.1})]
    result = SeriesPredictions(preds, ["alpha", "beta"], ["Alpha", "Beta"])
    fig = probability_profile(result, current=2)
    alpha, beta, flagged = fig.data
    assert list(alpha.x) == [1, 2, 3] and list(alpha.y) == [0.2, 0.2, 0.9] and list(beta.y) == [0.8, 0.8, 0.1]
    assert alpha.name == "Alpha" and alpha.line.color != beta.line.color
    assert list(flagged.x) == [2] and list(flagged.customdata) == ["uncertain"]
    assert fig.layout.shapes[0].x0 == 3  # slice numbers start at 1
    assert len(probability_profile(SeriesPredictions(preds[:1], ["alpha", "beta"], ["Alpha", "Beta"])).data) == 2


@pytest.mark.parametrize("event, expected", [
    ({"selection": {"points": [{"x": 1}]}}, 0), ({"selection": {"points": [{"x": 3.2}]}}, 2),
    ({"selection": {"points": [{"x": 4}]}}, None), ({"selection": {"points": [{"x": 0}]}}, None),
    ({"selection": {"points": []}}, None), ({"selection": {"points": [{"y": 0.5}]}}, None), (None, None),
    ({"selection": {"points": [[1, 0.5]]}}, None)])  # a point in a form it does not know: no slice, no error
def test_selected_slice_from_a_click_on_the_profile(event, expected):
    from types import SimpleNamespace

    from ctapp.series_figures import selected_slice

    assert selected_slice(event, 3) == expected
    if event is not None:  # Streamlit's event object: the same fields as attributes
        as_object = SimpleNamespace(selection=SimpleNamespace(points=event["selection"]["points"]))
        assert selected_slice(as_object, 3) == expected


def test_thumbnail_keeps_the_aspect_and_the_grey_levels():
    from ctapp.series_figures import thumbnail

    grey = np.full((60, 120), 1.5, np.float32)  # brighter than white: clipped, not wrapped around
    grey[:, :60] = 0.5
    small = _data_uri_image(thumbnail(grey, side=40))
    assert small.shape == (20, 40)
    assert small[:, :18].max() == small[:, :18].min() == 128 and small[:, 22:].min() == 255
    stripes = np.zeros((40, 40), np.float32)
    stripes[:, ::2] = 1.5
    assert (_data_uri_image(thumbnail(stripes, side=20)) == 128).all()  # clipped before shrinking
    assert _data_uri_image(thumbnail(np.zeros((400, 2), np.float32), side=40)).shape == (40, 1)
    assert _data_uri_image(thumbnail(np.zeros((2, 400), np.float32), side=40)).shape == (1, 40)


def test_a_float_image_becomes_png_pixels_clipped_to_black_and_white():
    from ctapp.report import png_data_uri

    # A blended overlay can round a hair outside [0, 1]: clipped, never wrapped around.
    image = np.array([[-0.01, 0.0, 0.5], [0.999, 1.0, 1.02]], np.float32)
    uri = png_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    np.testing.assert_array_equal(pixels, [[0, 0, 128], [255, 255, 255]])
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    again = np.asarray(Image.open(io.BytesIO(base64.b64decode(png_data_uri(rgb).split(",", 1)[1]))))
    np.testing.assert_array_equal(again, rgb)  # uint8 kept as it is


def test_report_images_are_stored_as_compact_as_pillow_can():
    """A report embeds a slice and its overlay per prediction: the PNGs are
    written with Pillow's optimiser (the HTML stays small enough to mail)."""
    from ctapp.report import png_data_uri

    ramp = np.linspace(0, 1, 128 * 128, dtype=np.float32).reshape(128, 128)
    overlay = np.stack([ramp, ramp.T, np.roll(ramp, 17, axis=0)], axis=-1)
    pixels = np.round(overlay * 255).astype(np.uint8)
    stored = base64.b64decode(png_data_uri(overlay).split(",", 1)[1])
    buffers = {optimize: io.BytesIO() for optimize in (False, True)}
    for optimize, buffer in buffers.items():
        Image.fromarray(pixels).save(buffer, format="PNG", optimize=optimize)
    assert len(buffers[True].getvalue()) < len(buffers[False].getvalue())
    assert len(stored) == len(buffers[True].getvalue())


# --------------------------------------------------------------------------- the shipped models' cards and charts

MODELS = REPO / "models"


@pytest.mark.parametrize("task, target", [("lung", 0.95), ("covid", 0.9)])
def test_the_selective_answers_chart_draws_the_target_the_cards_record(task, target):
    """Issue 24 item 10: the lung chart said 'target 90%' (a default) where the card says 95%."""
    from ctapp.model_folders import list_models
    from pages.compare import ReportEntry, target_accuracies

    models = [m for m in list_models([MODELS]) if m.name.startswith(f"{task}-")]
    assert len(models) == 3
    chosen = [ReportEntry(m.name, m, m.report_path, json.loads(m.report_path.read_text())) for m in models]
    assert target_accuracies(chosen) == [target] * 3
    fig = figures.risk_coverage_figure({e.label: e.report for e in chosen}, target=target_accuracies(chosen))
    assert [a.text for a in fig.layout.annotations] == [f"target {target:.0%}"]


@pytest.mark.parametrize("task", ["lung", "covid"])
def test_an_ensemble_card_compares_its_members_in_a_table_and_shows_their_sections(task):
    from pages.model_card import fmt, member_comparison_rows, side_by_side

    card = json.loads((MODELS / f"{task}-ensemble" / "model_card.json").read_text())
    members = {name: json.loads((MODELS / name / "model_card.json").read_text()) for name in card["members"]}
    rows = member_comparison_rows(card)
    assert [r["Model"] for r in rows] == [f"{task}-ensemble (the ensemble)", *card["members"]]
    assert rows[0]["Accuracy"] == f"{card['member_comparison']['ensemble']['accuracy']:.1%}"
    assert rows[1]["Macro-F1"] == f"{card['member_comparison'][card['members'][0]]['macro_f1']:.3f}"
    assert not card.get("preprocessing") and not card.get("out_of_distribution")  # none of its own
    for section, field in (("preprocessing", "img size"), ("out_of_distribution", "threshold")):
        table = {row["Field"]: row for row in side_by_side(members, section)}
        assert list(next(iter(table.values()))) == ["Field", *card["members"]]
        key = field.replace(" ", "_")
        assert [table[field][m] for m in card["members"]] == [fmt(members[m][section][key]) for m in card["members"]]
