"""What a model was not trained to judge. The lung-cancer models name a
tumour's subtype or call a slice normal; they have no answer for pneumonia
and, shown one, name a subtype anyway. A model folder's ``scope.json`` names a
second model that sees such a finding (the COVID-19 model sees COVID-19-like
pneumonia): where that model's probability of its finding reaches the rule's
``min_probability``, a confident answer becomes :data:`OTHER_FINDING` ("another
finding: not what this model was trained for") instead of a class.

``python -m training.scope`` chooses ``min_probability`` out of fold and writes
the file with its figures; :func:`ctapp.model_folders.load_model` attaches the
check (:class:`ScopeCheck`) to a model whose folder holds one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError
from .inference import CONFIDENT, OTHER_FINDING, BatchScores

SCOPE_FILE = "scope.json"
FORMAT = "ctapp.scope"


@dataclass(frozen=True)
class ScopeRule:
    """``model``: the folder of the model that sees the other finding, relative to
    the scoped model's folder (e.g. ``../covid-ensemble``); ``finding``: its class
    key; ``says``: the finding in words; ``scope``: what the scoped model is for."""

    model: str
    finding: str
    min_probability: float
    says: str
    scope: str

    def reason(self, probability: float) -> str:
        return (f"another finding: {Path(self.model).name} sees {self.says} here ({probability:.0%}; this rule "
                f"withholds from {self.min_probability:.0%}); this model is for {self.scope}, not {self.says}: "
                f"no result")


def read_rule(folder: Path) -> ScopeRule | None:
    """The scope rule of a model folder, or None where it has no ``scope.json``."""
    path = Path(folder) / SCOPE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rule = data["rule"]
        return ScopeRule(str(rule["model"]), str(rule["finding"]), float(rule["min_probability"]), str(rule["says"]),
                         str(rule["scope"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable scope rule ({type(exc).__name__}: {exc})") from None


def rule_file(rule: ScopeRule, figures: dict) -> str:
    """The text of a ``scope.json``: the rule and the out-of-fold figures it was chosen by."""
    return json.dumps({"format": FORMAT, "rule": asdict(rule), **figures}, indent=1) + "\n"


def restate(scores: BatchScores, probability: np.ndarray, rule: ScopeRule) -> BatchScores:
    """``scores`` with every confident answer whose finding ``probability``
    (NaN: not asked) reaches the rule's threshold turned into :data:`OTHER_FINDING`."""
    hit = [state == CONFIDENT and p >= rule.min_probability for state, p in zip(scores.states, probability)]
    if not any(hit):
        return scores
    states = [OTHER_FINDING if h else state for state, h in zip(scores.states, hit)]
    reasons = [[rule.reason(float(p))] if h else list(r) for r, p, h in zip(scores.reasons, probability, hit)]
    return replace(scores, states=states, reasons=reasons)


class ScopeCheck:
    """A scope rule with its loaded finding model (a model or an ensemble)."""

    def __init__(self, rule: ScopeRule, model):
        if rule.finding not in model.class_names:
            raise CheckpointError(f"scope rule: {rule.model} has no class {rule.finding!r} ({model.class_names})")
        self.rule, self.model = rule, model
        self.index = model.class_names.index(rule.finding)

    def finding_probability(self, slices: list) -> np.ndarray:
        """The finding model's calibrated probability of its finding in each
        decoded slice, whatever its own answer state: only a confident answer
        of the scoped model is ever withheld for it."""
        if not slices:
            return np.zeros(0)
        return self.model.score_slices(slices).probs[:, self.index]

    def apply(self, scores: BatchScores, slices: list) -> BatchScores:
        """:func:`restate` of ``scores`` (one row per slice), asking the finding
        model about the confidently answered slices only."""
        asked = [i for i, state in enumerate(scores.states) if state == CONFIDENT]
        probability = np.full(len(slices), np.nan)
        probability[asked] = self.finding_probability([slices[i] for i in asked])
        return restate(scores, probability, self.rule)

    def restate(self, scores: BatchScores, probability: np.ndarray) -> BatchScores:
        return restate(scores, probability, self.rule)
