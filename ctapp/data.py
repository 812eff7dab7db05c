"""Datasets: finding images and classes on disk, splitting, and loading for torch.

Two layouts are read:

* split folders: ``ROOT/{train,valid|val,test}/<class>/<image>``;
* class folders only: ``ROOT/<class>/<image>``, split here (seeded and
  stratified; optionally by blocks of consecutive file numbers so that
  neighbouring slices of one patient stay on one side).

Class-folder names are normalised so that ``adenocarcinoma_left.lower.lobe_T2``
and ``adenocarcinoma`` are one class.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "valid": "valid", "val": "valid", "validation": "valid",
    "test": "test", "testing": "test",
}
SPLIT_ORDER = ("train", "valid", "test")
IGNORED_FILES = {".ds_store", "thumbs.db", "desktop.ini"}
IGNORED_SUFFIXES = {".txt", ".md", ".csv", ".json", ".xml", ".html", ".py", ".zip"}


class DatasetError(ValueError):
    """A dataset folder that cannot be used (message says why and what was found)."""


def class_key(folder_name: str) -> str:
    """Stable key of a class folder: lower case, anything after the first '_'
    dropped (tumour stage suffixes), separators unified.

    >>> class_key("large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa")
    'large-cell-carcinoma'
    >>> class_key("Viral Pneumonia")
    'viral-pneumonia'
    """
    base = folder_name.strip().split("_", 1)[0] or folder_name.strip()
    return re.sub(r"[\s.\-]+", "-", base.lower()).strip("-")


def display_name(folder_name: str) -> str:
    """Readable class name: 'large.cell.carcinoma_left...' -> 'Large cell carcinoma';
    acronyms such as 'COVID' keep their case."""
    base = folder_name.strip().split("_", 1)[0] or folder_name.strip()
    words = re.sub(r"[.]+", " ", base).strip()
    return words[:1].upper() + words[1:]


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    split: str  # "train", "valid", "test" or "" before splitting


@dataclass
class DatasetIndex:
    root: Path
    layout: str  # "splits" or "classes"
    class_names: list[str]  # class keys, index = label
    display_names: list[str]
    samples: list[Sample]
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def splits(self) -> list[str]:
        present = {s.split for s in self.samples}
        return [s for s in SPLIT_ORDER if s in present]

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for s in self.samples:
            row = table.setdefault(s.split or "all", {c: 0 for c in self.class_names})
            row[self.class_names[s.label]] += 1
        return table

    def fingerprint(self) -> str:
        """Hash of the file list (relative paths, sizes, labels, splits)."""
        digest = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: str(s.path)):
            rel = s.path.relative_to(self.root) if s.path.is_relative_to(self.root) else s.path
            digest.update(f"{rel}|{s.path.stat().st_size}|{self.class_names[s.label]}|{s.split}\n".encode())
        return digest.hexdigest()[:16]


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
        and p.name.lower() not in IGNORED_FILES and p.suffix.lower() not in IGNORED_SUFFIXES
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_dataset(root: str | Path, class_names: list[str] | None = None) -> DatasetIndex:
    """Index a dataset folder in either layout.

    ``class_names`` (keys) fixes the label order, e.g. a model's classes when
    evaluating it on a new folder; a folder whose classes are not among them is
    refused.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    folders = _subfolders(root)
    if not folders:
        raise DatasetError(f"{root}: no sub-folders; expected one folder per class, or train/valid/test folders")
    split_folders = [f for f in folders if f.name.lower() in SPLIT_ALIASES]
    notes: list[str] = []
    found: list[tuple[Path, str, str]] = []  # (path, class folder name, split)
    class_dirs: list[Path] = []
    if split_folders:
        layout = "splits"
        for extra in sorted(set(folders) - set(split_folders)):
            notes.append(f"ignored folder {extra.name!r}: not a split name")
        for split_dir in split_folders:
            split = SPLIT_ALIASES[split_dir.name.lower()]
            for class_dir in _subfolders(split_dir):
                class_dirs.append(class_dir)
                found += [(p, class_dir.name, split) for p in _image_files(class_dir)]
    else:
        layout = "classes"
        class_dirs = folders
        for class_dir in folders:
            found += [(p, class_dir.name, "") for p in _image_files(class_dir)]

    if not found:
        raise DatasetError(f"{root}: the class folders hold no files")
    spellings: dict[str, set[str]] = {}
    for _, folder, _ in found:
        spellings.setdefault(class_key(folder), set()).add(folder)
    empty = sorted({d.name for d in class_dirs} - {folder for _, folder, _ in found}, key=str.lower)
    empty_classes = sorted({class_key(name) for name in empty} - set(spellings))
    if empty_classes:
        raise DatasetError(f"{root}: class folder(s) {', '.join(repr(n) for n in empty if class_key(n) in empty_classes)} "
                           "hold no images; add images or remove the folder")
    for name in empty:
        notes.append(f"folder {name!r} is empty in one split")
    for key, names in sorted(spellings.items()):
        if len(names) > 1:
            notes.append(f"class {key!r} is spelled {len(names)} ways: {', '.join(sorted(names))}")

    if class_names is None:
        class_names = sorted(spellings)
    else:
        unknown = sorted(set(spellings) - set(class_names))
        if unknown:
            raise DatasetError(
                f"{root}: classes {unknown} are not among this model's classes {list(class_names)}"
            )
    display = []
    for key in class_names:
        names = sorted(spellings.get(key, {key}), key=len)  # shortest spelling reads best
        display.append(display_name(names[0]))
    label = {k: i for i, k in enumerate(class_names)}
    samples = [Sample(p, label[class_key(folder)], split) for p, folder, split in found]
    return DatasetIndex(root, layout, list(class_names), display, samples, notes)


