"""Figures and tables of the app, as plain functions: each takes an evaluation
report (or a prediction, per-image rows, a training history) and returns a
plotly figure, a list of table rows or an RGB array. Nothing here knows about
Streamlit, so every chart can be tested without a browser.

Reports are the dictionaries of :func:`ctapp.metrics.evaluation_report`;
functions comparing models take a mapping ``{label: report}`` and keep its order.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ctapp.metrics import few_images_note
from ctapp.precision import INFERENCE_AMP_ENV

# Calm, colour-blind-friendly colours (Okabe-Ito, darkened blue first); one per model.
PALETTE = ("#1f6f8b", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#7f7f7f")
ACCENT = PALETTE[0]
MUTED = "#b8c4cc"
GRID = "#e5e9ec"
FONT = {"family": "Source Sans Pro, Helvetica, Arial, sans-serif", "size": 13, "color": "#1b2631"}


def model_color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _layout(fig: go.Figure, *, title: str | None = None, height: int | None = None) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}} if title else None,
        height=height, font=FONT, template="plotly_white",
        margin={"l": 10, "r": 10, "t": 50 if title else 30, "b": 10},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0},
    )
    return fig


LEGEND_LINE_PX = 24  # one legend entry per line (with the gap between legend groups)
BELOW_PLOT_PX = 70  # the x-axis tick labels and title under the plot


def _legend_below(fig: go.Figure, entries: int) -> go.Figure:
    """The legend in space of its own under the x-axis title, one entry a line,
    the figure taller by as much. A horizontal legend above the plot wraps on a
    narrow page into panel titles and the top of the plot (curves along y = 1)."""
    legend_px = LEGEND_LINE_PX * entries + 10
    fig.update_layout(height=(fig.layout.height or 450) + legend_px, margin={"b": BELOW_PLOT_PX + legend_px},
                      legend={"orientation": "v", "tracegroupgap": 4, "yref": "container", "y": 0, "yanchor": "bottom",
                              "xref": "paper", "x": 0, "xanchor": "left"})
    return fig


def _display(report: Mapping) -> dict[str, str]:
    """Class key -> readable name, from a report (or a model card)."""
    keys = list(report.get("class_names") or report.get("classes") or [])
    names = list(report.get("display_names") or keys)
    return dict(zip(keys, names))


# --------------------------------------------------------------------------- one prediction


def probability_bars(probabilities: Mapping[str, float], display_names: Mapping[str, str] | Sequence[str] | None = None,
                     *, predicted: str | None = None, threshold: float | None = None,
                     title: str | None = None, muted: bool = False) -> go.Figure:
    """Horizontal bars of calibrated class probabilities, in the model's class
    order; the predicted class in the accent colour, a dashed line at the
    confidence threshold below which the app calls a result uncertain. With
    ``muted`` (an uncertain answer) every bar is grey: nothing stands out as a result."""
    keys = list(probabilities)
    if display_names is None:
        names = keys
    elif isinstance(display_names, Mapping):
        names = [display_names.get(k, k) for k in keys]
    else:
        names = list(display_names)
    values = [float(probabilities[k]) for k in keys]
    if predicted is None and keys:
        predicted = keys[int(np.argmax(values))]
    colors = [ACCENT if k == predicted and not muted else MUTED for k in keys]
    fig = go.Figure(go.Bar(
        x=values, y=names, orientation="h", marker_color=colors,
        text=[f"{v:.0%}" if v >= 0.005 else "<1%" for v in values], textposition="outside", cliponaxis=False,
        hovertemplate="%{y}: %{x:.1%}<extra></extra>",
    ))
    if threshold is not None:
        fig.add_vline(x=threshold, line={"color": "#7f8c8d", "dash": "dash", "width": 1},
                      annotation={"text": f"confidence threshold {threshold:.0%}", "font": {"size": 11},
                                      "yanchor": "bottom"}, annotation_position="top")
    fig.update_xaxes(range=[0, 1.12], tickformat=".0%", title="calibrated probability", gridcolor=GRID,
                     tickvals=[0, 0.25, 0.5, 0.75, 1.0])
    fig.update_yaxes(autorange="reversed", automargin=True)
    _layout(fig, title=title, height=90 + 42 * len(keys) + (30 if threshold is not None else 0))
    fig.update_layout(showlegend=False, margin={"t": 60 if title or threshold is not None else 20})
    return fig


def cam_overlay(grey: np.ndarray, cam: np.ndarray, opacity: float = 0.4,
                colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """RGB uint8 image: the grey slice blended with a colour map of the
    class-activation map (``opacity`` 0 shows the slice only, 1 the map only),
    as pytorch-grad-cam's ``show_cam_on_image`` draws it."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
    grey = np.asarray(grey)
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    base = grey.astype(np.float32) / 255.0 if grey.dtype == np.uint8 else np.clip(grey.astype(np.float32), 0, 1)
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0)
    if cam.shape != base.shape:
        cam = cv2.resize(cam, (base.shape[1], base.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.round(np.clip(cam, 0, 1) * 255).astype(np.uint8), colormap)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    blended = (1.0 - opacity) * base[..., None] + opacity * heat
    return np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- evaluation reports


def roc_figure(reports: Mapping[str, Mapping], *, title: str | None = None) -> go.Figure:
    """One-vs-rest ROC curves, one panel per class and one line per model, with
    each model's AUC written in the panel. Binary tasks show the positive class."""
    reports = {k: r for k, r in reports.items() if r}
    first = next(iter(reports.values()), {})
    display = _display(first)
    classes = list(display)
    if len(classes) == 2 and first.get("positive_class") in classes:
        classes = [first["positive_class"]]
    cols = min(len(classes), 2) or 1
    rows = max(1, math.ceil(len(classes) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[display[c] for c in classes] or ["ROC"],
                        horizontal_spacing=0.08, vertical_spacing=0.14)
    for i, cls in enumerate(classes):
        row, col = i // cols + 1, i % cols + 1
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"color": "#aab4bb", "dash": "dot", "width": 1},
                                 hoverinfo="skip", showlegend=False), row=row, col=col)
        lines = []
        for m, (label, report) in enumerate(reports.items()):
            curve = (report.get("roc_curves") or {}).get(cls)
            auc = ((report.get("roc_auc") or {}).get("per_class") or {}).get(cls)
            color = model_color(m)
            lines.append(f"<span style='color:{color}'>{label}: AUC {'n/a' if auc is None else f'{auc:.3f}'}</span>")
            if not curve:
                continue
            # Curves share long runs (up the y axis, along y = 1): each drawn thinner than the one
            # before, so that every model's colour shows at its edges.
            fig.add_trace(go.Scatter(
                x=curve["fpr"], y=curve["tpr"], mode="lines", name=label, legendgroup=label, showlegend=i == 0,
                line={"color": color, "width": 1.5 + 1.25 * (len(reports) - 1 - m), "shape": "hv"},
                hovertemplate=f"{label}<br>false positive rate %{{x:.2f}}<br>true positive rate %{{y:.2f}}<extra></extra>",
            ), row=row, col=col)
        axis = "" if i == 0 else str(i + 1)
        fig.add_annotation(xref=f"x{axis} domain", yref=f"y{axis} domain", x=0.98, y=0.02, xanchor="right",
                           yanchor="bottom", align="right", showarrow=False, text="<br>".join(lines),
                           bgcolor="rgba(255,255,255,0.85)", font={"size": 12})
    # A margin round the unit square, and no zero lines drawn over the curves that run along x = 0.
    fig.update_xaxes(range=[-0.02, 1.02], title="false positive rate (1 - specificity)", gridcolor=GRID,
                     zeroline=False)
    fig.update_yaxes(range=[-0.02, 1.04], title="true positive rate (sensitivity)", gridcolor=GRID, zeroline=False)
    _layout(fig, title=title, height=60 + 380 * rows)
    return _legend_below(fig, len(reports))


