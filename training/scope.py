"""Choose a model's scope rule out of fold (``ctapp.scope``) and write its ``scope.json``.

    python -m training.scope --model models/lung-ensemble --finding-model models/covid-resnet50 \\
        --finding covid --says "COVID-19" --scope "lung cancer subtypes and normal slices" \\
        --data ../shared/data/chest-ct-scan-images/Data \\
        --finding-data ../shared/data/sarscov2-ctscan ../shared/data/covid-ct-ucsd ../shared/data/mosmed \\
        --finding-class COVID

The scoped model (cross-validated: it has out-of-fold rows) answers its own
slices as the app does out of fold. The finding model never trained on those
slices (another task's data), so its probabilities there are unseen-slice
figures too. ``min_probability`` is the lowest that withholds at most
``--budget`` of the scoped model's confident out-of-fold answers; the figures
then say what it does to slices showing the finding (``--finding-data``): the
scoped model answers them fresh (it never saw them), the finding model from its
own out-of-fold rows where it trained on their source, fresh elsewhere. Slices
of a source it trained on without an out-of-fold row (dropped as duplicates) are
left out. Pseudo-series of the finding slices of the source whose file numbers
run in series (``training.series_check``) show how many series verdicts name
one of the scoped model's finding classes, before and after.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from ctapp.checkpoint import CheckpointError, atomic_write_text
from ctapp.data import DatasetError
from ctapp.inference import CONFIDENT, BatchScores
from ctapp.model_folders import load_model
from ctapp.scope import SCOPE_FILE, ScopeRule, restate, rule_file
from ctapp.series import finding_classes
from training.cli import HelpFormatter, command
from training.crossval import out_of_fold_scores
from training.series_check import SERIES_SOURCE, foreign_folder_items, foreign_section

BUDGET = 0.02  # at most this share of the scoped model's confident out-of-fold answers withheld


def file_key(path: str | Path) -> str:
    """A slice's source, class folder and file name: how a report row written
    from another working directory is matched to a file."""
    return "/".join(Path(path).parts[-3:])


def resolve(row_path: str, data: Path) -> Path:
    """An out-of-fold row's file: its path as written, or relative to the data folder."""
    path = Path(row_path)
    return path if path.is_file() else data / row_path


def choose_threshold(probability: np.ndarray, confident: np.ndarray, budget: float) -> float:
    """The lowest finding probability whose rule withholds at most ``budget`` of the confident answers."""
    asked = np.sort(probability[confident])[::-1]
    if not len(asked):
        raise ValueError("the model answered none of its out-of-fold slices confidently: no threshold to choose")
    allowed = int(np.floor(budget * len(asked)))
    # Withholding p >= t; t just above the (allowed+1)-th highest keeps `allowed` withheld at most.
    return float(np.nextafter(asked[allowed], np.inf))


def take(scores: BatchScores, rows: list[int]) -> BatchScores:
    """The given rows of ``scores``, in that order (an optional list the scores leave empty stays empty)."""

    def rows_of(values):
        return values[rows] if isinstance(values, np.ndarray) else [values[i] for i in rows] if values else []

    return BatchScores(**{f.name: rows_of(getattr(scores, f.name)) for f in fields(BatchScores)})


def answered(scores: BatchScores, rows: np.ndarray | None = None) -> np.ndarray:
    confident = np.array([state == CONFIDENT for state in scores.states])
    return confident if rows is None else confident & rows


def own_figures(scores: BatchScores, restated: BatchScores, truth: np.ndarray) -> dict:
    """The scoped model's own out-of-fold slices: answers and accuracy before and after the rule."""
    predicted = scores.probs.argmax(1)

    def side(s: BatchScores) -> dict:
        confident = answered(s)
        right = confident & (predicted == truth)
        return {"answered": int(confident.sum()), "coverage": float(confident.mean()),
                "accuracy_when_confident": float(right.sum() / max(confident.sum(), 1))}

    return {"slices": len(truth), "before": side(scores), "after": side(restated),
            "withheld": int(answered(scores).sum() - answered(restated).sum())}


def finding_figures(scores: BatchScores, restated: BatchScores, sources: np.ndarray, finding_idx: list[int]) -> dict:
    """Per source of the finding slices: the scoped model's confident answers, and those naming one of its
    finding classes (a tumour on a pneumonia slice), before and after."""
    predicted = scores.probs.argmax(1)
    names_finding = np.isin(predicted, finding_idx)
    out = {}
    for source in sorted(set(sources)):
        rows = sources == source
        out[source] = {"slices": int(rows.sum()),
                       "answered_before": int(answered(scores, rows).sum()),
                       "answered_after": int(answered(restated, rows).sum()),
                       "finding_class_before": int((answered(scores, rows) & names_finding).sum()),
                       "finding_class_after": int((answered(restated, rows) & names_finding).sum())}
    return out


