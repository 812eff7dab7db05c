"""Evaluation metrics, calibration and model comparison, from scikit-learn and SciPy.

``evaluation_report`` is the one place an evaluation report is computed: the
training run, ``training.evaluate`` and the dashboard all read its output.
"""
from __future__ import annotations

import numbers
import re

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import binomtest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from sklearn.preprocessing import label_binarize

FEW_IMAGES = 20  # a figure resting on fewer images says so next to it


def few_images_note(images) -> str:
    """The note beside a figure resting on fewer than ``FEW_IMAGES`` images; '' otherwise."""
    if isinstance(images, numbers.Integral) and not isinstance(images, bool) and images < FEW_IMAGES:
        return f"fewer than {FEW_IMAGES} images: a rough figure"
    return ""


NEGATIVE_NAME = re.compile(r"^(non|no|normal|negative|healthy|benign)\b", re.IGNORECASE)


def positive_class(class_names: list[str]) -> int:
    """For a binary task, the index of the finding (e.g. 'covid' rather than
    'non-covid'); class 1 when neither name reads as negative."""
    if len(class_names) != 2:
        raise ValueError("a positive class is defined for two classes only")
    negative = [bool(NEGATIVE_NAME.match(name.replace("-", " "))) for name in class_names]
    if negative == [True, False]:
        return 1
    if negative == [False, True]:
        return 0
    return 1


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over equal-width bins."""
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, y_true, bins))
                 / max(len(y_true), 1))


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> list[dict]:
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                        "confidence": float(confidence[mask].mean()), "accuracy": float(correct[mask].mean())})
    return out


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T minimising the validation NLL of softmax(logits / T)."""
    logits = np.asarray(logits, dtype=np.float64)

    def nll(log_t: float) -> float:
        return -float(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y_true)), y_true].mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def evaluation_report(y_true, probs, class_names: list[str], display_names: list[str] | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix,
    one-vs-rest ROC AUC and curves, ECE and reliability bins; sensitivity and
    specificity of the positive class for binary tasks."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    labels = list(range(n_classes))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    report = {
        "images": int(len(y_true)),
        "class_names": list(class_names),
        "display_names": list(display_names or class_names),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "ece": expected_calibration_error(probs, y_true),
        "reliability": reliability_bins(probs, y_true),
        "log_loss": float(log_loss(y_true, np.clip(probs, 1e-12, 1.0), labels=labels)) if len(y_true) else None,
    }
    onehot = label_binarize(y_true, classes=labels) if n_classes > 2 else np.eye(2, dtype=int)[y_true]
    aucs, curves = {}, {}
    for i, name in enumerate(class_names):
        if 0 < onehot[:, i].sum() < len(y_true):
            aucs[name] = float(roc_auc_score(onehot[:, i], probs[:, i]))
            fpr, tpr, _ = roc_curve(onehot[:, i], probs[:, i])
            curves[name] = {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
        else:
            aucs[name] = None
    valid = [v for v in aucs.values() if v is not None]
    report["roc_auc"] = {"per_class": aucs, "macro": float(np.mean(valid)) if valid else None}
    report["roc_curves"] = curves
    if n_classes == 2:
        pos = positive_class(class_names)
        tp = int(((y_pred == pos) & (y_true == pos)).sum())
        fn = int(((y_pred != pos) & (y_true == pos)).sum())
        tn = int(((y_pred != pos) & (y_true != pos)).sum())
        fp = int(((y_pred == pos) & (y_true != pos)).sum())
        report["positive_class"] = class_names[pos]
        report["sensitivity"] = tp / (tp + fn) if tp + fn else None
        report["specificity"] = tn / (tn + fp) if tn + fp else None
    return report


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test on paired correctness of two models on the same images."""
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((~correct_a & correct_b).sum())
    discordant = only_a + only_b
    p_value = float(binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p_value,
            "significant_at_0.05": p_value < 0.05}


def risk_coverage(probs: np.ndarray, y_true: np.ndarray, points: int = 50) -> list[dict]:
    """Accuracy of the answered slices against the share answered, answering the
    most confident first: ``points`` steps from the most confident few to all."""
    confidence = np.asarray(probs).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(y_true)
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    n = len(order)
    curve = []
    for k in sorted({max(1, round(n * (i + 1) / points)) for i in range(points)}) if n else []:
        curve.append({"threshold": float(confidence[order[k - 1]]), "coverage": k / n, "accuracy": float(hits[k - 1] / k)})
    return curve


def selective_threshold(probs: np.ndarray, y_true: np.ndarray, flagged: np.ndarray, target: float,
                        min_answered: int = 20) -> float:
    """The lowest confidence threshold at which the slices answered (not
    ``flagged`` and at least that confident) are right at least ``target`` of
    the time, answering as many as possible. When no threshold reaches the
    target, the one with the highest accuracy over at least ``min_answered``
    slices."""
    probs = np.asarray(probs)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    keep = ~np.asarray(flagged, bool)
    confidence, correct = confidence[keep], correct[keep]
    if not len(confidence):
        return 1.0
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    accuracy = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    # A threshold answers every slice at least as confident: only the last of tied confidences is a cut.
    cuts = np.flatnonzero(np.append(confidence[1:] < confidence[:-1], True))
    enough = cuts[cuts + 1 >= min(min_answered, len(confidence))]
    if not len(enough):
        enough = cuts
    reaching = enough[accuracy[enough] >= target]
    best = reaching[-1] if len(reaching) else enough[np.argmax(accuracy[enough])]
    return float(confidence[best])


def selective_summary(probs: np.ndarray, y_true: np.ndarray, uncertain: np.ndarray) -> dict:
    """How a model that declines the ``uncertain`` slices does: the share it
    answers, its accuracy when it answers, and confident mistakes (answered and
    wrong) as a share of all slices."""
    answered = ~np.asarray(uncertain, bool)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(y_true)
    return {"coverage": float(answered.mean()),
            "accuracy_when_confident": float(correct[answered].mean()) if answered.any() else None,
            "answered": int(answered.sum()), "images": int(len(answered)),
            "confident_mistakes": float((answered & ~correct).mean())}


def selective_statement(summary: dict) -> str:
    """:func:`selective_summary` in the plain words a model card states."""
    if summary["accuracy_when_confident"] is None:
        return "It declined to answer every out-of-fold slice."
    return (f"When it answers, it was right {summary['accuracy_when_confident']:.0%} of the time; it answers "
            f"{summary['coverage']:.0%} of slices (out-of-fold, {summary['images']} images).")
