"""The series verdict (``ctapp.series.summarise``) measured on pseudo-series
with known labels.

    python -m training.series_check --model models/covid-ensemble
    python -m training.series_check --model models/lung-ensemble models/lung-resnet50 models/lung-vgg19_bn \\
        --foreign-series ../shared/data/sarscov2-ctscan --foreign-class COVID

Consecutive SARS-CoV-2 file numbers are usually slices of one patient. A
pseudo-series is the slices of one class of that source whose file numbers
fall in one block of ``--block`` consecutive numbers (number // block) and that
one fold held out. Out of fold (a ``training.fit --cv`` model or a
``training.ensemble`` of them): every slice gets the answer state the app would
give it, from the out-of-fold row and the thresholds its fold fitted on the
other folds, and each pseudo-series gets the app's verdict: series-level
sensitivity and specificity, and how many COVID series got a verdict that reads
as reassurance. With ``--foreign-series`` (a folder of pneumonia slices the
model never saw, such as SARS-CoV-2's COVID class for the lung models): the
shipped model answers every slice as the app does and each series' verdict is
counted, cancer verdicts first. Either writes a ``series_validation`` section
into the model's model_card.json and eval_report.json.

The app gives "No finding class reached" only when the card shows, out of
fold, that no held-out series of a finding class got it. So that the check
does not validate itself, the card's evidence (``rule_alone``) is the verdict
rule without that gate, and the figures as the app answers (the top level)
take the gate of each fold from the rule alone's verdicts on the other folds.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ctapp.checkpoint import CheckpointError, atomic_write_text
from ctapp.data import DatasetError, file_number, list_folder
from ctapp.inference import BatchScores, Prediction
from ctapp.model_folders import load_model
from ctapp.series import (
    VERDICT_RULE, SeriesPredictions, SeriesSummary, SeriesValidation, finding_classes, summarise,
)
from training.cli import HelpFormatter, command
from training.crossval import out_of_fold_report, out_of_fold_scores
from training.engine import Progress

SERIES_SOURCE = "sarscov2-ctscan"
# Half the COVID models' --split-block of 40, so a block lies inside one split block and so in one fold.
BLOCK = 20
MIN_SLICES = 10  # shorter pieces (the end of a class folder, a block the folds cut) are not series
SECTION = "series_validation"
OUTCOMES = ("finding", "no finding", "no result")


def pseudo_series_rule(source: str, block: int, min_slices: int, by_fold: bool) -> str:
    fold = " that one fold held out" if by_fold else ""
    return (f"the slices of one class of {source} whose file numbers fall in one block of {block} consecutive "
            f"numbers (number // {block}){fold}, in file-number order; pieces of fewer than {min_slices} slices are "
            "left out. Consecutive numbers are usually one patient's slices: a pseudo-series may hold the end of "
            "one patient and the start of the next, and a patient may span two.")


@dataclass
class PseudoSeries:
    id: str
    truth: str  # class key, or the foreign folder's name
    fold: int | None
    keys: list[str]  # the slices' rows (path) or files, in file-number order


def pseudo_series(items: list[tuple[str, str, int | None, Path]], block: int = BLOCK,
                  min_slices: int = MIN_SLICES) -> tuple[list[PseudoSeries], int]:
    """Items (key, class, fold or None, path) -> the pseudo-series of
    :func:`pseudo_series_rule`, and how many slices were left out (no file
    number, or in a piece shorter than ``min_slices``)."""
    groups: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    left_out = 0
    for key, truth, fold, path in items:
        number = file_number(path)
        if number is None:
            left_out += 1
            continue
        groups[(truth, str(path.parent), fold, number // block)].append((number, key))
    series = []
    for (truth, _folder, fold, index), members in sorted(groups.items(), key=lambda item: (
            item[0][0], item[0][1], item[0][3], -1 if item[0][2] is None else item[0][2])):
        if len(members) < min_slices:
            left_out += len(members)
            continue
        members.sort()
        where = "" if fold is None else f" fold {fold}"
        series.append(PseudoSeries(f"{truth} {members[0][0]}-{members[-1][0]}{where}", truth, fold,
                                   [key for _, key in members]))
    return series, left_out


# --------------------------------------------------------------------------- out-of-fold answers


def out_of_fold_predictions(folder: Path) -> tuple[list[str], list[str], dict[str, dict], dict[str, Prediction]]:
    """Class keys, display names, the rows by path and each row's
    :class:`Prediction` as the app gives it, out of fold
    (:func:`training.crossval.out_of_fold_scores`): a network's from its fold's
    thresholds; an ensemble's by ``EnsembleModel.combine`` of its members'
    rows, each member and the ensemble with the temperature and thresholds its
    fold fitted on the other folds."""
    oof, scores = out_of_fold_scores(folder)
    predictions = {path: oof.prediction(scores, i, []) for i, path in enumerate(oof.paths)}
    return oof.class_names, oof.display_names, dict(zip(oof.paths, oof.rows)), predictions


# --------------------------------------------------------------------------- tallies


def tally(summaries: list[tuple[PseudoSeries, SeriesSummary]], positive: str | None) -> dict:
    """Series by true class and verdict outcome; with a ``positive`` class,
    series-level sensitivity (positive series with a finding, of those with a
    result) and specificity (other series without one, of those with a result).
    A "no result" is neither a positive call nor a reassurance: it is counted,
    not scored."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for series, summary in summaries:
        counts[series.truth][summary.outcome] += 1
    out = {"series": len(summaries), "counts": {truth: {o: c[o] for o in OUTCOMES} for truth, c in
                                                 sorted(counts.items())}}
    if positive is not None:
        pos = counts.get(positive, Counter())
        neg = sum((c for truth, c in counts.items() if truth != positive), Counter())
        called, missed = pos["finding"], pos["no finding"]
        cleared, alarmed = neg["no finding"], neg["finding"]
        out.update(sensitivity=called / (called + missed) if called + missed else None,
                   specificity=cleared / (cleared + alarmed) if cleared + alarmed else None,
                   no_result={"positive": pos["no result"], "negative": neg["no result"]},
                   reassuring_on_positive=missed)
    return out


