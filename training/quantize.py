"""Calibrate the int8 path of trained models, and measure how far it lands from fp32.

    python -m training.quantize models/lung-ensemble models/covid-ensemble --data ../shared/data

For a network's folder: its evaluation report's slices (the model's own
training sources, named below ``--data``) go through the model's own
preprocessing; ``--calibration-slices`` of them, drawn at random, fit the range
of every activation the int8 network quantizes (``ctapp.quantized``); then every
slice is answered in fp32 and in int8, and the agreement (answer states kept,
largest and 99th-percentile probability difference, out-of-distribution score
change) is written with the ranges to ``quantization.json`` in the folder. For
an ensemble's folder: each member as above on the ensemble's slices, then the
ensemble's own agreement, computed from its members' answers, is written to the
ensemble's ``quantization.json`` (it holds no ranges: members keep their own).
The weights are not touched.
"""
from __future__ import annotations

import argparse
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ctapp.checkpoint import CheckpointError
from ctapp.evaluation import read_predictions
from ctapp.inference import BatchScores, LoadedModel
from ctapp.model_folders import REPORT_FILE, load_model
from ctapp.paths import DEFAULT_DATA_ROOT
from ctapp.precision import cpu_has_fast_bf16, inference_precision
from ctapp.preprocess import load_squares, normalize
from ctapp.quantized import CALIBRATION_FILE, CALIBRATION_FORMAT, calibrate, stage_layers, write_calibration
from training.cli import HelpFormatter, command
from training.engine import Progress


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Calibrate the int8 path of model folders and measure its agreement "
                                            "with fp32 on the models' own evaluation slices.",
                                add_help=add_help, formatter_class=HelpFormatter)
    p.add_argument("models", nargs="+", type=Path,
                   help="model folders: a network's (model.pt) or an ensemble's (ensemble.json: its members are "
                        "calibrated, then the ensemble's agreement is measured)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_ROOT,
                   help="the data root below which each model's eval_report.csv names its slices "
                        "(default: ../shared/data beside the repository)")
    p.add_argument("--calibration-slices", type=int, default=256,
                   help="slices drawn from the report to fit the activation ranges")
    p.add_argument("--check-slices", type=int, default=0,
                   help="answer only this many slices of the report (drawn at random) in fp32 and int8; "
                        "0: every slice")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws of calibration and check slices")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def report_slices(folder: Path, data: Path, limit: int, seed: int) -> list[Path]:
    """The slices a model's evaluation report names, found below ``data``."""
    rows = read_predictions(folder / REPORT_FILE)
    if not rows:
        raise CheckpointError(f"{folder}: no {REPORT_FILE} with its per-image CSV: nothing to calibrate on")
    paths = [data / row["image"] for row in rows if row.get("image")]
    found = [path for path in paths if path.is_file()]
    if not found:
        raise CheckpointError(f"{folder}: none of the {len(rows)} slices its report names is under {data} "
                              f"(give the data root with --data)")
    if len(found) < len(paths):
        print(f"{folder.name}: {len(paths) - len(found)} of {len(paths)} report slices not found under {data}; "
              f"using the other {len(found)}")
    if 0 < limit < len(found):
        keep = np.random.default_rng(seed).choice(len(found), limit, replace=False)
        found = [found[i] for i in sorted(keep)]
    return found


def agreement(reference: BatchScores, int8: BatchScores) -> dict:
    """How far int8 answers land from fp32 ones on the same slices."""
    ok = [i for i, state in enumerate(reference.states) if state]
    states = [(reference.states[i], int8.states[i]) for i in ok]
    difference = np.abs(reference.probs[ok] - int8.probs[ok]).max(axis=1)
    changed: dict[str, int] = {}
    for before, after in states:
        if before != after:
            changed[f"{before} -> {after}"] = changed.get(f"{before} -> {after}", 0) + 1
    figures = {"slices": len(ok), "state_agreement": sum(a == b for a, b in states) / len(ok),
               "states_changed": changed,
               "label_agreement": float(np.mean(reference.probs[ok].argmax(1) == int8.probs[ok].argmax(1))),
               "max_abs_dp": float(difference.max()), "p99_abs_dp": float(np.percentile(difference, 99)),
               "median_abs_dp": float(np.median(difference))}
    ood, ood_int8 = reference.ood_scores[ok], int8.ood_scores[ok]
    if not np.isnan(ood).all():
        ratio = np.abs(np.log(np.maximum(ood_int8, 1e-12) / np.maximum(ood, 1e-12)))
        figures |= {"ood_score_change_p99": float(np.expm1(np.nanpercentile(ratio, 99))),
                    "ood_score_change_max": float(np.expm1(np.nanmax(ratio)))}
    return figures


