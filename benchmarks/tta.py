"""Test-time augmentation, measured out of fold: does averaging a slice with its
mirror image help a cross-validated model?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tta.py RUN [RUN ...]

RUN is the ``--out`` folder of ``training.fit --cv``. Every image is classified
by the fold model that never saw it (``cv/fold-K/calibrated.pt``), once as it is
and once mirrored left-right; the calibrated probabilities of the two are
averaged. Printed: out-of-fold accuracy, macro-F1, macro AUC and the accuracy
of the most confident 60% of slices, without and with the mirror, and the CPU
cost (two forward passes per slice instead of one).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctapp.imaging import decode  # noqa: E402
from ctapp.model_folders import load_model  # noqa: E402
from ctapp.metrics import evaluation_report  # noqa: E402
from training.crossval import FOLD_MODEL_FILE, FOLDS_FILE, stored_path  # noqa: E402


def accuracy_at_coverage(probs: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    order = np.argsort(-probs.max(axis=1), kind="stable")[:max(1, round(coverage * len(labels)))]
    return float((probs[order].argmax(axis=1) == labels[order]).mean())


def measure(run: Path) -> dict:
    with open(run / "cv" / FOLDS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    report = json.loads((run / "eval_report.json").read_text())
    root, classes = Path(report["data"]), report["class_names"]
    plain, mirrored, labels = [], [], []
    start = time.process_time()
    for k in sorted({int(r["fold"]) for r in rows}):
        model = load_model(run / "cv" / f"fold-{k}" / FOLD_MODEL_FILE)
        for row in (r for r in rows if int(r["fold"]) == k):
            image = decode(stored_path(row["path"], root), window=model.preprocess.window)
            plain.append(list(model.predict(image.pixels).probabilities.values()))
            mirrored.append(list(model.predict(np.ascontiguousarray(image.pixels[:, ::-1])).probabilities.values()))
            labels.append(classes.index(row["class"]))
    plain, mirrored, labels = np.array(plain), np.array(mirrored), np.array(labels)
    figures = {}
    for name, probs in (("as is", plain), ("mean with mirror", (plain + mirrored) / 2)):
        r = evaluation_report(labels, probs, classes)
        figures[name] = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "auc": r["roc_auc"]["macro"],
                         "accuracy_at_60pct": accuracy_at_coverage(probs, labels, 0.6)}
    return {"images": len(labels), "cpu_seconds": time.process_time() - start, "figures": figures}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="training.fit --cv output folders")
    for run in p.parse_args().runs:
        result = measure(run)
        print(f"{run.name}: {result['images']} out-of-fold images, {result['cpu_seconds']:.0f} s CPU for both passes")
        print(f"  {'':<17} {'accuracy':>8} {'macro-F1':>8} {'AUC':>6} {'acc. @60% answered':>19}")
        for name, f in result["figures"].items():
            print(f"  {name:<17} {f['accuracy']:>8.3f} {f['macro_f1']:>8.3f} {f['auc']:>6.3f} "
                  f"{f['accuracy_at_60pct']:>19.3f}")


if __name__ == "__main__":
    main()
