"""Audit a dataset folder before training: unreadable files, duplicates,
cross-split copies, label conflicts, class balance, image statistics and a
shortcut probe.

    python -m training.audit --data DIR [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

from ctapp.audit import audit_dataset
from ctapp.data import DatasetError, scan_dataset
from training.cli import command
from training.engine import Progress


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Audit a folder of CT slices (class folders, optionally in splits).",
                                add_help=add_help)
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    return p


def summary_text(report: dict) -> str:
    lines = [
        f"{report['root']} ({report['layout']} layout), classes: {', '.join(report['display_names'])}",
        f"images {report['images']}, readable {report['readable']}, unique {report['unique_images']}",
        f"exact duplicates: {report['duplicate_groups']} groups, {report['redundant_copies']} redundant copies",
        f"evaluation images also in training: {report['cross_split_copies']}",
        f"label conflicts: {len(report['label_conflicts'])}"
        + "".join(f"\n  - {' | '.join(group)}" for group in report["label_conflicts"]),
        f"unreadable: {len(report['unreadable'])}" + "".join(
            f"\n  - {path}: {why}" for path, why in report.get("unreadable_reasons", {}).items()),
        "class balance: " + "; ".join(f"{split}: " + ", ".join(f"{c} {n}" for c, n in row.items())
                                      for split, row in report["class_balance"].items()),
        "image modes: " + ", ".join(f"{m} {n}" for m, n in report["modes"].items()),
    ]
    probe = report["shortcut_probe"]
    if probe.get("accuracy") is not None:
        lines.append(f"shortcut probe (size and brightness only): accuracy {probe['accuracy']:.1%} "
                     f"vs chance {probe['chance']:.1%}")
    lines += [f"policy: {report['policy']}; {report['dropped']} image(s) dropped, {report['kept']} kept"]
    lines += [f"note: {n}" for n in report["notes"]] + [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    index = scan_dataset(args.data)
    bar = Progress(len(index.samples), "auditing", unit="image", enabled=not args.json)
    report = audit_dataset(index, workers=args.workers, progress=lambda done, total: bar.update(done)).to_dict()
    print(json.dumps(report, indent=2) if args.json else summary_text(report))
    return report


run = command(get_args_parser, main, (DatasetError,))


if __name__ == "__main__":
    sys.exit(run())
