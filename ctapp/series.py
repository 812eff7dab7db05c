"""Classifying a whole series (``ctapp.volumes`` reads it) slice by slice in
batches, its study-level verdict and its per-slice table."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .inference import CONFIDENT, LOW_CONFIDENCE, NOT_CHEST_CT, OTHER_FINDING, UNLIKE_TRAINING, Prediction
from .metrics import NEGATIVE_NAME
from .report import csv_text
from .volumes import Series


@dataclass(frozen=True)
class SeriesValidation:
    """What a model's card shows of the verdict "No finding class reached" out
    of fold (``training.series_check``): of the held-out series of a finding
    class that the rule alone judged (a finding or none), how many got it."""

    findings: str  # the finding classes' display names, e.g. "COVID"
    reassured: int
    judged: int

    @classmethod
    def from_counts(cls, counts: Mapping[str, Mapping[str, int]], class_names: list[str],
                    display_names: list[str]) -> SeriesValidation | None:
        """From series counts by true class and outcome of the rule alone;
        None when no series of a finding class was judged (nothing validated)."""
        names = dict(zip(class_names, display_names))
        findings = [c for c in finding_classes(class_names) if c in counts]
        reassured = sum(int(counts[c].get("no finding", 0)) for c in findings)
        judged = reassured + sum(int(counts[c].get("finding", 0)) for c in findings)
        return cls(" or ".join(names[c] for c in findings), reassured, judged) if judged else None

    @classmethod
    def from_card(cls, card: Mapping, class_names: list[str], display_names: list[str]) -> SeriesValidation | None:
        held_out = (card.get("series_validation") or {}).get("out_of_fold") or {}
        # A section written before the card gate existed holds the rule alone's counts at its top level.
        counts = (held_out.get("rule_alone") or held_out).get("counts")
        return cls.from_counts(counts, class_names, display_names) if counts else None


@dataclass
class SeriesPredictions:
    """Per-slice predictions of one series by one model, in reading order,
    with what the model's card shows of the series verdict (None: not checked)."""

    predictions: list[Prediction]
    class_names: list[str]
    display_names: list[str]
    seconds: float = 0.0
    validation: SeriesValidation | None = None

    @classmethod
    def of_model(cls, model, predictions: list[Prediction], seconds: float = 0.0) -> SeriesPredictions:
        class_names, display_names = list(model.class_names), list(model.display_names)
        return cls(predictions, class_names, display_names, seconds,
                   SeriesValidation.from_card(model.card, class_names, display_names))

    @property
    def probabilities(self) -> np.ndarray:
        """(N, C) calibrated probabilities."""
        return np.array([[p.probabilities[c] for c in self.class_names] for p in self.predictions]).reshape(
            len(self.predictions), len(self.class_names))


def classify_series(model, series: Series, *, batch_size: int = 32,
                    on_progress: Callable[[int, int], None] | None = None) -> SeriesPredictions:
    """Every slice of ``series`` through ``model`` (every member of an ensemble)
    ``batch_size`` slices at a time, each slice decoded once, with calibrated
    probabilities, the out-of-distribution check and the answer state: the same
    answers as ``model.predict`` on each slice, without Grad-CAM. The model's
    lock is taken per batch, so other users go on between batches;
    ``on_progress(slices done, slices)`` is called after each."""
    started = time.perf_counter()
    window = model.preprocess.window
    predictions = model.classify_slices(lambda i: series.slice(i, window), len(series), batch_size=batch_size,
                                        on_progress=on_progress)
    return SeriesPredictions.of_model(model, predictions, time.perf_counter() - started)


# --------------------------------------------------------------------------- the series verdict

MIN_FINDING_SLICES = 3  # confident slices of a finding class before the series reports it
MIN_ANSWERED_SHARE = 0.5  # a series most of whose slices are unanswered has no result, whatever the others say
KEY_SLICES = 5
VERDICT_RULE = (
    f"Only confidently answered slices count: uncertain ones (low confidence, unlike the training images, not a "
    f"chest CT, another finding the model was not trained for) never do. A series has no result, one for the whole "
    f"series, when fewer than {MIN_ANSWERED_SHARE:.0%} of its slices, or fewer than {MIN_FINDING_SLICES}, are "
    f"answered confidently. Otherwise a finding class is reported when at least {MIN_FINDING_SLICES} slices are "
    f"confidently predicted as it; the series shows the finding class with the most such slices (the others are "
    f"listed). Classes named normal, non-... or negative are not findings, and a series that reaches no finding "
    f"class is not thereby normal: the model only looks for its own classes. That neutral verdict is given only "
    f"by a model whose card shows that, out of fold, no held-out series of a finding class got it; where some "
    f"did, the series has no result, with the card's figures; a model whose card has no such check says so. "
    f"Another finding on {MIN_FINDING_SLICES} or more slices is added to a judged series' verdict.")
NOT_VALIDATED = "this rule was not validated on series for this model"


@dataclass
class SeriesSummary:
    series: str  # the series id
    slices: int
    label: str | None  # the reported finding class (None: no finding, or no result)
    verdict: str  # in plain words, e.g. "COVID-like findings on 37 of 120 slices"
    rule: str
    confident_counts: dict[str, int]  # class -> slices confidently predicted as it
    uncertain: int  # slices in any state but confident
    uncertain_by_state: dict[str, int]
    key_slices: list[int]  # reading-order indices of the slices that drive the verdict
    has_result: bool
    other_findings: dict[str, int] = field(default_factory=dict)

    @property
    def answered(self) -> int:
        """Slices answered confidently."""
        return self.slices - self.uncertain

    @property
    def outcome(self) -> str:
        """One of "finding", "no finding" (neutral, never a reassurance) and "no result"."""
        return "no result" if not self.has_result else "finding" if self.label is not None else "no finding"

    def to_dict(self) -> dict:
        return {**self.__dict__, "answered": self.answered, "outcome": self.outcome}