def _listed(summaries: list[tuple[PseudoSeries, SeriesSummary]]) -> list[dict]:
    return [{"series": s.id, "slices": summary.slices, "answered": summary.answered, "verdict": summary.verdict}
            for s, summary in summaries]


def summaries_of(series: list[PseudoSeries], predictions: dict[str, Prediction], classes: list[str],
                 display: list[str], validation: Callable[[PseudoSeries], SeriesValidation | None] = lambda s: None,
                 *, rule_only: bool = False) -> list[tuple[PseudoSeries, SeriesSummary]]:
    """Each pseudo-series' verdict, held to ``validation(series)`` as the app
    holds a series to its model's card, or by the rule alone."""
    return [(s, summarise(s.id, SeriesPredictions([predictions[k] for k in s.keys], classes, display,
                                                  validation=validation(s)), rule_only=rule_only))
            for s in series]


def other_folds_validation(rule_alone: list[tuple[PseudoSeries, SeriesSummary]], classes: list[str],
                           display: list[str]) -> dict[int | None, SeriesValidation | None]:
    """By fold: what a card written from the rule alone's verdicts on the
    other folds' series would show, so that the gate of a fold's series is
    chosen without them, as for an unseen patient."""
    return {fold: SeriesValidation.from_counts(
        tally([(s, summary) for s, summary in rule_alone if s.fold != fold], None)["counts"], classes, display)
        for fold in {s.fold for s, _ in rule_alone}}


def verdict_figures(summaries: list[tuple[PseudoSeries, SeriesSummary]], positive: str | None) -> dict:
    """The tally of all series and of each fold's, and the positive series whose verdict reads as reassurance."""
    by_fold = {str(k): tally([(s, summary) for s, summary in summaries if s.fold == k], positive)
               for k in sorted({s.fold for s, _ in summaries})}
    reassuring = [(s, summary) for s, summary in summaries if s.truth == positive and summary.outcome == "no finding"]
    return {**tally(summaries, positive), "per_fold": by_fold, "reassuring_series": _listed(reassuring)}


