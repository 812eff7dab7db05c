"""The out-of-distribution gate measured both ways, in one table: is real chest
CT let through, and is everything else refused?

    .venv/bin/python benchmarks/gate.py [--models models] [--mosmed ../shared/data/mosmed] [--out gate.json]
    .venv/bin/python benchmarks/gate.py --rules      # also: the ensemble rules compared

For every shipped model (networks and ensembles), one row per set of slices:

* each training source, out of fold: every slice in the model's
  ``eval_report.csv`` with the state the app would give it there (its OOD scores
  against the thresholds its fold fitted on the other folds, its calibrated
  confidence against its fold's threshold; an ensemble: its members' rows
  joined by path, combined as the app combines them under
  :data:`ctapp.ood.ENSEMBLE_GATE`; :func:`training.crossval.out_of_fold_scores`),
  and 'not a chest CT' where the chest-CT check beside the models
  (``models/chest-check``) refused the slice out of fold (by its own folds:
  ``out_of_fold.csv``, :func:`ctapp.chest_check.out_of_fold_refusals_beside`);
* each kind of the foreign-image set (``training.foreign.foreign_set``: photos,
  documents, radiographs, other body parts, reformats, phantoms...), answered by
  the shipped model through the app's own decoder;
* MosMed, CT from another hospital and export that no shipped model saw: the
  share flagged, and the accuracy of the answers given (COVID models only; the
  lung models have no class for it).

Columns: slices, share 'not a chest CT', share 'unlike the training images',
share answered (a confident result), accuracy of the answers, and confidently
wrong (answered and wrong) as a share of all slices. ``--rules`` compares ways
an ensemble can combine its members' evidence (:class:`ctapp.ood.EnsembleGate`)
on the same out-of-fold rows and sets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctapp.checkpoint import atomic_write_text  # noqa: E402
from ctapp.chest_check import CHECK_FOLDER, out_of_fold_refusals  # noqa: E402
from ctapp.data import class_key, scan_dataset  # noqa: E402
from ctapp.imaging import decode  # noqa: E402
from ctapp.inference import CONFIDENT, NOT_CHEST_CT, UNLIKE_TRAINING, BatchScores  # noqa: E402
from ctapp.model_folders import ENSEMBLE_FILE, load_model, read_ensemble_spec  # noqa: E402
from ctapp.ood import ENSEMBLE_GATE, EnsembleGate  # noqa: E402
from training.crossval import out_of_fold_scores  # noqa: E402
from training.foreign import FOREIGN_KINDS, foreign_set  # noqa: E402

RULES = [EnsembleGate(not_ct, unlike) for not_ct in ("any", "all") for unlike in EnsembleGate.COMBINE]
MOSMED = "MosMed (another hospital)"


def tally(answers: list[dict]) -> dict:
    """Shares of a set of answers, each ``{"state", "correct"}`` (``correct``
    None where the model has no class for the slice)."""
    n = len(answers)
    answered = [a for a in answers if a["state"] == CONFIDENT]
    scored = [a for a in answered if a["correct"] is not None]
    wrong = sum(1 for a in scored if not a["correct"])
    scorable = any(a["correct"] is not None for a in answers)
    return {"slices": n,
            "not_chest_ct": sum(a["state"] == NOT_CHEST_CT for a in answers) / max(n, 1),
            "unlike": sum(a["state"] == UNLIKE_TRAINING for a in answers) / max(n, 1),
            "answered": len(answered) / max(n, 1),
            "accuracy_answered": (1 - wrong / len(scored)) if scored else None,
            "confidently_wrong": wrong / max(n, 1) if scorable else None}


# --------------------------------------------------------------------------- out of fold


def oof_answers(folder: Path, gate: EnsembleGate = ENSEMBLE_GATE) -> list[dict]:
    """Every out-of-fold slice of a model: ``{"source", "state", "correct"}``, the
    state as the app gives it (an ensemble's under ``gate``, with the out-of-fold
    verdicts of the chest-CT check beside it where there is one), by
    :func:`training.crossval.out_of_fold_scores`."""
    oof, scores = out_of_fold_scores(folder, gate)
    predicted = [oof.class_names[int(np.argmax(probs))] for probs in scores.probs]
    return [{"source": row["source"], "state": state, "correct": label == row["true"]}
            for row, state, label in zip(oof.rows, scores.states, predicted)]


def chest_check_verdicts(models_dir: Path) -> dict[str, bool] | None:
    """The out-of-fold verdicts of the chest-CT check beside the models, or None where there is none
    (for the table's summary: :func:`oof_answers` finds them itself)."""
    folder = models_dir / CHECK_FOLDER
    return out_of_fold_refusals(folder) if folder.is_dir() else None


# --------------------------------------------------------------------------- the shipped models


def final_scores(folder: Path, slices_of: dict[str, list], mosmed: list[Path]) -> dict[str, BatchScores]:
    """A network's scores of each named set of slices (decoded in its window)
    and of the MosMed files (read as the app reads files)."""
    model = load_model(folder)
    scores = {name: model.score_slices([decode(data, window=model.preprocess.window) for data in files])
              for name, files in slices_of.items()}
    if mosmed:
        scores[MOSMED] = model.score_files(mosmed)
    return scores


def final_answers(model, parts: list[BatchScores], truth: list[int | None], gate: EnsembleGate = ENSEMBLE_GATE,
                  ) -> list[dict]:
    """The answers of a shipped model (a network: its own scores; an ensemble:
    its members' scores combined under ``gate``) with whether each is right."""
    scores = parts[0] if len(parts) == 1 else model.combine(parts, gate)
    return [{"state": state, "correct": None if t is None else int(np.argmax(scores.probs[i])) == t}
            for i, (state, t) in enumerate(zip(scores.states, truth))]


def mosmed_files(root: Path | None, limit: int | None) -> tuple[list[Path], list[str]]:
    if root is None or not root.is_dir():
        return [], []
    index = scan_dataset(root)
    samples = index.samples[:: max(1, len(index.samples) // limit)] if limit else index.samples
    return [s.path for s in samples], [index.class_names[s.label] for s in samples]


def measure(models_dir: Path, mosmed_root: Path | None, mosmed_limit: int | None, rules: bool) -> dict:
    folders = sorted(p for p in models_dir.iterdir() if (p / "eval_report.csv").is_file())
    foreign = foreign_set()
    by_kind = {kind: [f.data for f in foreign if f.kind == kind] for kind in FOREIGN_KINDS}
    paths, mosmed_labels = mosmed_files(mosmed_root, mosmed_limit)
    networks = [p for p in folders if not (p / ENSEMBLE_FILE).is_file()]
    scores = {p.resolve(): final_scores(p, by_kind, paths) for p in networks}
    refused = chest_check_verdicts(models_dir)
    table, comparison = {}, {}
    for folder in folders:
        model = load_model(folder)
        member_folders = read_ensemble_spec(folder)[1] if (folder / ENSEMBLE_FILE).is_file() else [folder.resolve()]
        keys = [class_key(name) for name in model.class_names]
        mosmed_truth = [keys.index(class_key(label)) if class_key(label) in keys else None for label in mosmed_labels]

        def rows_for(gate: EnsembleGate) -> dict:
            oof = oof_answers(folder, gate)
            out = {f"out of fold: {s}": tally([a for a in oof if a["source"] == s])
                   for s in sorted({a["source"] for a in oof})}
            every = []
            for kind in FOREIGN_KINDS:
                answers = final_answers(model, [scores[m][kind] for m in member_folders],
                                        [None] * len(by_kind[kind]), gate)
                out[f"foreign: {kind}"] = tally(answers)
                every += answers
            out["foreign: all"] = tally(every)
            if paths:
                out[MOSMED] = tally(final_answers(model, [scores[m][MOSMED] for m in member_folders], mosmed_truth,
                                                  gate))
            return out

        table[folder.name] = rows_for(ENSEMBLE_GATE)
        if rules and len(member_folders) > 1:
            comparison[folder.name] = {f"{g.not_ct} / {g.unlike}": summary(rows_for(g)) for g in RULES}
    return {"table": table, "rules": comparison, "shipped_rule": f"{ENSEMBLE_GATE.not_ct} / {ENSEMBLE_GATE.unlike}",
            "foreign_images": len(foreign), "mosmed_slices": len(paths),
            "chest_check_out_of_fold": None if refused is None else {"slices": len(refused),
                                                                     "refused": sum(refused.values())}}


def summary(rows: dict) -> dict:
    """One rule's headline figures: out of fold over every source, the foreign set, MosMed."""
    oof = [r for name, r in rows.items() if name.startswith("out of fold")]
    n = sum(r["slices"] for r in oof)
    pooled = {key: sum(r[key] * r["slices"] for r in oof) / n
              for key in ("not_chest_ct", "unlike", "answered", "confidently_wrong")}
    return {"oof": pooled, "foreign_not_chest_ct": rows["foreign: all"]["not_chest_ct"],
            "foreign_flagged": rows["foreign: all"]["not_chest_ct"] + rows["foreign: all"]["unlike"],
            "mosmed": rows.get(MOSMED)}


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown(result: dict) -> str:
    lines = ["| model | slices of | n | not a chest CT | unlike | answered | accuracy answered | confidently wrong |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, rows in result["table"].items():
        for name, r in rows.items():
            wrong = "-" if r["confidently_wrong"] is None else f"{r['confidently_wrong']:.1%}"
            lines.append(f"| {model} | {name} | {r['slices']} | {_share(r['not_chest_ct'])} | {_share(r['unlike'])} "
                         f"| {_share(r['answered'])} | {_share(r['accuracy_answered'])} | {wrong} |")
    if result["rules"]:
        lines += ["", f"Ensemble rules ('not a chest CT' votes / near ratios combined; shipped: "
                      f"{result['shipped_rule']}):", "",
                  "| ensemble | rule | OOF not CT | OOF unlike | OOF answered | OOF confidently wrong "
                  "| foreign not CT | foreign flagged | MosMed unlike | MosMed answered |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for model, rules in result["rules"].items():
            for rule, s in rules.items():
                mosmed = s["mosmed"] or {}
                lines.append(f"| {model} | {rule} | {s['oof']['not_chest_ct']:.1%} | {s['oof']['unlike']:.1%} "
                             f"| {s['oof']['answered']:.1%} | {s['oof']['confidently_wrong']:.1%} "
                             f"| {s['foreign_not_chest_ct']:.0%} | {s['foreign_flagged']:.0%} "
                             f"| {_share(mosmed.get('unlike'))} | {_share(mosmed.get('answered'))} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=ROOT / "models", help="folder of shipped model folders")
    p.add_argument("--mosmed", type=Path, default=ROOT.parent / "shared" / "data" / "mosmed",
                   help="MosMed slices (another hospital and export); skipped where missing")
    p.add_argument("--mosmed-limit", type=int, default=None, help="at most about this many MosMed slices")
    p.add_argument("--rules", action="store_true", help="also compare the ensemble rules")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    result = measure(args.models, args.mosmed, args.mosmed_limit, args.rules)
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(result, indent=2), args.out)


if __name__ == "__main__":
    main()
