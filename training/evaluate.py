"""Evaluate a trained model on a folder of labelled slices.

    python -m training.evaluate --model models/NAME --data DIR [--split test] --out report.json

Writes the JSON report and a CSV of per-image predictions beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctapp.checkpoint import CheckpointError
from ctapp.data import DatasetError, scan_dataset
from ctapp.evaluation import evaluate_files, write_report
from ctapp.model_folders import load_model
from training.cli import HelpFormatter, command
from training.engine import Progress


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a trained model on a folder of class sub-folders.",
                                add_help=add_help, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="model folder: a network's (model.pt) or an ensemble's (ensemble.json), with model_card.json")
    p.add_argument("--data", required=True, help="dataset root (split folders or class folders)")
    p.add_argument("--split", default=None, choices=["train", "valid", "test"],
                   help="evaluate this split only; default: every image under --data")
    p.add_argument("--out", required=True, help="report JSON path; the per-image CSV is written beside it")
    p.add_argument("--dedupe", action="store_true", help="count an image repeated under several names once")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--data-root", action="append", type=Path, default=None,
                   help="the CSV names each image by its path below the data root that holds it (and its SHA-256), "
                        "so that the report pairs and opens on any machine; repeat for several roots; default: "
                        "CTAPP_DATA_ROOTS, else ../shared/data beside the repository")
    return p


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(args: argparse.Namespace) -> dict:
    model = load_model(args.model)
    index = scan_dataset(args.data, class_names=model.class_names)
    samples = index.split(args.split) if args.split else index.samples
    if not samples:
        raise DatasetError(f"{args.data}: no images" + (f" in a '{args.split}' split (found splits: "
                                                        f"{', '.join(index.splits) or 'none'})" if args.split else ""))
    bar = Progress(len(samples), "evaluating", unit="image", enabled=not args.quiet)
    report, rows = evaluate_files(model, [s.path for s in samples], [s.label for s in samples],
                                  dedupe=args.dedupe, workers=args.workers, root=index.root,
                                  image_roots=args.data_root,
                                  on_progress=lambda done, total: bar.update(done))
    report.update(data=str(index.root), split=args.split or "all")
    csv_path = write_report(report, rows, args.out)
    extra = ""
    if "sensitivity" in report:
        # None where the images hold no positive (or no negative) case
        extra = f" sensitivity {_fmt(report['sensitivity'])} specificity {_fmt(report['specificity'])}"
    print(f"{report['images']} images ({len(report['unreadable'])} unreadable, {report['duplicates_skipped']} "
          f"duplicates skipped): accuracy {report['accuracy']:.4f} macro-F1 {report['macro_f1']:.4f} "
          f"AUC {_fmt(report['roc_auc']['macro'])} ECE {report['ece']:.4f}{extra}\n"
          f"wrote {args.out} and {csv_path}")
    return report


run = command(get_args_parser, main, (DatasetError, CheckpointError, ValueError))


if __name__ == "__main__":
    sys.exit(run())