def finding_classes(class_names: list[str]) -> list[str]:
    """Classes that are findings: all but normal / non-... / negative ones."""
    return [c for c in class_names if not NEGATIVE_NAME.match(c.replace("-", " ").replace("_", " "))]


def summarise(series_id: str, result: SeriesPredictions, *, rule_only: bool = False) -> SeriesSummary:
    """The study-level summary of one series under :data:`VERDICT_RULE`, its
    "No finding class reached" held to ``result.validation``; ``rule_only``:
    without that, the verdict that ``training.series_check`` validates."""
    preds = result.predictions
    n = len(preds)
    names = dict(zip(result.class_names, result.display_names))
    counts = {c: sum(1 for p in preds if p.state == CONFIDENT and p.label == c) for c in result.class_names}
    by_state = {s: 0 for s in (LOW_CONFIDENCE, UNLIKE_TRAINING, NOT_CHEST_CT, OTHER_FINDING)}
    for p in preds:
        if p.state != CONFIDENT:
            by_state[p.state] = by_state.get(p.state, 0) + 1
    uncertain = sum(by_state.values())
    confident = n - uncertain
    findings = finding_classes(result.class_names)
    reached = {c: counts[c] for c in findings if counts[c] >= MIN_FINDING_SLICES}
    probs = result.probabilities
    judged = confident >= MIN_FINDING_SLICES and confident >= MIN_ANSWERED_SHARE * n
    if not judged:
        label, has_result, reached = None, False, {}
        states = ", ".join(f"{state} {k}" for state, k in by_state.items() if k)
        verdict = (f"No result: only {confident} of {n} slices were answered confidently ({uncertain} uncertain: "
                   f"{states}); the series is not judged")
        pool = list(range(n))
        key_class = findings[0] if findings else result.class_names[0]
    elif reached:
        label = max(reached, key=lambda c: (reached[c], -result.class_names.index(c)))
        has_result = True
        verdict = f"{names[label]}-like findings on {counts[label]} of {n} slices"
        pool = [i for i, p in enumerate(preds) if p.state == CONFIDENT and p.label == label]
        key_class = label
    else:
        label = None
        negatives = ", ".join(f"{names[c]} on {counts[c]}" for c in result.class_names if c not in findings)
        checked = None if rule_only else result.validation
        has_result = checked is None or checked.reassured == 0
        if has_result:
            verdict = (f"No finding class reached: {confident} of {n} slices answered confidently, no finding class "
                       f"on {MIN_FINDING_SLICES} or more of them" + (f" ({negatives})" if negatives else "")
                       + "; not a negative result" + ("" if rule_only or checked else f"; {NOT_VALIDATED}"))
        else:
            verdict = (f"No result: no finding class reached ({confident} of {n} slices answered confidently"
                       + (f"; {negatives}" if negatives else "") + f"), but out of fold this model gave that answer "
                       f"to {checked.reassured} of {checked.judged} {checked.findings} series it judged, so it "
                       f"does not rule {checked.findings} out")
        pool = list(range(n))
        key_class = max(findings, key=lambda c: probs[:, result.class_names.index(c)].max()) if findings else \
            result.class_names[0]
    column = probs[:, result.class_names.index(key_class)]
    key = sorted(pool, key=lambda i: -column[i])[:KEY_SLICES]
    # Most slices first, ties in class order (sorted is stable); a second finding is never hidden behind the first.
    others = dict(sorted(((c, k) for c, k in reached.items() if c != label), key=lambda item: -item[1]))
    if others:
        verdict += "; also " + ", ".join(f"{names[c]}-like on {k}" for c, k in others.items())
    if judged and by_state[OTHER_FINDING] >= MIN_FINDING_SLICES:
        verdict += (f"; another finding on {by_state[OTHER_FINDING]} slices, which this model was not trained for "
                    f"(see the slices' reasons)")
    return SeriesSummary(series_id, n, label, verdict, VERDICT_RULE, counts, uncertain, by_state, key, has_result,
                         others)


# --------------------------------------------------------------------------- tables


def slice_rows(series: Series, result: SeriesPredictions) -> list[dict]:
    """One row per slice (the series CSV and the viewer's table)."""
    names = dict(zip(result.class_names, result.display_names))
    rows = []
    for i, p in enumerate(result.predictions):
        row = {"series": series.id, "slice": i + 1, "name": series.slice_name(i),
               "position_mm": None if not series.positions or series.positions[i] is None
               else round(series.positions[i], 2),
               "result": names[p.label] if not p.uncertain else f"Uncertain (leans {names[p.label]})",
               "state": p.state, "confidence": round(p.confidence, 4)}
        row.update({f"p_{c}": round(p.probabilities[c], 4) for c in result.class_names})
        rows.append(row)
    return rows


def series_csv(series: Series, result: SeriesPredictions) -> str:
    """The series CSV: :func:`slice_rows`, formula-like cells written as text."""
    return csv_text(slice_rows(series, result))