def confusion_figure(report: Mapping, *, normalize: bool = False, title: str | None = None) -> go.Figure:
    """Confusion matrix heat map, true class down, predicted class across; with
    ``normalize`` each row is divided by its total (the per-class recall on the
    diagonal) and the counts stay in the cell text."""
    display = _display(report)
    names = list(display.values())
    counts = np.asarray(report.get("confusion_matrix") or np.zeros((len(names), len(names))), dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    z = shares if normalize else counts
    text = [[f"{shares[i, j]:.0%}<br>({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
             for j in range(counts.shape[1])] for i in range(counts.shape[0])]
    fig = go.Figure(go.Heatmap(
        z=z, x=names, y=names, text=text, texttemplate="%{text}", textfont={"size": 13},
        colorscale="Blues", zmin=0, zmax=1 if normalize else max(float(counts.max()), 1.0),
        colorbar={"title": "share of row" if normalize else "images", "tickformat": ".0%" if normalize else None,
                      "thickness": 12},
        hovertemplate="true %{y}<br>predicted %{x}<br>%{text}<extra></extra>",
    ))
    fig.update_xaxes(title="predicted class", side="bottom", tickangle=0 if len(names) <= 3 else -20, automargin=True)
    fig.update_yaxes(title="true class", autorange="reversed", automargin=True)
    side = 130 + 70 * len(names)
    return _layout(fig, title=title, height=max(320, side))


def reliability_figure(reports: Mapping[str, Mapping], *, title: str | None = None) -> go.Figure:
    """Reliability diagram: accuracy against mean confidence per confidence bin
    (perfect calibration on the diagonal), with the number of images per bin below."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
    n_models = max(len(reports), 1)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line={"color": "#aab4bb", "dash": "dot", "width": 1}, hoverinfo="skip"), row=1, col=1)
    for m, (label, report) in enumerate(reports.items()):
        bins = report.get("reliability") or []
        if not bins:
            continue
        color = model_color(m)
        ece = report.get("ece")
        name = f"{label} (ECE {ece:.3f})" if ece is not None else label
        counts = np.array([b["count"] for b in bins], dtype=float)
        sizes = 6 + 14 * np.sqrt(counts / counts.max())
        fig.add_trace(go.Scatter(
            x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], mode="lines+markers", name=name,
            legendgroup=label, line={"color": color, "width": 2}, marker={"size": sizes, "color": color},
            customdata=[[b["low"], b["high"], b["count"]] for b in bins],
            hovertemplate=(f"{label}<br>confidence %{{customdata[0]:.2f}}-%{{customdata[1]:.2f}}"
                           "<br>mean confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata[2]} images<extra></extra>"),
        ), row=1, col=1)
        # Each model's bar takes its share of the bin, side by side.
        share = [(b["high"] - b["low"]) / n_models for b in bins]
        fig.add_trace(go.Bar(
            x=[b["low"] for b in bins], y=counts, width=[w * 0.9 for w in share], offset=[m * w for w in share],
            marker_color=color, opacity=0.8, name=label, legendgroup=label, showlegend=False,
            hovertemplate=f"{label}<br>%{{y}} images<extra></extra>",
        ), row=2, col=1)
    fig.update_xaxes(range=[0, 1], gridcolor=GRID)
    fig.update_xaxes(title="confidence (calibrated top-class probability)", row=2, col=1)
    fig.update_yaxes(range=[0, 1.02], title="accuracy", gridcolor=GRID, row=1, col=1)
    fig.update_yaxes(title="images", gridcolor=GRID, row=2, col=1)
    fig.update_layout(barmode="overlay")
    _layout(fig, title=title, height=520)
    return _legend_below(fig, 1 + sum(bool(r.get("reliability")) for r in reports.values()))


# --------------------------------------------------------------------------- training history

HISTORY_PANELS = (
    ("Loss", (("train_loss", "training loss"), ("val_loss", "validation loss"))),
    ("Accuracy and macro-F1", (("train_accuracy", "training accuracy"), ("val_accuracy", "validation accuracy"),
                               ("val_macro_f1", "validation macro-F1"))),
    ("Validation AUC and calibration error", (("val_auc", "validation ROC AUC"), ("val_ece", "validation ECE"))),
    ("Learning rate", (("lr", "learning rate"),)),
)


def risk_coverage_figure(reports: Mapping[str, Mapping], *, target: float | Sequence[float] | None = None,
                         title: str | None = None) -> go.Figure:
    """Accuracy of the answered slices against the share answered, the most
    confident first (``risk_coverage`` of each report), with each model's
    operating point (a diamond: where its confidence threshold answers) and the
    target accuracy its threshold was chosen for (one line per distinct
    ``target``, as the model cards record it; none when not given)."""
    fig = go.Figure()
    shipped = 0
    for n, (label, r) in enumerate(reports.items()):
        curve = r.get("risk_coverage") or []
        if not curve:
            continue
        fig.add_trace(go.Scatter(x=[c["coverage"] for c in curve], y=[c["accuracy"] for c in curve],
                                 mode="lines", name=str(label), line={"color": model_color(n), "width": 2},
                                 legendgroup=str(label),
                                 hovertemplate="answers %{x:.0%} of slices: right %{y:.1%}<extra></extra>"))
        if r.get("coverage") is not None and r.get("accuracy_when_confident") is not None:
            shipped += 1
            fig.add_trace(go.Scatter(x=[r["coverage"]], y=[r["accuracy_when_confident"]], mode="markers",
                                     name=f"{label}: as shipped", legendgroup=str(label), showlegend=False,
                                     marker={"color": model_color(n), "size": 11, "symbol": "diamond"},
                                     hovertemplate="as shipped: answers %{x:.0%}, right %{y:.1%}<extra></extra>"))
    if shipped:  # one legend entry says what every diamond is
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="as shipped (its confidence threshold)",
                                 marker={"color": "#7f8c8d", "size": 11, "symbol": "diamond"}, hoverinfo="skip"))
    targets = [] if target is None else [target] if isinstance(target, (int, float)) else list(target)
    for value in sorted(set(targets)):
        fig.add_hline(y=value, line={"color": "#7f8c8d", "dash": "dash", "width": 1},
                      annotation={"text": f"target {value:.0%}", "font": {"size": 11}})
    fig.update_xaxes(range=[0, 1.02], tickformat=".0%", title="share of slices answered", gridcolor=GRID)
    fig.update_yaxes(range=[0, 1.04], tickformat=".0%", title="accuracy of the answers", gridcolor=GRID)
    _layout(fig, title=title, height=420)
    return _legend_below(fig, sum(bool(r.get("risk_coverage")) for r in reports.values()) + bool(shipped))


def read_history(path: str | Path) -> list[dict]:
    """Rows of a ``history.csv`` with numbers as floats (empty or 'nan' as None)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value if value not in ("", None) else None
    return None if math.isnan(number) else number


def fold_mean_history(rows: Sequence[Mapping]) -> list[dict]:
    """A cross-validated run's history (a 'run' column: fold-0, fold-1, ..., full)
    as one curve: per epoch, the mean over the folds. Other histories pass through."""
    if not rows or "run" not in rows[0]:
        return list(rows)
    folds = [r for r in rows if str(r.get("run", "")).startswith("fold-")]
    by_epoch: dict = {}
    for r in folds:
        by_epoch.setdefault(r.get("epoch"), []).append(r)
    out = []
    for epoch, group in sorted(by_epoch.items(), key=lambda item: item[0] or 0):
        row = {"epoch": epoch, "folds": len(group)}
        for key in group[0]:
            values = [g.get(key) for g in group if isinstance(g.get(key), (int, float))]
            if key not in ("epoch", "run") and values:
                row[key] = float(np.mean(values))
        out.append(row)
    return out


def training_curves(history: Sequence[Mapping] | str | Path, *, title: str | None = None) -> go.Figure:
    """Loss, accuracy/macro-F1, validation AUC/ECE and learning rate per epoch
    (a cross-validated run: the mean over its folds, each on its held-out fold)."""
    rows = read_history(history) if isinstance(history, (str, Path)) else [
        {k: _number(v) for k, v in row.items()} for row in history]
    rows = fold_mean_history(rows)
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[0] for p in HISTORY_PANELS],
                        horizontal_spacing=0.09, vertical_spacing=0.16)
    epochs = [r.get("epoch") for r in rows]
    n = 0
    for p, (_, series) in enumerate(HISTORY_PANELS):
        row, col = p // 2 + 1, p % 2 + 1
        for column, name in series:
            values = [r.get(column) for r in rows]
            if all(v is None for v in values):
                continue
            fig.add_trace(go.Scatter(x=epochs, y=values, mode="lines+markers", name=name,
                                     line={"color": model_color(n), "width": 2}, marker={"size": 5},
                                     hovertemplate=f"{name}<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>"),
                          row=row, col=col)
            n += 1
    numbers = [e for e in epochs if isinstance(e, (int, float))]
    fig.update_xaxes(title="epoch", gridcolor=GRID, tick0=1, dtick=max(1, math.ceil(len(numbers) / 10)))
    fig.update_yaxes(gridcolor=GRID)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], row=2, col=1)
    fig.update_yaxes(exponentformat="e", row=2, col=2)
    _layout(fig, title=title, height=620)
    fig.update_layout(legend={"y": -0.12, "yanchor": "top", "orientation": "h"}, margin={"b": 60})
    return fig


