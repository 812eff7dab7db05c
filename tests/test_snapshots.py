"""Reviewed snapshots of what people read: every command's ``--help``, the
dashboard's figures and tables, and the HTML reports, for fixed inputs.

Other tests check what these outputs mean (the right numbers in the right
places); these keep everything else (wording, layout, colours, hover text) from
changing unnoticed. A change is made on purpose: rerun with
``CTAPP_UPDATE_SNAPSHOTS=1`` and review the diff of ``tests/golden/snapshots/``
with the code. Numbers compare to a relative 1e-9 and images by their pixels,
so neither the CPU nor the PNG encoder's version matters.
"""
from __future__ import annotations

import hashlib
import importlib
from datetime import datetime, timezone

import numpy as np
import pytest
from snapshot import check, figure_data
from synthetic import prediction

from ctapp import figures, series_figures
from ctapp.report import KeySlice, ModelResult, series_report, slice_report

CREATED = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)

# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("module", ["training.fit", "training.evaluate", "training.audit", "training.ensemble",
                                    "training.models_table", "ctapp.predict"])
def test_command_line_help(module, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = importlib.import_module(module).get_args_parser()
    parser.prog = f"python -m {module}"
    check(f"help-{module}", parser.format_help())


# --------------------------------------------------------------------------- dashboard


def _history() -> list[dict]:
    rows = []
    for run, shift in (("fold-0", 0.0), ("fold-1", 0.1), ("full", 0.2)):
        for epoch in (1, 2, 3):
            row = {"run": run, "epoch": epoch, "lr": 0.001 / epoch, "train_loss": 1.0 / epoch + shift,
                   "train_accuracy": 0.5 + 0.1 * epoch}
            if run != "full":
                row.update(val_loss=1.1 / epoch + shift, val_accuracy=0.45 + 0.1 * epoch, val_macro_f1=0.4 + 0.1 * epoch,
                           val_auc=0.6 + 0.1 * epoch, val_ece=0.1 / epoch)
            rows.append(row)
    return rows


def _selective(report: dict, coverage: float, accuracy: float) -> dict:
    curve = [{"coverage": c, "accuracy": 1.0 - 0.3 * c} for c in (0.1, 0.4, 0.7, 1.0)]
    return {**report, "risk_coverage": curve, "coverage": coverage, "accuracy_when_confident": accuracy,
            "fold_spread": {"accuracy": {"mean": report["accuracy"], "std": 0.03},
                            "macro_f1": {"mean": report["macro_f1"], "std": 0.04}}}


def test_dashboard_figures(three_class, binary):
    names = {"alpha": "Alpha", "beta": "Beta"}
    check("probability-bars", figure_data(figures.probability_bars({"alpha": 0.2, "beta": 0.8}, names, threshold=0.75)))
    check("probability-bars-muted", figure_data(figures.probability_bars({"alpha": 0.45, "beta": 0.55}, names,
                                                                     threshold=0.75, muted=True, title="Uncertain")))
    check("roc", figure_data(figures.roc_figure({"A": three_class, "B": three_class}, title="ROC")))
    check("roc-binary", figure_data(figures.roc_figure({"B": binary})))
    check("confusion", figure_data(figures.confusion_figure(three_class)))
    check("confusion-normalised", figure_data(figures.confusion_figure(three_class, normalize=True, title="Recall")))
    four = {"class_names": ["a", "b", "c", "d"], "display_names": ["Adenocarcinoma", "Large cell carcinoma",
                                                                    "Normal", "Squamous cell carcinoma"],
            "confusion_matrix": [[5, 1, 0, 0], [0, 4, 1, 0], [0, 0, 6, 0], [1, 0, 0, 3]]}
    check("confusion-four-classes", figure_data(figures.confusion_figure(four)))  # long names: tilted labels
    check("reliability", figure_data(figures.reliability_figure({"A": three_class, "B": binary})))
    check("risk-coverage", figure_data(figures.risk_coverage_figure(
        {"A": _selective(three_class, 0.6, 0.93), "B": _selective(binary, 0.5, 0.9)}, target=0.9)))
    check("training-curves", figure_data(figures.training_curves(_history(), title="Training")))


def test_dashboard_tables(three_class, binary):
    reports = {"A": _selective(three_class, 0.6, 0.93), "B": {**binary, "split": "valid"}}
    cards = {"A": {"size_bytes": 20_400_000, "latency_ms": {"predict": 41.0, "predict_gradcam": 180.0}}}
    rows = figures.metrics_table(reports, cards)
    check("metrics-table", {"rows": rows, "by_model": figures.metrics_by_model(rows),
                            "per_class": figures.per_class_table(reports)})


def test_reading_view_figures():
    from ctapp.series import SeriesPredictions

    grey = np.tile(np.linspace(0, 1, 24, dtype=np.float32), (16, 1))
    cam = np.outer(np.hanning(16), np.hanning(24)).astype(np.float32)
    check("slice-with-map", figure_data(series_figures.slice_figure(grey, cam, opacity=0.5, revision="S1")))
    check("slice", figure_data(series_figures.slice_figure(grey)))
    preds = [prediction(), prediction(uncertain=True, state="low confidence"),
             prediction(probabilities={"alpha": 0.9, "beta": 0.1}, label="alpha", display_label="Alpha")]
    result = SeriesPredictions(preds, ["alpha", "beta"], ["Alpha", "Beta"])
    check("probability-profile", figure_data(series_figures.probability_profile(result, current=1)))


# --------------------------------------------------------------------------- reports


def test_html_reports():
    from ctapp.inference import UNLIKE_TRAINING, UNLIKE_TRAINING_REASON
    from ctapp.series import SeriesSummary

    grey = np.tile(np.linspace(0, 1, 24, dtype=np.float32), (16, 1))
    overlay = figures.cam_overlay(grey, np.eye(16, 24))
    names = {"alpha": "Alpha", "beta": "Beta (task name)"}  # the task's names win over the model's own
    confident = ModelResult("lung-vgg19_bn", "2026-01-01T00:00:00", prediction(), names, overlay, "Grad-CAM", "Beta")
    unlike = ModelResult("lung-resnet50", "2026-01-01T00:00:00", prediction(
        uncertain=True, out_of_distribution=True, confidence=0.55, state=UNLIKE_TRAINING,
        reasons=[UNLIKE_TRAINING_REASON, "low confidence"]), names)
    check("report-slice", slice_report(image=grey, results=[confident, unlike], filename="slice <1>.png",
                                       sha256="ab" * 32, notes=["lung window: center -600 HU"], created=CREATED))
    summary = SeriesSummary(series="S-1", slices=3, label="beta", verdict="Beta-like findings on 2 of 3 slices",
                            rule="a finding on at least 2 slices", confident_counts={"alpha": 0, "beta": 2},
                            uncertain=1, uncertain_by_state={"low confidence": 1}, key_slices=[1], has_result=True)
    check("report-series", series_report(series_id="S-1", description="3 slices", summary=summary,
                                         model_name="lung-vgg19_bn", model_version="2026-01-01", display_names=names,
                                         key_slices=[KeySlice(2, grey, overlay, prediction())],
                                         notes=["slices ordered by position"], created=CREATED))


def test_command_text_outputs(tmp_path):
    from synthetic import write_classes

    from ctapp.audit import audit_dataset
    from ctapp.data import scan_dataset
    from ctapp.inference import LOW_CONFIDENCE
    from ctapp.predict import _error, _text_series, _text_slice
    from ctapp.series import SeriesPredictions
    from ctapp.volumes import Series
    from training.audit import summary_text

    confident = prediction()
    weak = prediction(uncertain=True, state=LOW_CONFIDENCE, confidence=0.55, reasons=["low confidence"],
                      probabilities={"alpha": 0.45, "beta": 0.55})
    series = Series("S-1", "DICOM", np.zeros((2, 8, 8), np.int16), ["IM1", "IM2"], positions=[0.0, 2.5],
                    spacing=(0.7, 0.7), modality="CT", orientation="axial")
    result = SeriesPredictions([confident, weak], ["alpha", "beta"], ["Alpha", "Beta"])
    lines = [_text_slice("a.png", confident), _text_slice("b.png", weak), *_text_series(series, result),
             _error("c.png", "c.png: not an image file", False), _error("c.png", "c.png: not an image file", True)]
    check("predict-text", "\n".join(lines))

    data = tmp_path / "data"
    write_classes(data / "train", ["alpha", "beta"], 6, size=32)
    write_classes(data / "valid", ["alpha", "beta"], 2, size=32, seed=1, start=50)
    (data / "valid" / "beta" / "copy.png").write_bytes((data / "train" / "beta" / "beta (0).png").read_bytes())
    report = audit_dataset(scan_dataset(data), workers=1).to_dict()
    check("audit-summary", summary_text(report).replace(str(data), "<data>"))


def test_what_decoding_says_about_each_awkward_input(tmp_path, monkeypatch):
    """Word for word, the error or the notes a user reads for every awkward file of the robustness suite
    (tests elsewhere check their key words; here every word counts)."""
    from bad_inputs import SMALL_FILE_LIMIT, bad_input_cases

    import ctapp.imaging as imaging

    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", SMALL_FILE_LIMIT)
    lines = []
    for case in bad_input_cases(tmp_path):
        try:
            image = imaging.decode(case.path)
        except imaging.ImageDecodeError as exc:
            lines.append(f"{case.name}: refused: {exc}")
        else:
            lines.append(f"{case.name}: {image.source_format} {image.mode} {image.size}: {image.notes}")
    check("decode-messages", "\n".join(lines))


def test_generated_images():
    """The foreign images every card's 'not a chest CT' figure is measured on, and the CT phantom of the
    benchmarks: their pixels, so a change to them is seen (and the cards' figures measured again)."""
    from training.foreign import ct_phantom, foreign_images

    images = {**foreign_images(), "ct_phantom": ct_phantom(128)}
    check("generated-images", {name: {"shape": list(a.shape), "dtype": str(a.dtype), "mean": round(float(a.mean()), 6),
                                      "pixels": hashlib.sha256(a.tobytes()).hexdigest()[:16]}
                               for name, a in images.items()})