def file_number(path: Path) -> int | None:
    """The last run of digits in a file name ('Covid (123).png' -> 123)."""
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else None


def split_groups(samples: list[Sample], block_size: int | None) -> np.ndarray:
    """Group id per sample: blocks of ``block_size`` consecutive file numbers
    within a class folder, or one group per file when ``block_size`` is None."""
    if not block_size:
        return np.arange(len(samples))
    ids: dict[tuple, int] = {}
    groups = []
    for i, s in enumerate(samples):
        number = file_number(s.path)
        key = (str(s.path.parent), number // block_size) if number is not None else ("file", i)
        groups.append(ids.setdefault(key, len(ids)))
    return np.asarray(groups)


def _check_enough(samples: list[Sample], labels: np.ndarray, groups: np.ndarray, n_splits: int,
                  class_names: list[str], what: str) -> None:
    """Refuse a split that scikit-learn cannot make: every class needs at least
    ``n_splits`` images (or blocks) so that one can be held out."""
    for label in np.unique(labels):
        have = len(np.unique(groups[labels == label]))
        if have < n_splits:
            unit = "blocks of consecutive slices" if len(np.unique(groups)) < len(samples) else "images"
            raise DatasetError(
                f"{len(samples)} images in all; class {class_names[label]!r} has only {have} {unit}, "
                f"but {what} needs at least {n_splits} per class: add images, lower the share held out, "
                "or give train/valid folders")


def assign_splits(
    index: DatasetIndex,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    block_size: int | None = None,
    exclude: set[Path] = frozenset(),
) -> DatasetIndex:
    """Seeded, stratified split of a class-folder dataset.

    With ``block_size`` the split is by groups of consecutive file numbers
    (StratifiedGroupKFold), so neighbouring slices never straddle two splits.
    Samples in ``exclude`` (e.g. redundant copies found by the audit) are
    dropped first, so that copies of one image cannot land on both sides.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if index.layout == "splits":
        return index
    samples = [s for s in index.samples if s.path not in exclude]
    labels = np.array([s.label for s in samples])
    if len(set(labels.tolist())) < 2:
        raise DatasetError("at least two classes with images are needed to train a classifier")
    groups = split_groups(samples, block_size)
    split = np.array(["train"] * len(samples), dtype=object)
    remaining = np.arange(len(samples))
    for name, fraction in (("test", test_fraction), ("valid", val_fraction)):
        if fraction <= 0:
            continue
        share = fraction / (1.0 - (test_fraction if name == "valid" else 0.0))
        n_splits = max(2, round(1.0 / share))
        _check_enough([samples[i] for i in remaining], labels[remaining], groups[remaining], n_splits,
                      index.class_names, f"holding out {fraction:.0%} for {name}")
        folder = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, held = next(folder.split(remaining, labels[remaining], groups[remaining]))
        split[remaining[held]] = name
        remaining = np.setdiff1d(remaining, remaining[held])
    new_samples = [replace(s, split=str(split[i])) for i, s in enumerate(samples)]
    how = f"blocks of {block_size} consecutive file numbers" if block_size else "image"
    notes = index.notes + [f"split here by {how}, seed {seed}: " + ", ".join(
        f"{k} {v}" for k, v in sorted(Counter(split.tolist()).items()))]
    return replace(index, samples=new_samples, notes=notes)


def kfold_assign(index: DatasetIndex, *, folds: int, fold: int, seed: int, block_size: int | None) -> DatasetIndex:
    """Cross-validation on the training split: fold ``fold`` of ``folds`` becomes
    the validation split; other splits are left out."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 <= fold < folds:
        raise DatasetError(f"fold must be in 0..{folds - 1}, got {fold}")
    train = [s for s in index.samples if s.split == "train"]
    labels = np.array([s.label for s in train])
    groups = split_groups(train, block_size)
    _check_enough(train, labels, groups, folds, index.class_names, f"{folds}-fold cross-validation")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, held = list(splitter.split(np.zeros(len(train)), labels, groups))[fold]
    held_set = set(held.tolist())
    samples = [replace(s, split="valid" if i in held_set else "train") for i, s in enumerate(train)]
    return replace(index, samples=samples, notes=index.notes + [f"cross-validation fold {fold + 1} of {folds}"])