# --------------------------------------------------------------------------- comparison tables


def _size_mb(card: Mapping) -> float | None:
    size = card.get("size_bytes")
    return round(size / 1e6, 1) if isinstance(size, (int, float)) else None


def card_latency_ms(card: Mapping) -> dict[str, float]:
    """CPU milliseconds per slice that the model card records: ``predict`` and
    ``predict_gradcam`` (``latency_ms`` as training writes it: a mapping, or
    one number for prediction alone); empty when the card has none."""
    value = card.get("latency_ms")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"predict": float(value)}
    if isinstance(value, Mapping):
        return {k: float(value[k]) for k in ("predict", "predict_gradcam")
                if isinstance(value.get(k), (int, float)) and not isinstance(value.get(k), bool)}
    return {}


def _formatted(value, spec: str) -> str | None:
    """A recorded number in ``spec``; None for anything else."""
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def int8_agreement(calibration: Mapping | None) -> dict[str, str]:
    """How far the int8 network's answers landed from fp32 on the slices of the
    model's evaluation report, as a model folder's calibration file
    (``quantization.json``, ``python -m training.quantize``) records it:
    field -> value in words; empty when it records none."""
    figures = (calibration or {}).get("agreement")
    if not isinstance(figures, Mapping) or not figures.get("slices"):
        return {}
    changed = figures.get("states_changed")
    where = ", ".join(str(figures[k]) for k in ("date", "machine", "measured_by") if figures.get(k))
    rows = {
        "Slices compared": _formatted(figures["slices"], ","),
        "Answer state kept": _formatted(figures.get("state_agreement"), ".1%"),
        "Label kept": _formatted(figures.get("label_agreement"), ".1%"),
        "|Δp|, 99th percentile": _formatted(figures.get("p99_abs_dp"), ".3f"),
        "|Δp|, largest": _formatted(figures.get("max_abs_dp"), ".3f"),
        "States changed": ", ".join(f"{k}: {v}" for k, v in changed.items()) if isinstance(changed, Mapping)
        and changed else None,
        "Measured": where or None,
    }
    return {field: value for field, value in rows.items() if value is not None}


