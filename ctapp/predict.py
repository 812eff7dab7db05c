"""Classify slices, series and volumes from the command line.

    python -m ctapp.predict INPUT... --model models/NAME [--json]

INPUT: image files (PNG, JPEG, TIFF, BMP, DICOM), folders (searched
recursively; DICOM files of several series may be mixed, with or without
extensions), ``.zip`` archives of either, NIfTI volumes (``.nii``,
``.nii.gz``), multi-frame and enhanced CT DICOM.

A single image is one line, as it always was. A series (two or more DICOM
slices of one SeriesInstanceUID, a multi-frame file or a volume) is one line
per slice in reading order, then one summary line with its verdict
(``ctapp.series.VERDICT_RULE``). Slices are numbered from 1 (the most
superior), as the app numbers them. With ``--json`` every line is a JSON
object: ``{"kind": "slice", "slice_number": 1, ...}``, ``{"kind": "series",
"key_slice_numbers": [...], ...}``, or ``{"file": ..., "error": ...}``.
Progress goes to stderr. An unreadable file gets an error line and the others
are still classified; the exit status is 1 when any file or series failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .checkpoint import CheckpointError
from .data import IGNORED_FILES, IGNORED_SUFFIXES
from .imaging import ImageDecodeError, is_dicom
from .model_folders import load_model
from .series import SeriesPredictions, classify_series, summarise
from .series_inputs import inputs_from_paths, read_inputs
from .volumes import ReadResult, Series

SNIFF_BYTES = 4096
PROG = "python -m ctapp.predict"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Classify CT slices, series and volumes (PNG, JPEG, DICOM, "
                                                       "zip, NIfTI) with a trained model or an ensemble.",
                                add_help=add_help)
    p.add_argument("inputs", nargs="+", help="image files, DICOM series, zip archives, NIfTI volumes, or folders "
                                             "searched recursively")
    p.add_argument("--model", required=True, help="a model folder (model.pt and model_card.json), an ensemble "
                                                   "folder (ensemble.json) or a model.pt file, e.g. "
                                                   "models/lung-ensemble")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--batch-size", type=int, default=32,
                   help="slices per forward pass of a series (default %(default)s)")
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


def _may_be_series(path: Path) -> bool:
    """Whether a file is read as part of a series: DICOM, zip, NIfTI (by content)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    return is_dicom(head) or head[:4] == b"PK\x03\x04" or head[:2] == b"\x1f\x8b" or \
        head[344:348] == b"n+1\0" or head[4:8] == b"n+2\0"


def _single_dicom(series: Series) -> bool:
    """A series of one single-frame DICOM file: classified as a slice, as before."""
    return series.kind == "DICOM" and len(series) == 1 and series.reference is not None and \
        series.reference.instances[0][2] is None


def slice_record(path: str, p, series: str | None = None, index: int | None = None) -> dict:
    """One slice's JSON line; ``index`` counts from 0 in reading order, the line from 1."""
    return {"kind": "slice", "series": series, "slice_number": None if index is None else index + 1, "file": path,
            **p.to_dict()}


def series_record(series: Series, result: SeriesPredictions) -> dict:
    summary = summarise(series.id, result)
    return {"kind": "series", "series": series.id, "slices": len(series), "label": summary.label,
            "verdict": summary.verdict, "has_result": summary.has_result, "rule": summary.rule,
            "confident_counts": summary.confident_counts, "uncertain": summary.uncertain,
            "uncertain_by_state": summary.uncertain_by_state, "key_slice_numbers": [i + 1 for i in summary.key_slices],
            "other_findings": summary.other_findings, "source": series.kind, "description": series.description(),
            "seconds": round(result.seconds, 3)}


def _text_slice(path: str, p) -> str:
    probs = " ".join(f"{name}={value:.3f}" for name, value in p.probabilities.items())
    # An uncertain answer never reads like a result: the label column says so.
    label = f"UNCERTAIN ({p.state}; leans {p.label})" if p.uncertain else p.label
    flags = f"\t{'; '.join(p.reasons)}" if p.reasons else ""
    return f"{path}\t{label}\t{p.confidence:.3f}\t{probs}{flags}"