def measured_where() -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "native_bf16": cpu_has_fast_bf16(), "measured_by": "python -m training.quantize"}


def quantize_network(member: LoadedModel, paths: list[Path], args: argparse.Namespace,
                     ) -> tuple[BatchScores, BatchScores]:
    """Fit the activation ranges of one network on ``paths``, write them, answer
    every slice in fp32 and int8 and add the agreement to the file."""
    config = member.preprocess
    bar = Progress(len(paths), f"{member.name}: reading", unit="slice", enabled=not args.quiet)
    loaded = load_squares(paths, config, workers=2, on_progress=lambda done, _total: bar.update(done))
    ok = [i for i, error in enumerate(loaded.errors) if not error]
    if not ok:
        raise CheckpointError(f"{member.name}: none of its {len(paths)} slices could be read")
    squares, body = loaded.images[ok], [loaded.geometries[i].body_found for i in ok]
    drawn = np.sort(np.random.default_rng(args.seed).permutation(len(ok))[:args.calibration_slices])
    batches = [normalize(squares[drawn[i:i + args.batch_size]], config)
               for i in range(0, len(drawn), args.batch_size)]
    if not args.quiet:
        print(f"{member.name}: fitting the activation ranges on {len(drawn)} slices", file=sys.stderr)
    calibration = calibrate(member.model, member.spec.head, stage_layers(member.feature_layers), batches)
    calibration["calibrated_on"] = f"{len(drawn)} of the slices of {REPORT_FILE} (seed {args.seed})"
    write_calibration(member.path, calibration)
    member.int8_network, member.int8_unavailable = None, ""
    answers = []
    for precision in (inference_precision("off"), inference_precision("int8")):
        member.use_precision(precision)
        if member.int8_unavailable:
            raise CheckpointError(member.int8_unavailable)
        bar = Progress(len(ok), f"{member.name}: {precision.describe()}", unit="slice", enabled=not args.quiet)
        answers.append(member.score_squares(squares, body, batch_size=args.batch_size,
                                            on_progress=lambda done, _total: bar.update(done)))
    calibration["agreement"] = agreement(*answers) | measured_where()
    write_calibration(member.path, calibration)
    report(member.name, calibration["agreement"])
    return tuple(_all_rows(scores, ok, len(paths)) for scores in answers)


def _all_rows(scores: BatchScores, ok: list[int], count: int) -> BatchScores:
    """Scores of the readable slices spread over all ``count`` rows ('' state where unreadable)."""
    if len(ok) == count:
        return scores
    full = BatchScores(np.full((count, scores.probs.shape[1]), np.nan), np.full((count, scores.probs.shape[1]),
                       np.nan), np.full(count, np.nan), [""] * count, [[] for _ in range(count)],
                       ["unreadable"] * count, [""] * count, [True] * count)
    for j, i in enumerate(ok):
        full.probs[i], full.raw_probs[i], full.ood_scores[i] = scores.probs[j], scores.raw_probs[j], \
            scores.ood_scores[j]
        full.states[i], full.reasons[i], full.errors[i], full.body_found[i] = scores.states[j], \
            scores.reasons[j], "", scores.body_found[j]
    return full


def report(name: str, figures: dict) -> None:
    print(f"{name}: int8 kept the answer state of {figures['state_agreement']:.2%} of {figures['slices']} slices "
          f"({figures['states_changed'] or 'none changed'}); probability difference max {figures['max_abs_dp']:.3f}, "
          f"99th percentile {figures['p99_abs_dp']:.3f}, median {figures['median_abs_dp']:.4f}", flush=True)


def main(args: argparse.Namespace) -> None:
    for folder in args.models:
        model = load_model(folder)
        paths = report_slices(Path(folder), args.data, args.check_slices, args.seed)
        if isinstance(model, LoadedModel):
            quantize_network(model, paths, args)
            continue
        parts = [quantize_network(member, paths, args) for member in model.members]
        reference, int8 = (model.combine([part[k] for part in parts]) for k in (0, 1))
        figures = agreement(reference, int8) | measured_where()
        write_calibration(Path(folder), {"format": CALIBRATION_FORMAT, "members": [m.name for m in model.members],
                                         "note": f"the members' {CALIBRATION_FILE} hold the activation ranges",
                                         "agreement": figures})
        report(model.name, figures)


run = command(get_args_parser, main, (CheckpointError, ValueError))


if __name__ == "__main__":
    sys.exit(run())
