"""Dataset audit: what is wrong with a folder of slices before anything trains on it.

Finds unreadable files, exact duplicates (same decoded pixels), images that sit
in an evaluation split and in training, images filed under two labels, class
balance, image-size and brightness statistics per class, and runs a shortcut
probe: how well a classifier does that sees only image size and brightness.

Policy applied by training and evaluation (``AuditReport.dropped``):
keep one copy of each duplicated image (the training copy if there is one);
drop evaluation-split copies of training images; drop every image whose
pixels appear under more than one label.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import SPLIT_ORDER, DatasetIndex, Sample
from .imaging import ImageDecodeError, decode

POLICY = (
    "keep one copy of each exact duplicate (the training copy when there is one); "
    "drop validation/test images that also appear in training; "
    "drop every image whose pixels appear under two or more labels"
)


@dataclass
class ImageRecord:
    sample: Sample
    error: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    brightness: float = 0.0
    contrast: float = 0.0
    digest: str = ""
    notes: list[str] = field(default_factory=list)


def _inspect(sample: Sample) -> ImageRecord:
    try:
        image = decode(sample.path)
    except ImageDecodeError as exc:
        return ImageRecord(sample, error=str(exc))
    return ImageRecord(
        sample,
        width=image.size[0],
        height=image.size[1],
        mode=image.mode,
        brightness=float(image.pixels.mean()),
        contrast=float(image.pixels.std()),
        digest=image.content_hash(),
        notes=image.notes,
    )


@dataclass
class AuditReport:
    index: DatasetIndex
    records: list[ImageRecord]
    dropped: dict[Path, str]  # path -> reason
    duplicate_groups: list[list[ImageRecord]]
    conflict_groups: list[list[ImageRecord]]
    cross_split: list[ImageRecord]
    shortcut: dict

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.index.root)) if path.is_relative_to(self.index.root) else str(path)

    def kept_samples(self) -> list[Sample]:
        return [r.sample for r in self.records if not r.error and r.sample.path not in self.dropped]

    def to_dict(self, details: bool = True) -> dict:
        names = self.index.class_names
        readable = [r for r in self.records if not r.error]
        kept = self.kept_samples()
        result = {
            "root": str(self.index.root),
            "layout": self.index.layout,
            "classes": names,
            "display_names": self.index.display_names,
            "images": len(self.records),
            "readable": len(readable),
            "unique_images": len({r.digest for r in readable}),
            "duplicate_groups": len(self.duplicate_groups),
            "redundant_copies": sum(len(g) - 1 for g in self.duplicate_groups),
            "cross_split_copies": len(self.cross_split),
            "label_conflicts": [[self._rel(r.sample.path) for r in g] for g in self.conflict_groups],
            "unreadable": [self._rel(r.sample.path) for r in self.records if r.error],
            "policy": POLICY,
            "dropped": len(self.dropped),
            "kept": len(kept),
            "class_balance": _balance(self.index, [r.sample for r in readable]),
            "class_balance_kept": _balance(self.index, kept),
            "modes": dict(Counter(r.mode for r in readable).most_common()),
            "per_class": _per_class_stats(readable, names),
            "shortcut_probe": self.shortcut,
            "notes": self.index.notes + _mismatch_notes(readable),
            "warnings": self.warnings(),
        }
        if details:
            # The decoder's message starts with the file's name, which the key already gives.
            result["unreadable_reasons"] = {self._rel(r.sample.path): r.error.removeprefix(f"{r.sample.path.name}: ")
                                            for r in self.records if r.error}
            result["duplicates"] = [[self._rel(r.sample.path) for r in g] for g in self.duplicate_groups]
            result["cross_split_copy_paths"] = [self._rel(r.sample.path) for r in self.cross_split]
            result["dropped_paths"] = {self._rel(p): why for p, why in sorted(self.dropped.items())}
        return result

    def summary(self) -> dict:
        """The short form stored in checkpoints and model cards."""
        return self.to_dict(details=False)

    def warnings(self) -> list[str]:
        out = []
        if self.conflict_groups:
            out.append(f"{len(self.conflict_groups)} image(s) appear under two or more labels; all copies dropped")
        if self.cross_split:
            out.append(f"{len(self.cross_split)} evaluation image(s) also appear in training; dropped from evaluation")
        for where, probe in [("", self.shortcut), *((f"in {name}: ", p) for name, p in
                                                    self.shortcut.get("per_source", {}).items())]:
            if probe.get("accuracy") is not None and probe["accuracy"] >= probe["chance"] + 0.15:
                out.append(
                    f"{where}image size and brightness alone predict the class with {probe['accuracy']:.0%} "
                    f"accuracy (chance {probe['chance']:.0%}): the model may learn where an image came from, "
                    "not what it shows"
                )
        return out


def _balance(index: DatasetIndex, samples: list[Sample]) -> dict:
    table: dict[str, dict[str, int]] = {}
    for s in samples:
        row = table.setdefault(s.split or "all", {c: 0 for c in index.class_names})
        row[index.class_names[s.label]] += 1
    return {k: table[k] for k in sorted(table, key=lambda k: SPLIT_ORDER.index(k) if k in SPLIT_ORDER else 9)}


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "mean": float(a.mean()),
            "std": float(a.std())}


def _per_class_stats(records: list[ImageRecord], names: list[str]) -> dict:
    result = {}
    for label, name in enumerate(names):
        rows = [r for r in records if r.sample.label == label]
        if not rows:
            continue
        result[name] = {
            "images": len(rows),
            "width": _stats([r.width for r in rows]),
            "height": _stats([r.height for r in rows]),
            "brightness": _stats([r.brightness for r in rows]),
            "contrast": _stats([r.contrast for r in rows]),
        }
    return result


def _mismatch_notes(records: list[ImageRecord]) -> list[str]:
    lying = [r for r in records if any("although its name ends in" in n for n in r.notes)]
    return [f"{len(lying)} file(s) have an extension that does not match their content"] if lying else []


def shortcut_probe(records: list[ImageRecord], seed: int = 0) -> dict:
    """Cross-validated accuracy of a random forest on (width, height, brightness,
    contrast) only: high accuracy means the classes can be told apart without
    looking at the lungs."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    features = np.array([[r.width, r.height, r.brightness, r.contrast] for r in records], dtype=float)
    labels = np.array([r.sample.label for r in records])
    counts = np.bincount(labels) if len(labels) else np.array([0])
    present = counts[counts > 0]
    result = {
        "features": ["width", "height", "brightness", "contrast"],
        "classifier": "RandomForestClassifier(n_estimators=100), 5-fold stratified CV",
        "chance": float(present.max() / present.sum()) if present.size else 0.0,
        "accuracy": None,
    }
    folds = min(5, int(present.min()) if present.size else 0)
    if len(present) < 2 or folds < 2:
        result["note"] = "too few images per class to run the probe"
        return result
    forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    scores = cross_val_score(forest, features, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    result["accuracy"] = float(scores.mean())
    result["accuracy_std"] = float(scores.std())
    return result


def input_shortcut_probe(images, labels, seed: int = 0) -> dict:
    """The shortcut probe on what a model actually sees: the same forest on
    intensity statistics of the preprocessed (S, S) inputs (mean, spread,
    percentiles, share of black pixels, which also measures padding). Near
    chance means preprocessing has taken away size, frame and brightness cues."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    features = np.column_stack([flat.mean(1), flat.std(1), *np.percentile(flat, (5, 25, 50, 75, 95), axis=1),
                                (flat < 0.02).mean(1)])
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    present = counts[counts > 0]
    folds = min(5, int(present.min()))
    forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    scores = cross_val_score(forest, features, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return {"features": ["mean", "std", "p5", "p25", "p50", "p75", "p95", "black share"],
            "chance": float(present.max() / present.sum()), "accuracy": float(scores.mean()),
            "accuracy_std": float(scores.std())}


def audit_dataset(index: DatasetIndex, *, workers: int = 2, progress: Callable[[int, int], None] | None = None,
                  records: list[ImageRecord] | None = None) -> AuditReport:
    """The audit of ``index``; ``records`` (one per sample, in order) were read
    before, e.g. stored in a packed training set, and the files are not opened."""
    if records is None:
        records = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, record in enumerate(pool.map(_inspect, index.samples)):
                records.append(record)
                if progress:
                    progress(i + 1, len(index.samples))

    by_digest: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        if not r.error:
            by_digest[r.digest].append(r)
    split_rank = {s: i for i, s in enumerate(SPLIT_ORDER)}

    def order(r: ImageRecord):
        # Training copy first; within a split the shortest name ("x.png" before "x - Copy.png").
        return split_rank.get(r.sample.split, -1), len(r.sample.path.name), str(r.sample.path)

    duplicate_groups, conflict_groups, cross_split = [], [], []
    dropped: dict[Path, str] = {}
    for group in by_digest.values():
        group.sort(key=order)
        if len({r.sample.label for r in group}) > 1:
            conflict_groups.append(group)
            for r in group:
                dropped[r.sample.path] = "label conflict: the same image is filed under another class"
        if len(group) < 2:
            continue
        duplicate_groups.append(group)
        if any(r.sample.split == "train" for r in group):
            cross_split += [r for r in group if r.sample.split in ("valid", "test")]
        keeper = group[0]
        for r in group[1:]:
            if r.sample.path in dropped:
                continue
            if r.sample.split != keeper.sample.split:
                dropped[r.sample.path] = f"copy of {keeper.sample.split} image {keeper.sample.path.name}"
            else:
                dropped[r.sample.path] = f"duplicate of {keeper.sample.path.name}"
    duplicate_groups.sort(key=lambda g: order(g[0]))
    conflict_groups.sort(key=lambda g: order(g[0]))

    unique = [g[0] for g in by_digest.values() if g[0].sample.path not in dropped]
    probe = shortcut_probe(unique)
    sources = sorted({r.sample.source for r in unique})
    if len(sources) > 1:
        # Pooled sources can differ in export style by class (in UCSD COVID-CT the
        # classes come from different kinds of publication): probe each one alone.
        probe["per_source"] = {name: shortcut_probe([r for r in unique if r.sample.source == name])
                               for name in sources}
    return AuditReport(index, records, dropped, duplicate_groups, conflict_groups, cross_split, probe)