INT8_OPT_IN = (f"int8 is opt-in: this server answers in int8 only when it is started with {INFERENCE_AMP_ENV}=int8 "
               "(fp32 otherwise, bf16 where the CPU has native bf16 kernels). |Δp| is the largest change of a "
               "class probability per slice against fp32.")


def chest_check_summary(card: Mapping | None) -> tuple[str, list[dict]]:
    """The chest-CT check beside a model as its card (``chest_check.json``,
    ``python -m training.chest_check``) records it: a sentence, and one row per
    set of images (out of fold per source; the foreign-image set per kind, by the
    check as shipped and by the check trained without that kind). Empty when
    the card records no figures."""
    figures = (card or {}).get("figures")
    if not isinstance(figures, Mapping) or not isinstance(figures.get("out_of_fold"), Mapping):
        return "", []
    chest = figures["out_of_fold"]
    slices = sum(int(f.get("slices", 0)) for f in chest.values())
    refused = sum(round(float(f.get("refused", 0)) * int(f.get("slices", 0))) for f in chest.values())
    sentence = (f"Before any model of this directory answers, a small network asks whether the slice is an axial "
                f"chest CT slice; below a score of {_formatted(card.get('threshold'), '.1%')} the slice is 'not a "
                f"chest CT' for every model. Trained with outlier exposure (python -m training.chest_check): out of "
                f"fold, with patients kept whole, it refused {refused} of {slices:,} chest CT slices. A kind left "
                "out of its training is refused less often: it knows the kinds of image it was shown.")
    rows = [{"Images": f"chest CT, out of fold: {source}", "Count": int(f.get("slices", 0)),
             "Refused": _formatted(f.get("refused"), ".1%"), "Refused, kind left out of training": None}
            for source, f in chest.items()]
    left_out = figures.get("leave_one_kind_out") or {}
    for kind, f in (figures.get("foreign_set") or {}).items():
        rows.append({"Images": f"foreign: {kind}", "Count": int(f.get("images", 0)),
                     "Refused": _formatted(f.get("refused_by_check"), ".0%"),
                     "Refused, kind left out of training": _formatted((left_out.get(kind) or {}).get(
                         "refused_by_check"), ".0%")})
    return sentence, rows


