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
import os
import re
from collections import Counter
from collections.abc import Callable
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
    source: str = ""  # which dataset folder it came from, when several are pooled


@dataclass
class DatasetIndex:
    root: Path
    layout: str  # "splits" or "classes"
    class_names: list[str]  # class keys, index = label
    display_names: list[str]
    samples: list[Sample]
    notes: list[str] = field(default_factory=list)
    # Byte sizes of files indexed without being on disk (a packed training set).
    file_sizes: dict[Path, int] = field(default_factory=dict)

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
            size = self.file_sizes[s.path] if s.path in self.file_sizes else s.path.stat().st_size
            digest.update(f"{rel}|{size}|{self.class_names[s.label]}|{s.split}\n".encode())
        return digest.hexdigest()[:16]


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
        and p.name.lower() not in IGNORED_FILES and p.suffix.lower() not in IGNORED_SUFFIXES
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class FolderListing:
    """What a dataset folder holds, before any class is decided: its layout, each
    file with its class folder's name and split, the class folders without a
    file, and notes on what was ignored."""

    layout: str
    files: list[tuple[Path, str, str]]  # (path, class folder name, split)
    empty: list[Path]
    notes: list[str]


def scan_dataset(root: str | Path, class_names: list[str] | None = None) -> DatasetIndex:
    """Index a dataset folder in either layout.

    ``class_names`` (keys) fixes the label order, e.g. a model's classes when
    evaluating it on a new folder; a folder whose classes are not among them is
    refused.
    """
    return index_listing(Path(root), list_folder(root), class_names)