def out_of_fold_section(folder: Path, source: str = SERIES_SOURCE, block: int = BLOCK,
                        min_slices: int = MIN_SLICES) -> dict:
    """The out-of-fold series validation of a cross-validated model or ensemble."""
    classes, display, rows, predictions = out_of_fold_predictions(folder)
    items = [(key, row["true"], int(row["fold"]), Path(row["path"])) for key, row in rows.items()
             if row.get("source") == source]
    if not items:
        raise DatasetError(f"{folder}: no out-of-fold rows of the source {source!r} "
                           f"(sources: {sorted({row.get('source', '') for row in rows.values()})})")
    series, left_out = pseudo_series(items, block, min_slices)
    positive = out_of_fold_report(folder).get("positive_class")
    rule_alone = summaries_of(series, predictions, classes, display, rule_only=True)
    gates = other_folds_validation(rule_alone, classes, display)
    answered = summaries_of(series, predictions, classes, display, lambda s: gates[s.fold])
    as_answered, evidence = verdict_figures(answered, positive), verdict_figures(rule_alone, positive)
    names = dict(zip(classes, display))
    card_gate = SeriesValidation.from_counts(evidence["counts"], classes, display)
    evidence["statement"] = out_of_fold_statement(evidence, names.get(positive, positive), source, "the rule alone")
    return {**as_answered, "positive_class": positive, "source": source, "pseudo_series": pseudo_series_rule(
        source, block, min_slices, True), "slices": sum(len(s.keys) for s in series), "slices_left_out": left_out,
        "statement": out_of_fold_statement(as_answered, names.get(positive, positive), source,
                                           "as the app answers them (each fold's gate chosen on the other folds)")
        + " " + card_gate_statement(card_gate),
        "no_finding_withheld": card_gate is not None and card_gate.reassured > 0, "rule_alone": evidence}


def out_of_fold_statement(figures: dict, positive: str, source: str, verdicts: str) -> str:
    def pct(v):
        return "n/a" if v is None else f"{v:.0%}"

    no_result = figures.get("no_result") or {}
    return (f"On {figures['series']} held-out {source} pseudo-series, {verdicts}: series-level sensitivity "
            f"({positive}) {pct(figures.get('sensitivity'))}, specificity {pct(figures.get('specificity'))}, both "
            f"of the series with a result; no result on {no_result.get('positive', 0)} {positive} and "
            f"{no_result.get('negative', 0)} other series; {figures.get('reassuring_on_positive', 0)} {positive} "
            f"series got a verdict that reads as reassurance (no finding class reached).")


def card_gate_statement(card_gate: SeriesValidation | None) -> str:
    """What the app does with this card's evidence on "No finding class reached"."""
    if card_gate is None:
        return "No held-out series of a finding class was judged, so the verdict 'No finding class reached' is " \
               "not validated on series for this model."
    if card_gate.reassured:
        return (f"Without the gate, the rule gave 'No finding class reached' to {card_gate.reassured} of the "
                f"{card_gate.judged} {card_gate.findings} series it judged, so the app answers 'No result' "
                f"instead, giving these figures.")
    return (f"Without the gate, the rule gave 'No finding class reached' to none of the {card_gate.judged} "
            f"{card_gate.findings} series it judged, so the app gives it as a neutral verdict.")


# --------------------------------------------------------------------------- foreign series


def foreign_folder_items(root: Path, classes: list[str] | None = None) -> list[tuple[str, str, None, Path]]:
    """The slices of a dataset folder's class folders (all, or those named in ``classes``)."""
    listing = list_folder(root)
    found = sorted({name for _, name, _ in listing.files})
    missing = sorted(set(classes or []) - set(found))
    if missing:
        raise DatasetError(f"{root}: no class folder {', '.join(missing)} with images (found: {', '.join(found)})")
    return [(str(path), name, None, path) for path, name, _ in listing.files if not classes or name in classes]


class ScoreCache:
    """Each network scores the files once, whether asked alone or as an ensemble's member."""

    def __init__(self, paths: list[Path], quiet: bool):
        self.paths, self.quiet, self.scores = paths, quiet, {}

    def network(self, model) -> BatchScores:
        key = str(model.path.resolve()) if model.path else model.name
        if key not in self.scores:
            bar = Progress(len(self.paths), f"scoring with {model.name}", unit="slice", enabled=not self.quiet)
            self.scores[key] = model.score_files(self.paths, on_progress=lambda done, total: bar.update(done))
        return self.scores[key]

    def model(self, model) -> BatchScores:
        parts = [self.network(m) for m in model.members]
        return parts[0] if len(parts) == 1 else model.combine(parts)