def scope_summary(scope: Mapping | None) -> tuple[str, list[dict]]:
    """A model's scope rule as its ``scope.json`` (``python -m training.scope``)
    records it: a sentence, and one row for the model's own out-of-fold slices
    and one per source of slices showing the other finding. Empty without one."""
    rule = (scope or {}).get("rule")
    own = (scope or {}).get("own_out_of_fold")
    if not isinstance(rule, Mapping) or not isinstance(own, Mapping):
        return "", []
    says = rule.get("says", "another finding")
    finder = Path(str(rule.get("model", ""))).name
    sentence = (f"This model is for {rule.get('scope', 'its own classes')}. Where {finder} gives {says} a "
                f"probability of {_formatted(rule.get('min_probability'), '.0%')} or more, a confident answer becomes "
                f"'another finding: not what this model was trained for'. Threshold: {scope.get('chosen_by', '')}. "
                "Every figure is of slices neither model trained on.")
    before, after = own.get("before") or {}, own.get("after") or {}
    rows = [{"Slices": "this model's own, out of fold", "Count": own.get("slices"),
             "Answered (before -> with the rule)": f"{before.get('answered')} -> {after.get('answered')}",
             "Naming a finding class (before -> with the rule)": None,
             "Accuracy when answered (before -> with the rule)":
                 f"{_formatted(before.get('accuracy_when_confident'), '.1%')} -> "
                 f"{_formatted(after.get('accuracy_when_confident'), '.1%')}"}]
    for source, f in (scope.get("finding_slices") or {}).items():
        rows.append({"Slices": f"{says}: {source}", "Count": f.get("slices"),
                     "Answered (before -> with the rule)": f"{f.get('answered_before')} -> {f.get('answered_after')}",
                     "Naming a finding class (before -> with the rule)":
                         f"{f.get('finding_class_before')} -> {f.get('finding_class_after')}",
                     "Accuracy when answered (before -> with the rule)": None})
    return sentence, rows