def finding_probabilities(finding_folder: Path, finding_model, paths: list[Path], index: int
                          ) -> tuple[np.ndarray, dict]:
    """The finding model's probability of its finding in each file, out of fold where it trained on the
    file's source (NaN where such a file has no out-of-fold row), fresh elsewhere; and how many were which."""
    oof, scores = out_of_fold_scores(finding_folder)
    by_key = {file_key(path): float(scores.probs[i, index]) for i, path in enumerate(oof.paths)}
    trained_sources = {row["source"] for row in oof.rows}
    probability = np.full(len(paths), np.nan)
    fresh = []
    for i, path in enumerate(paths):
        key = file_key(path)
        if key in by_key:
            probability[i] = by_key[key]
        elif path.parent.parent.name not in trained_sources:
            fresh.append(i)
    if fresh:
        probability[fresh] = finding_model.score_files([paths[i] for i in fresh]).probs[:, index]
    counts = {"out_of_fold": int(len(paths) - len(fresh) - np.isnan(probability).sum()), "fresh": len(fresh),
              "left_out": int(np.isnan(probability).sum())}
    return probability, counts


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.scope", description=__doc__.split("\n\n")[0],
                                add_help=add_help, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the scoped model folder (cross-validated)")
    p.add_argument("--data", required=True, type=Path, help="the data folder its out-of-fold rows are relative to")
    p.add_argument("--finding-model", required=True, type=Path, help="the model folder that sees the other finding")
    p.add_argument("--finding", required=True, help="that model's class key of the finding, e.g. covid")
    p.add_argument("--says", required=True, help="the finding in words, e.g. 'COVID-19'")
    p.add_argument("--scope", required=True, help="what the scoped model is for, in words")
    p.add_argument("--finding-data", nargs="+", required=True, type=Path,
                   help="dataset folders (class sub-folders) with slices that show the finding")
    p.add_argument("--finding-class", nargs="+", required=True, help="their class folders that show it, e.g. COVID")
    p.add_argument("--budget", type=float, default=BUDGET,
                   help="at most this share of the scoped model's confident out-of-fold answers withheld")
    p.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")
    return p


def main(args: argparse.Namespace) -> dict:
    if not 0.0 <= args.budget < 1.0:
        raise ValueError("--budget must be in [0, 1)")
    # The rule names the finding model relative to the scoped model's folder, as the app resolves it.
    target = Path(os.path.relpath(args.finding_model.resolve(), args.model.resolve()))
    finding_model = load_model(args.finding_model, scoped=False)
    if args.finding not in finding_model.class_names:
        raise ValueError(f"{args.finding_model} has no class {args.finding!r} ({finding_model.class_names})")
    index = finding_model.class_names.index(args.finding)

    oof, own = out_of_fold_scores(args.model)
    own_paths = [resolve(path, args.data) for path in oof.paths]
    missing = [str(p) for p in own_paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} out-of-fold file(s) not found under {args.data}, e.g. {missing[0]}")
    own_probability = finding_model.score_files(own_paths).probs[:, index]
    threshold = choose_threshold(own_probability, answered(own), args.budget)
    rule = ScopeRule(str(target), args.finding, threshold, args.says, args.scope)
    truth = np.array([oof.class_names.index(row["true"]) for row in oof.rows])
    own_after = restate(own, own_probability, rule)

    items = [item for root in args.finding_data for item in foreign_folder_items(root, args.finding_class)]
    paths = [path for _, _, _, path in items]
    scoped = load_model(args.model, scoped=False)
    before = scoped.score_files(paths)
    probability, asked = finding_probabilities(args.finding_model, finding_model, paths, index)
    keep = ~np.isnan(probability)
    after = restate(before, np.where(keep, probability, -np.inf), rule)
    sources = np.array([path.parent.parent.name for path in paths])
    findings = [scoped.class_names.index(c) for c in finding_classes(scoped.class_names)]
    kept = [i for i in range(len(items)) if keep[i]]

    series = {}
    for root in (root for root in args.finding_data if root.name == SERIES_SOURCE):
        rows = [i for i in kept if paths[i].parent.parent == root]
        for name, scores in (("before", before), ("after", after)):
            section = foreign_section(scoped, root, take(scores, rows), [items[i] for i in rows])
            if section["series"]:
                series.setdefault(root.name, {})[name] = {
                    key: section[key] for key in ("series", "counts", "finding_verdicts", "finding_series")}

    own_fig = own_figures(own, own_after, truth)
    found = finding_figures(take(before, kept), take(after, kept), sources[kept], findings)
    statement = (f"Withholds {own_fig['withheld']} of {own_fig['before']['answered']} confident out-of-fold answers "
                 f"(accuracy when confident {own_fig['before']['accuracy_when_confident']:.1%} -> "
                 f"{own_fig['after']['accuracy_when_confident']:.1%}); on slices showing {args.says}: "
                 + "; ".join(f"{s} {f['finding_class_before']} -> {f['finding_class_after']} answers naming a "
                             f"finding class ({f['answered_before']} -> {f['answered_after']} answered)"
                             for s, f in found.items()) + ".")
    figures = {"chosen_by": f"the lowest {args.finding} probability of {args.finding_model.name} that withholds at "
                            f"most {args.budget:.0%} of this model's confident out-of-fold answers",
               "budget": args.budget, "own_out_of_fold": own_fig, "finding_slices": found,
               "finding_probabilities": asked, "series": series, "statement": statement}
    if not args.dry_run:
        atomic_write_text(rule_file(rule, figures), args.model / SCOPE_FILE)
    print(f"{args.model}: min_probability {threshold:.3f}. {statement}")
    for source, parts in series.items():
        print(f"  series of {source}: " + ", ".join(f"{name} {part['finding_verdicts']} of {part['series']} name a "
                                                    f"finding class" for name, part in parts.items()))
    return {"rule": rule, **figures}


run = command(get_args_parser, main, (CheckpointError, DatasetError, ValueError))


if __name__ == "__main__":
    sys.exit(run())
