"""Make an ensemble of cross-validated models of one task, with its own card.

    python -m training.ensemble --members models/lung-resnet50 models/lung-vgg19_bn --out models/lung-ensemble

The members must come from ``training.fit --cv`` runs on the same images with
the same folds (same data, ``--cv``, ``--seed``, ``--split-block`` and
``--group-pattern``), so that every image has an out-of-fold prediction from
each member that never saw it. The ensemble's out-of-fold probabilities are the
mean of the members', rescaled by a temperature of its own; temperature and
confidence threshold are fitted on them as a member's are (each fold's on the
other folds for the reported figures). The folder holds
``ensemble.json`` (members, temperature, threshold), ``model_card.json`` comparing the
ensemble with each member, and ``eval_report.json`` + CSV. No weights are
copied: the members' folders are the ensemble's weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ctapp.checkpoint import CheckpointError, atomic_write_text
from ctapp.evaluation import IMAGE_COLUMNS, write_report
from ctapp.inference import CONFIDENT, NOT_CHEST_CT, UNLIKE_TRAINING, ensemble_logits
from ctapp.metrics import (
    calibrated,
    evaluation_report,
    expected_calibration_error,
    fit_temperature,
    risk_coverage,
    selective_statement,
    selective_summary,
    selective_threshold,
)
from ctapp.model_folders import ENSEMBLE_FILE, load_model
from training.card import DISCLAIMER, card_figures, measure_latency
from training.cli import command
from training.crossval import OutOfFold, breakdown, fold_spread


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Combine cross-validated models of one task into an ensemble.",
                                add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--members", nargs="+", required=True, type=Path, help="model folders (training.fit --cv runs)")
    p.add_argument("--out", required=True, type=Path, help="the ensemble's folder")
    p.add_argument("--explain-with", default=None,
                   help="Grad-CAM from this member only (its folder name); default: the mean of all members' maps")
    p.add_argument("--target-accuracy", type=float, default=0.95,
                   help="the confidence threshold is the lowest at which out-of-fold answers reach this accuracy")
    return p


def _compared(report: dict) -> dict:
    """The figures by which the card compares the ensemble with each member."""
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "ece": report["ece"],
            "roc_auc_macro": report["roc_auc"]["macro"], "coverage": report.get("coverage"),
            "accuracy_when_confident": report.get("accuracy_when_confident")}


def main(args: argparse.Namespace) -> Path:
    models = [load_model(m) for m in args.members]
    classes = models[0].class_names
    oof = OutOfFold(args.members)
    paths, folds = oof.paths, oof.folds
    labels = np.array([classes.index(row["true"]) for row in oof.rows])
    sources = np.array([row.get("source", "") for row in oof.rows])
    member_probs = np.stack([[[float(t[p][f"p_{c}"]) for c in classes] for p in paths] for t in oof.tables])
    logits = ensemble_logits(member_probs)
    # The members' out-of-distribution evidence as the app combines it (ctapp.ood.ENSEMBLE_GATE): whether a
    # slice is flagged does not depend on the ensemble's temperature or threshold, fitted next.
    flagged = np.array([state in (NOT_CHEST_CT, UNLIKE_TRAINING) for state in oof.scores().states])

    fits = {}
    for k in np.unique(folds):
        rest = folds != k
        temperature = fit_temperature(logits[rest], labels[rest])
        threshold = selective_threshold(calibrated(logits[rest], temperature), labels[rest], flagged[rest],
                                        args.target_accuracy)
        fits[int(k)] = {"fold": int(k), "temperature": temperature, "confidence_threshold": threshold}
    scores = oof.scores(fits)
    probs, states = scores.probs, scores.states
    uncertain = np.array([state != CONFIDENT for state in states])
    per_fold = list(fits.values())
    temperature = fit_temperature(logits, labels)
    threshold = selective_threshold(calibrated(logits, temperature), labels, flagged, args.target_accuracy)

    names = [m.name for m in models]
    report = evaluation_report(labels, probs, classes, models[0].display_names)
    by_fold = breakdown(probs, labels, uncertain, folds, classes)
    selective = selective_summary(probs, labels, uncertain)
    report.update(
        split=f"out-of-fold ({len(by_fold)}-fold cross-validation), mean of {len(models)} members",
        data=json.loads((args.members[0] / "eval_report.json").read_text()).get("data", ""),  # the rows' paths
        out_of_fold=True, folds=len(by_fold), model=args.out.name, arch="ensemble", members=names,
        temperature=temperature, ece_uncalibrated=expected_calibration_error(calibrated(logits, 1.0), labels),
        ood_flagged=float(flagged.mean()), **selective,
        risk_coverage=risk_coverage(probs, labels),
        fold_spread=fold_spread(by_fold),
        per_fold=by_fold, per_source=breakdown(probs, labels, uncertain, sources, classes)
        if len(set(sources)) > 1 else {}, crossfit={"per_fold": per_fold},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    rows = [{"path": p, "source": sources[i], "fold": int(folds[i]), "true": classes[labels[i]],
             "pred": classes[int(probs[i].argmax())], "confidence": float(probs[i].max()),
             **{f"p_{c}": float(v) for c, v in zip(classes, probs[i])}, "uncertain": bool(uncertain[i]),
             "state": states[i], **{k: oof.rows[i].get(k, "") for k in IMAGE_COLUMNS}} for i, p in enumerate(paths)]

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    spec = {"members": [os.path.relpath(m.resolve(), out.resolve()) for m in args.members],
            "temperature": temperature, "confidence_threshold": threshold, "explain_with": args.explain_with, "name": out.name,
            "created": report["created"]}
    atomic_write_text(json.dumps(spec, indent=2), out / ENSEMBLE_FILE)
    write_report(report, rows, out / "eval_report.json")
    ensemble = load_model(out)
    comparison = {"ensemble": _compared(report)} | {
        name: _compared(json.loads((m.path / "eval_report.json").read_text())) for name, m in zip(names, models)}
    card = {
        "name": out.name, "task": models[0].card.get("task", ""), "classes": classes,
        "display_names": models[0].display_names, "architecture": "ensemble",
        "architecture_title": "Ensemble of " + " + ".join(m.card.get("architecture_title", m.arch) for m in models),
        "members": names, "weights_origin": "the members' (no weights of its own)",
        "size_bytes": sum(m.card.get("size_bytes", 0) for m in models),
        "validation": card_figures(report),
        "member_comparison": comparison,
        "calibration": {"method": "mean of the members' calibrated probabilities, temperature-scaled on the "
                                  f"{len(labels)} out-of-fold predictions (each fold's on the other folds)",
                        "temperature": temperature, "ece_before": report["ece_uncalibrated"],
                        "ece_after": report["ece"]},
        "cross_validation": {"folds": len(by_fold), "images": len(paths)},
        "selective_answers": {"target_accuracy": args.target_accuracy, "confidence_threshold": threshold,
                              **selective, "statement": selective_statement(selective)},
        "confidence_threshold": threshold,
        "gradcam_layer": "mean of the members' maps" if not args.explain_with else f"{args.explain_with}'s",
        "latency_ms": measure_latency(ensemble, repeat=3),
        "created": report["created"],
        "intended_use": "Research and education: exploring CT slice classifiers and their explanations.",
        "limitations": [DISCLAIMER, "Out-of-fold figures on the same sources it was trained on; expect lower "
                                    "accuracy on other scanners, hospitals and patient groups."],
        "disclaimer": DISCLAIMER,
    }
    atomic_write_text(json.dumps(card, indent=2), out / "model_card.json")
    members = ", ".join(f"{n} {c['macro_f1']:.4f}" for n, c in comparison.items() if n != "ensemble")
    print(f"{out}: out-of-fold accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} "
          f"(members: {members}); {card['selective_answers']['statement']}", file=sys.stderr)
    return out


run = command(get_args_parser, main, (CheckpointError, ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(run())