SPLIT_NAMES = {"valid": "validation split", "test": "test split", "train": "training split"}


def evaluated_on(report: Mapping) -> str:
    """Where a report's images came from, in words."""
    if report.get("evaluated_on"):
        return str(report["evaluated_on"])
    split = report.get("split") or ""
    if split and split != "all":
        return SPLIT_NAMES.get(split, split)
    return Path(report["data"]).name if report.get("data") else "unknown images"


def metrics_table(reports: Mapping[str, Mapping], cards: Mapping[str, Mapping] | None = None) -> list[dict]:
    """One row per report: overall metrics, sensitivity/specificity of binary
    tasks, calibration error, the share of images flagged out of distribution,
    model size and latency from the model card."""
    cards = cards or {}
    rows = []
    for label, r in reports.items():
        card = cards.get(label) or {}
        row = {
            "Model": label,
            "Evaluated on": evaluated_on(r),
            "Images": r.get("images"),
            "Accuracy": r.get("accuracy"),
            "Macro-F1": r.get("macro_f1"),
            "ROC AUC (macro)": (r.get("roc_auc") or {}).get("macro"),
        }
        if "sensitivity" in r or "specificity" in r:
            positive = _display(r).get(r.get("positive_class"), r.get("positive_class"))
            row[f"Sensitivity ({positive})"] = r.get("sensitivity")
            row["Specificity"] = r.get("specificity")
        row["ECE"] = r.get("ece")
        row["ECE before calibration"] = r.get("ece_uncalibrated")
        spread = r.get("fold_spread") or {}
        if spread:
            row["Accuracy, sd over folds"] = (spread.get("accuracy") or {}).get("std")
            row["Macro-F1, sd over folds"] = (spread.get("macro_f1") or {}).get("std")
        if r.get("coverage") is not None:
            row["Answered (not uncertain)"] = r.get("coverage")
            row["Accuracy when answered"] = r.get("accuracy_when_confident")
        row["Flagged out of distribution"] = r.get("ood_flagged")
        row["Size (MB)"] = _size_mb(card)
        latency = card_latency_ms(card)
        row["Latency, prediction (ms)"] = latency.get("predict")
        row["Latency, with Grad-CAM (ms)"] = latency.get("predict_gradcam")
        rows.append(row)
    return rows


