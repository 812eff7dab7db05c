"""Classify slices from the command line.

    python -m ctapp.predict FILE_OR_DIR... --model models/NAME [--json]

One line per image; an unreadable file gets an error line and the others are
still classified; the exit status is 1 when any file failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .data import IGNORED_FILES, IGNORED_SUFFIXES
from .imaging import ImageDecodeError
from .inference import load_model


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Classify CT slices (PNG, JPEG, DICOM) with a trained model.",
                                add_help=add_help)
    p.add_argument("inputs", nargs="+", help="image files, or folders searched recursively")
    p.add_argument("--model", required=True, help="model folder (with model.pt and model_card.json)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    return p


def expand(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                            and p.name.lower() not in IGNORED_FILES and p.suffix.lower() not in IGNORED_SUFFIXES)
        else:
            files.append(path)
    return files


def main(args: argparse.Namespace) -> int:
    try:
        model = load_model(args.model)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for path in expand(args.inputs):
        try:
            p = model.predict(path)
        except ImageDecodeError as exc:
            failures += 1
            print(json.dumps({"file": str(path), "error": str(exc)}) if args.json else f"{path}\tERROR\t{exc}")
            continue
        if args.json:
            print(json.dumps({"file": str(path), **p.to_dict()}))
        else:
            probs = " ".join(f"{name}={value:.3f}" for name, value in p.probabilities.items())
            # An uncertain answer never reads like a result: the label column says so.
            label = f"UNCERTAIN ({p.state}; leans {p.label})" if p.uncertain else p.label
            flags = f"\t{'; '.join(p.reasons)}" if p.reasons else ""
            print(f"{path}\t{label}\t{p.confidence:.3f}\t{probs}{flags}")
        sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