def _text_series(series: Series, result: SeriesPredictions) -> list[str]:
    """A series as a block: a header, one aligned row per slice, the verdict."""
    rows = [("slice", "file", "result", "confidence", "probabilities", "flags")]
    for i, p in enumerate(result.predictions):
        label = f"UNCERTAIN ({p.state}; leans {p.label})" if p.uncertain else p.label
        source = series.sources[i] if series.kind != "NIfTI" else f"{series.sources[i]}#{i + 1}"
        probabilities = " ".join(f"{k}={v:.3f}" for k, v in p.probabilities.items())
        rows.append((str(i + 1), source, label, f"{p.confidence:.3f}", probabilities, "; ".join(p.reasons)))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    summary = summarise(series.id, result)
    lines = [f"== series {series.id}: {series.description()} (slice 1 is the most superior)"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else "")
              for r in rows]
    lines.append(f"== series {series.id}: {summary.verdict}")
    return [line.rstrip() for line in lines]


def _error(path: str, message: str, as_json: bool, series: str | None = None) -> str:
    if as_json:
        return json.dumps({"file": path, "error": message, **({"series": series} if series else {})})
    return f"{path}\tERROR\t{message}"


def _progress(series_id: str):
    started = time.perf_counter()
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        if tty:
            print(f"\rseries {series_id}: {done}/{total} slices classified", end="", file=sys.stderr, flush=True)
        if done == total:
            print(f"{'' if not tty else chr(13)}series {series_id}: {total} slices classified in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return show


def main(args: argparse.Namespace) -> int:
    try:
        model = load_model(args.model)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = expand(args.inputs)
    # Single images are read as before, by path; DICOM, zip and NIfTI files are
    # read together so that slices of one series are grouped whatever folder
    # or argument they came from.
    grouped = [p for p in paths if p.is_file() and _may_be_series(p)]
    read = read_inputs(inputs_from_paths(grouped), window=model.preprocess.window) if grouped else ReadResult()
    series_by_id = {s.id: s for s in read.series}
    errors_by_key = {e.series or e.name: e for e in read.errors}
    images_by_name = dict(read.images)  # loose images from an archive, decoded by read_inputs
    position = {str(p): i for i, p in enumerate(paths)}
    # Every line appears where its (first) file was given.
    plan = [(position[str(p)], "file", p) for p in paths if not (p.is_file() and _may_be_series(p))]
    plan += [(position[str(grouped[read.origin[entry]])], *entry) for entry in read.order]
    plan.sort(key=lambda item: item[0])
    singles = {str(p) for p in grouped}

    def classify_slice(name: str, source) -> bool:
        """Print one slice's line, or its error; False when it could not be read."""
        try:
            p = model.predict(source)
        except ImageDecodeError as exc:
            print(_error(name, str(exc), args.json))
            return False
        print(json.dumps(slice_record(name, p)) if args.json else _text_slice(name, p))
        return True

    failed = False
    for _, kind, key in plan:
        if kind == "file":
            failed |= not classify_slice(str(key), key)
        elif kind == "image":
            failed |= not classify_slice(key, images_by_name[key])
        elif kind == "error":
            failed = True
            error = errors_by_key[key]
            print(_error(error.name, error.message, args.json, error.series))
        elif kind == "series":
            series = series_by_id[key]
            if _single_dicom(series) and series.sources[0] in singles:
                failed |= not classify_slice(series.sources[0], Path(series.sources[0]))
            else:
                result = classify_series(model, series, batch_size=args.batch_size, on_progress=_progress(series.id))
                if args.json:
                    for i, p in enumerate(result.predictions):
                        print(json.dumps(slice_record(series.sources[i], p, series.id, i)))
                    print(json.dumps(series_record(series, result)))
                else:
                    print("\n".join(_text_series(series, result)))
        sys.stdout.flush()
    return 1 if failed else 0


def run(argv: list[str] | None = None) -> int:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