PERCENT_METRICS = ("Accuracy", "Sensitivity", "Specificity", "Flagged out of distribution", "Precision", "Recall",
                   "Answered")


def format_metric(name: str, value) -> str:
    """A metric as the dashboard prints it: shares in percent, scores with three decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if name.startswith(PERCENT_METRICS):
        return f"{value:.1%}"
    if name in ("Images",):
        return f"{int(value):,}"
    if name.startswith(("Size", "Latency")):
        return f"{value:.1f}"
    return f"{value:.3f}"


def metrics_by_model(rows: Sequence[Mapping]) -> list[dict]:
    """:func:`metrics_table` turned around for reading: one row per metric, one
    column per model, values formatted."""
    if not rows:
        return []
    names = list(dict.fromkeys(k for row in rows for k in row if k != "Model"))
    return [{"Metric": name, **{str(row["Model"]): format_metric(name, row.get(name)) for row in rows}}
            for name in names]


def per_class_table(reports: Mapping[str, Mapping]) -> list[dict]:
    """One row per model and class: precision, recall, F1, AUC and support, with
    a note where few images stand behind the figures."""
    rows = []
    for label, r in reports.items():
        display = _display(r)
        aucs = (r.get("roc_auc") or {}).get("per_class") or {}
        for key, stats in (r.get("per_class") or {}).items():
            support = stats.get("support")
            rows.append({"Model": label, "Class": display.get(key, key), "Precision": stats.get("precision"),
                         "Recall": stats.get("recall"), "F1": stats.get("f1"), "AUC": aucs.get(key),
                         "Images": support,
                         "Note": few_images_note(support)})
    return rows
