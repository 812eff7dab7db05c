"""Simulated shift: how a cross-validated model behaves on slices exported
differently from its training images.

    .venv/bin/python benchmarks/shift.py RUN [RUN ...] [--per-fold N] [--update-card]
    .venv/bin/python benchmarks/shift.py RUN --raw-fold K

RUN is the ``--out`` folder of ``training.fit --cv``, or of ``training.ensemble``
over such runs. Each held-out slice is altered the way slices from other
hospitals and papers differ (window, contrast, sharpness, JPEG artefacts, crop,
borders, arrows and text) and classified by the fold model that never saw it,
with that fold's calibration and thresholds (``cv/fold-K/calibrated.pt``; an
ensemble: its members' fold-K models, with the temperature and threshold the
ensemble fitted on the other folds). Printed per shift: the share of
slices flagged (not a chest CT / unlike the training images / low confidence),
the accuracy of the answers given, and confident mistakes (answered and wrong)
as a share of all slices: the figure that must stay small.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctapp.checkpoint import atomic_write_text  # noqa: E402
from ctapp.imaging import decode  # noqa: E402
from ctapp.inference import CONFIDENT, LOW_CONFIDENCE, NOT_CHEST_CT, UNLIKE_TRAINING, EnsembleModel  # noqa: E402
from ctapp.model_folders import ENSEMBLE_FILE, load_model  # noqa: E402
from training.crossval import FOLD_MODEL_FILE, FOLDS_FILE, stored_path  # noqa: E402


def _jpeg(x: np.ndarray, quality: int = 15) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", np.round(x * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


def _annotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White arrows and a panel label pasted on, as in figures taken from papers."""
    h, w = x.shape
    marks = np.zeros((h, w), np.uint8)
    thickness = max(2, w // 150)
    for _ in range(2):
        tip = (int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.3, 0.7) * h))
        tail = (tip[0] + int(0.15 * w), tip[1] - int(0.1 * h))
        cv2.arrowedLine(marks, tail, tip, 255, thickness, tipLength=0.3)
    cv2.putText(marks, "2B", (int(0.05 * w), int(0.12 * h)), cv2.FONT_HERSHEY_SIMPLEX, w / 300, 255, thickness)
    return np.maximum(x, marks.astype(np.float32) / 255)


def _border(x: np.ndarray, value: float) -> np.ndarray:
    pad = max(4, round(0.1 * max(x.shape)))
    return cv2.copyMakeBorder(x, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=value)


def _crop(x: np.ndarray) -> np.ndarray:
    h, w = x.shape
    return x[round(0.15 * h):round(0.85 * h), round(0.15 * w):round(0.85 * w)]


SHIFTS = {
    "none": lambda x, rng: x,
    "narrow window": lambda x, rng: np.clip((x - 0.2) / 0.6, 0, 1),
    "low contrast": lambda x, rng: 0.2 + 0.6 * x,
    "gamma 0.6": lambda x, rng: x ** 0.6,
    "gamma 1.6": lambda x, rng: x ** 1.6,
    "blur": lambda x, rng: cv2.GaussianBlur(x, (0, 0), max(x.shape) / 256),
    "sharpen": lambda x, rng: np.clip(1.8 * x - 0.8 * cv2.GaussianBlur(x, (0, 0), max(x.shape) / 256), 0, 1),
    "JPEG q15": lambda x, rng: _jpeg(x),
    "zoomed crop": lambda x, rng: _crop(x),
    "white border": lambda x, rng: _border(x, 1.0),
    "arrows + text": _annotate,
    "noise": lambda x, rng: np.clip(x + rng.normal(0, 0.04, x.shape), 0, 1).astype(np.float32),
}


def cross_validated_runs(run: Path) -> list[Path]:
    """The ``training.fit --cv`` folders behind ``run``: itself, or an ensemble's members."""
    if (run / ENSEMBLE_FILE).is_file():
        return [(run / m).resolve() for m in json.loads((run / ENSEMBLE_FILE).read_text())["members"]]
    return [run]


def fold_model(run: Path, k: int):
    """Fold ``k``'s model with the calibration and thresholds fitted without its held-out images."""
    members = [load_model(r / "cv" / f"fold-{k}" / FOLD_MODEL_FILE) for r in cross_validated_runs(run)]
    if not (run / ENSEMBLE_FILE).is_file():
        return members[0]
    fitted = {f["fold"]: f for f in json.loads((run / "eval_report.json").read_text())["crossfit"]["per_fold"]}[k]
    return EnsembleModel(members, {"temperature": fitted.get("temperature"),
                                   "confidence_threshold": fitted["confidence_threshold"]}, card={})