def foreign_section(model, root: Path, scores: BatchScores, items: list, block: int = BLOCK,
                    min_slices: int = MIN_SLICES) -> dict:
    """Series of slices from a source the model never saw (another task's
    pneumonia): how many got a verdict that names one of the model's finding
    classes, a neutral one, or no result."""
    readable = {key: i for i, (key, _, _, _) in enumerate(items) if not scores.errors[i]}
    predictions = {key: model.prediction(scores, i, []) for key, i in readable.items()}
    series, left_out = pseudo_series([item for item in items if item[0] in readable], block, min_slices)
    card_gate = SeriesValidation.from_card(model.card, model.class_names, model.display_names)
    summaries = summaries_of(series, predictions, model.class_names, model.display_names, lambda s: card_gate)
    found = tally(summaries, None)
    findings = [(s, summary) for s, summary in summaries if summary.outcome == "finding"]
    names = dict(zip(model.class_names, model.display_names))
    classes = sorted({s.truth for s in series})
    where = f"{root.name} ({', '.join(classes)})"
    neutral = Counter(summary.outcome for _, summary in summaries if summary.outcome != "finding")
    statement = (f"On {found['series']} series of {where} slices, not what this model was trained for: "
                 f"{len(findings)} verdict(s) name a finding class "
                 f"({', '.join(names[c] for c in finding_classes(model.class_names))}); "
                 f"{neutral['no finding']} no finding class reached, {neutral['no result']} no result.")
    return {**found, "data": where, "pseudo_series": pseudo_series_rule(where, block, min_slices, False),
            "slices": sum(len(s.keys) for s in series), "slices_left_out": left_out + len(items) - len(readable),
            "finding_verdicts": len(findings), "finding_series": _listed(findings), "statement": statement}


# --------------------------------------------------------------------------- writing


def write_section(folder: Path, part: str, section: dict) -> None:
    """``section`` as ``series_validation[part]`` of the model's card and report,
    the rest of each file as it was."""
    for name in ("model_card.json", "eval_report.json"):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {name}")
        data = json.loads(path.read_text())
        data[SECTION] = {**(data.get(SECTION) or {}), "rule": VERDICT_RULE, part: section,
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(json.dumps(data, indent=2), path)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.series_check",
                                description="Validate the series verdict on pseudo-series with known labels and "
                                            "write it to the model cards.",
                                add_help=add_help, formatter_class=HelpFormatter)
    p.add_argument("--model", nargs="+", required=True, type=Path,
                   help="model folders: cross-validated networks or ensembles (out of fold), or any model with "
                        "--foreign-series")
    p.add_argument("--foreign-series", type=Path, default=None,
                   help="a dataset folder (class sub-folders) of a task the models were not trained for, e.g. "
                        "../shared/data/sarscov2-ctscan for the lung models: run the models on its slices instead of "
                        "reading out-of-fold rows")
    p.add_argument("--foreign-class", nargs="+", default=None,
                   help="with --foreign-series: only these class folders (e.g. COVID); default: all")
    p.add_argument("--source", default=SERIES_SOURCE, help="the out-of-fold rows' source whose file numbers "
                                                           "run in series")
    p.add_argument("--block", type=int, default=BLOCK, help="consecutive file numbers per pseudo-series (cut by "
                                                            "the folds where they cut it: best a divisor of the "
                                                            "training's --split-block)")
    p.add_argument("--min-slices", type=int, default=MIN_SLICES, help="shorter pseudo-series are left out")
    p.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(args: argparse.Namespace) -> dict[str, dict]:
    if args.block < 1 or args.min_slices < 1:
        raise ValueError("--block and --min-slices must be at least 1")
    sections = {}
    if args.foreign_series is None:
        for folder in args.model:
            sections[str(folder)] = out_of_fold_section(folder, args.source, args.block, args.min_slices)
    else:
        items = foreign_folder_items(args.foreign_series, args.foreign_class)
        cache = ScoreCache([path for _, _, _, path in items], args.quiet)
        for folder in args.model:
            model = load_model(folder)
            sections[str(folder)] = foreign_section(model, args.foreign_series, cache.model(model), items,
                                                    args.block, args.min_slices)
    part = "out_of_fold" if args.foreign_series is None else "foreign"
    for folder, section in sections.items():
        if not args.dry_run:
            write_section(Path(folder), part, section)
        print(f"{folder}: {section['statement']}")
    return sections


run = command(get_args_parser, main, (CheckpointError, DatasetError, ValueError))


if __name__ == "__main__":
    sys.exit(run())