def list_folder(root: str | Path) -> FolderListing:
    """The files of a dataset folder in either layout (see :func:`scan_dataset`)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    folders = _subfolders(root)
    if not folders:
        raise DatasetError(f"{root}: no sub-folders; expected one folder per class, or train/valid/test folders")
    split_folders = [f for f in folders if f.name.lower() in SPLIT_ALIASES]
    notes: list[str] = []
    found: list[tuple[Path, str, str]] = []  # (path, class folder name, split)
    empty: list[Path] = []  # class folders without a file
    if split_folders:
        layout = "splits"
        for extra in sorted(set(folders) - set(split_folders)):
            notes.append(f"ignored folder {extra.name!r}: not a split name")
        class_dirs = [(d, SPLIT_ALIASES[s.name.lower()]) for s in split_folders for d in _subfolders(s)]
    else:
        layout = "classes"
        class_dirs = [(d, "") for d in folders]
    for class_dir, split in class_dirs:
        files = _image_files(class_dir)
        found += [(p, class_dir.name, split) for p in files]
        if not files:
            empty.append(class_dir)
    return FolderListing(layout, found, empty, notes)


def index_listing(root: Path, listing: FolderListing, class_names: list[str] | None = None) -> DatasetIndex:
    """The index of a listed folder: classes by key, display names, labels; refuses
    a folder without files, a class folder empty everywhere, and classes that are
    not among ``class_names``."""
    found, empty, notes, layout = listing.files, listing.empty, list(listing.notes), listing.layout
    if not found:
        raise DatasetError(f"{root}: the class folders hold no files")
    spellings: dict[str, set[str]] = {}
    for _, folder, _ in found:
        spellings.setdefault(class_key(folder), set()).add(folder)
    empty_classes = sorted({d.name for d in empty if class_key(d.name) not in spellings}, key=str.lower)
    if empty_classes:
        raise DatasetError(f"{root}: class folder(s) {', '.join(map(repr, empty_classes))} "
                           "hold no images; add images or remove the folder")
    for folder in empty:
        notes.append(f"folder {folder.relative_to(root).as_posix()!r} is empty: that split has no images of "
                     f"{folder.name!r}")
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


def scan_sources(roots: list[str | Path], class_names: list[str] | None = None, *,
                 scan: Callable[[Path, list[str] | None], DatasetIndex] = scan_dataset) -> DatasetIndex:
    """Index one or several dataset folders as one dataset; every sample knows its
    source (the folder's name), so that folds and figures can be broken down by it.

    Classes are matched by their key across folders (``COVID`` and ``covid`` are
    one class). Several sources are pooled for cross-validation; a split-folder
    source keeps its splits. ``scan`` indexes one folder (a packed training set
    indexes its stored listing).
    """
    roots = [Path(r) for r in roots]
    if not roots:
        raise DatasetError("no dataset folder given")
    parts = [scan(r, class_names) for r in roots]
    if len(parts) == 1:
        index = parts[0]
        index.samples = [replace(s, source=roots[0].name) for s in index.samples]
        return index
    common, names = source_names(roots)
    keys = list(class_names) if class_names is not None else sorted({k for part in parts for k in part.class_names})
    display = {}
    for part in parts:
        for key, shown in zip(part.class_names, part.display_names):
            display.setdefault(key, shown)
    samples, notes = [], []
    for name, part in zip(names, parts):
        remap = [keys.index(k) for k in part.class_names]
        samples += [replace(s, label=remap[s.label], source=name) for s in part.samples]
        notes += [f"{name}: {note}" for note in part.notes]
        missing = sorted(set(keys) - set(part.class_names))
        if missing:
            notes.append(f"{name}: no images of {missing}")
    layout = "splits" if any(part.layout == "splits" for part in parts) else "classes"
    sizes = {path: size for part in parts for path, size in part.file_sizes.items()}
    return DatasetIndex(common, layout, keys, [display.get(k, k) for k in keys], samples, notes, sizes)


def source_names(roots: list[Path]) -> tuple[Path, list[str]]:
    """The folder the sources share, and each source's name below it
    (``chest-ct-scan-images/Data``; a lone folder's own name)."""
    if len(roots) == 1:
        return roots[0].resolve(), [roots[0].name]
    common = Path(os.path.commonpath([r.resolve() for r in roots]))
    names = [str(r.resolve().relative_to(common)) if r.resolve() != common else r.name for r in roots]
    if len(set(names)) < len(names):
        raise DatasetError(f"the same folder is given twice: {[str(r) for r in roots]}")
    return common, names


def file_number(path: Path) -> int | None:
    """The last run of digits in a file name ('Covid (123).png' -> 123)."""
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else None


# Figure crops named '<paper id>-p<page>-<figure>...' (UCSD COVID-CT) or
# '<figure>%<panel>' come from one publication or figure: they are one group.
GROUP_PATTERN = r"^(.+?)(?:-p\d|%\d+$)"
# Sources (by folder name) with one slice per study: every file is its own patient,
# whatever its number says (MosMedData's 'img12.jpg' and 'img13.jpg' are two patients).
FILE_PER_PATIENT_SOURCES = frozenset({"mosmed"})


def group_ids(samples: list[Sample], *, block_size: int | None = None, pattern: str = GROUP_PATTERN,
              digests: list[str] | None = None,
              file_per_patient: frozenset[str] = FILE_PER_PATIENT_SOURCES) -> np.ndarray:
    """Group id per sample for grouped splitting: samples of one group always land
    on the same side of any split or fold.

    A file of a source named in ``file_per_patient`` (the source's folder name)
    is a group of its own. Otherwise a file whose name (without extension)
    matches ``pattern`` belongs to the group its first capture names (within its
    source); otherwise, with ``block_size``, to its block of consecutive file
    numbers within its class folder; otherwise it is a group of its own.
    Samples with the same ``digests`` entry (identical pixels) are merged into
    one group.
    """
    matcher = re.compile(pattern) if pattern else None
    keys: dict[tuple, int] = {}
    group_of = []
    for i, s in enumerate(samples):
        own = Path(s.source).name in file_per_patient
        match = matcher.search(s.path.stem) if matcher and not own else None
        number = None if own else file_number(s.path)
        if match:
            key = ("named", s.source, match.group(1))
        elif block_size and number is not None:
            key = ("block", s.source, str(s.path.parent), number // block_size)
        else:
            key = ("file", i)
        group_of.append(keys.setdefault(key, len(keys)))
    parent = list(range(len(keys)))  # union-find: groups that share an image merge

    def find(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    if digests is not None:
        first: dict[str, int] = {}
        for g, digest in zip(group_of, digests):
            if not digest:
                continue
            if digest in first:
                parent[find(g)] = find(first[digest])
            else:
                first[digest] = g
    roots = [find(g) for g in group_of]
    dense = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return np.asarray([dense[r] for r in roots])


def cv_folds(samples: list[Sample], groups: np.ndarray, folds: int, seed: int,
             class_names: list[str]) -> np.ndarray:
    """Fold number (0..folds-1) of every sample: stratified by source and class
    (each fold holds every source's classes in about their overall shares, so
    that per-source out-of-fold figures rest on every fold), seeded, and never
    separating a group."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise DatasetError(f"cross-validation needs at least 2 folds, got {folds}")
    labels = np.array([s.label for s in samples])
    _check_enough(samples, labels, groups, folds, class_names, f"{folds}-fold cross-validation")
    source_of = {name: i for i, name in enumerate(sorted({s.source for s in samples}))}
    strata = np.array([source_of[s.source] * len(class_names) + s.label for s in samples])
    fold_of = np.full(len(samples), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(samples)), strata, groups)):
        fold_of[held] = k
    return fold_of


def _check_enough(samples: list[Sample], labels: np.ndarray, groups: np.ndarray, n_splits: int,
                  class_names: list[str], what: str) -> None:
    """Refuse a split that scikit-learn cannot make: every class needs at least
    ``n_splits`` images (or blocks) so that one can be held out."""
    for label in np.unique(labels):
        have = len(np.unique(groups[labels == label]))
        if have < n_splits:
            blocks = len(np.unique(groups)) < len(samples)
            unit = ("block" if blocks else "image") + ("s" if have != 1 else "") + (" of consecutive slices" if blocks else "")
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
    pattern: str = GROUP_PATTERN,
    exclude: set[Path] = frozenset(),
) -> DatasetIndex:
    """Seeded, stratified split of a class-folder dataset.

    The split is by the groups of :func:`group_ids` (StratifiedGroupKFold):
    with ``block_size``, neighbouring slices never straddle two splits; files
    matching ``pattern`` stay with their group.
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
    groups = group_ids(samples, block_size=block_size, pattern=pattern)
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