def measure(run: Path, per_fold: int, seed: int = 0) -> dict:
    first = cross_validated_runs(run)[0]
    with open(first / "cv" / FOLDS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    root = Path(json.loads((first / "eval_report.json").read_text())["data"])
    rng = np.random.default_rng(seed)
    counts = {name: {"images": 0, CONFIDENT: 0, "correct": 0, NOT_CHEST_CT: 0, UNLIKE_TRAINING: 0,
                     LOW_CONFIDENCE: 0} for name in SHIFTS}
    folds = sorted({int(r["fold"]) for r in rows})
    for k in folds:
        model = fold_model(run, k)
        held = [r for r in rows if int(r["fold"]) == k]
        chosen = rng.choice(len(held), size=min(per_fold, len(held)), replace=False)
        for i in chosen:
            row = held[i]
            image = decode(stored_path(row["path"], root), window=model.preprocess.window)
            for name, shift in SHIFTS.items():
                pixels = np.ascontiguousarray(shift(image.pixels, rng), dtype=np.float32)
                p = model.predict(pixels)
                c = counts[name]
                c["images"] += 1
                c[p.state] += 1
                c["correct"] += int(p.state == CONFIDENT and p.label == row["class"])
    table = {}
    for name, c in counts.items():
        n = max(c["images"], 1)
        table[name] = {"images": c["images"], "not_chest_ct": c[NOT_CHEST_CT] / n,
                       "unlike_training": c[UNLIKE_TRAINING] / n, "low_confidence": c[LOW_CONFIDENCE] / n,
                       "answered": c[CONFIDENT] / n,
                       "accuracy_when_answered": c["correct"] / c[CONFIDENT] if c[CONFIDENT] else None,
                       "confident_mistakes": (c[CONFIDENT] - c["correct"]) / n}
    return table


def raw_accuracy(run: Path, fold: int, seed: int = 0) -> dict[str, float]:
    """Accuracy of the fold model as trained (``cv/fold-K/model.pt``: no
    calibration, no flags) on all of the fold's held-out slices under each
    shift: how much of the shift the network itself absorbs. Usable as soon
    as the fold has finished, before the run is finalised."""
    with open(run / "cv" / FOLDS_FILE, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["fold"]) == fold]
    model = load_model(run / "cv" / f"fold-{fold}" / "model.pt")
    root = Path(json.loads((run / "audit.json").read_text())["root"])
    rng = np.random.default_rng(seed)
    hits = {name: 0 for name in SHIFTS}
    for row in rows:
        image = decode(stored_path(row["path"], root), window=model.preprocess.window)
        for name, shift in SHIFTS.items():
            pixels = np.ascontiguousarray(shift(image.pixels, rng), dtype=np.float32)
            hits[name] += model.predict(pixels).label == row["class"]
    return {name: hits[name] / max(len(rows), 1) for name in SHIFTS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="training.fit --cv or training.ensemble output folders")
    p.add_argument("--per-fold", type=int, default=60, help="held-out slices per fold")
    p.add_argument("--update-card", action="store_true", help="record the figures in each run's model card")
    p.add_argument("--raw-fold", type=int, metavar="K", default=None,
                   help="instead: accuracy of fold K's network as trained, without calibration or flags")
    args = p.parse_args()
    if args.raw_fold is not None:
        for run in args.runs:
            figures = raw_accuracy(run, args.raw_fold)
            print(f"{run.name} fold {args.raw_fold}, accuracy as trained: "
                  + ", ".join(f"{name} {acc:.2f}" for name, acc in figures.items()))
        return
    for run in args.runs:
        table = measure(run, args.per_fold)
        print(f"{run.name}: {table['none']['images']} held-out slices, each shift applied to all")
        print(f"  {'shift':<15} {'not CT':>7} {'unlike':>7} {'low conf':>8} {'answered':>8} {'acc.':>6} "
              f"{'confident mistakes':>18}")
        for name, r in table.items():
            acc = "-" if r["accuracy_when_answered"] is None else f"{r['accuracy_when_answered']:.0%}"
            print(f"  {name:<15} {r['not_chest_ct']:>7.0%} {r['unlike_training']:>7.0%} {r['low_confidence']:>8.0%} "
                  f"{r['answered']:>8.0%} {acc:>6} {r['confident_mistakes']:>18.1%}")
        worst = max(r["confident_mistakes"] for name, r in table.items() if name != "none")
        print(f"  worst confident-mistake rate under a shift: {worst:.1%}")
        if args.update_card:
            card_path = run / "model_card.json"
            card = json.loads(card_path.read_text())
            card["shift_simulation"] = {"method": "held-out slices altered and classified by the fold model that "
                                                  "never saw them (benchmarks/shift.py)", "shifts": table,
                                        "worst_confident_mistakes": worst}
            atomic_write_text(json.dumps(card, indent=2), card_path)


if __name__ == "__main__":
    main()
