"""Reading a packed training set (written by :mod:`training.pack`): the
sources, audit and model inputs of a run as they would come from the image
folders, without the images. :func:`training_data` gives a run the pack or the
folders behind the same three calls."""
from __future__ import annotations

import argparse
import json
import os
import zipfile
from pathlib import Path

import cv2
import numpy as np
import torch

from ctapp.audit import AuditReport, ImageRecord, audit_dataset
from ctapp.data import DatasetError, DatasetIndex, FolderListing, index_listing, scan_sources
from ctapp.preprocess import Geometry, LoadedSquares, PreprocessConfig, load_squares

PACK_FORMAT = 1
RECORD_FIELDS = ("error", "width", "height", "mode", "brightness", "contrast", "digest")
GEOMETRY_FIELDS = ("height", "width", "top", "left", "bottom", "right", "pad_top", "pad_left", "side", "body_found")


class PackedData:
    """A pack read back as the folders it was made from: ``scan``, ``audit`` and
    ``load`` answer as :func:`ctapp.data.scan_sources`,
    :func:`ctapp.audit.audit_dataset` and :func:`ctapp.preprocess.load_squares`
    answer on the images."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.arrays = np.load(self.path, allow_pickle=False)
            self.manifest = json.loads(str(self.arrays["manifest"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"{self.path}: not a packed training set ({exc})") from None
        if self.manifest.get("format") != PACK_FORMAT:
            raise DatasetError(f"{self.path}: pack format {self.manifest.get('format')}, this code reads "
                               f"{PACK_FORMAT}; write it again with python -m training.pack")
        self.table = {key.removeprefix("file_"): self.arrays[key] for key in self.arrays.files
                      if key.startswith("file_")}
        self.sources = [s["name"] for s in self.manifest["sources"]]
        self.rows: dict[Path, int] = {}
        self.layer_rows: list[dict[int, int]] = []
        for k in range(len(self.manifest["layers"])):
            self.layer_rows.append({int(row): i for i, row in enumerate(self.arrays[f"layer{k}_rows"])})

    def source_of(self, root: Path) -> int:
        """The stored source that ``root`` names: the one its path ends with."""
        parts = Path(os.path.abspath(root)).parts
        matches = [i for i, name in enumerate(self.sources)
                   if parts[len(parts) - len(Path(name).parts):] == Path(name).parts]
        if len(matches) != 1:
            raise DatasetError(f"{root}: {'no' if not matches else 'more than one'} source of {self.path} "
                               f"ends so; it holds {self.sources}")
        return matches[0]

    def scan_one(self, root: Path, class_names: list[str] | None = None) -> DatasetIndex:
        k = self.source_of(root)
        info = self.manifest["sources"][k]
        rows = np.flatnonzero(self.table["source"] == k)
        paths = [root / str(self.table["path"][i]) for i in rows]
        files = [(p, str(self.table["folder"][i]), str(self.table["split"][i])) for p, i in zip(paths, rows)]
        listing = FolderListing(info["layout"], files, [root / e for e in info["empty"]], list(info["notes"]))
        index = index_listing(root, listing, class_names)
        index.file_sizes = {p: int(self.table["bytes"][i]) for p, i in zip(paths, rows)}
        self.rows.update({p: int(i) for p, i in zip(paths, rows)})
        return index

    def scan(self, roots: list[str | Path], class_names: list[str] | None = None) -> DatasetIndex:
        return scan_sources(roots, class_names, scan=self.scan_one)

    def _row(self, path: Path) -> int:
        """The stored file a path names: as scanned, or a source's name followed by its place there."""
        if path in self.rows:
            return self.rows[path]
        if not hasattr(self, "_by_place"):
            self._by_place = {(int(k), str(rel)): i for i, (k, rel) in
                              enumerate(zip(self.table["source"], self.table["path"]))}
        parts = Path(os.path.abspath(path)).parts
        for k, name in enumerate(self.sources):
            size = len(Path(name).parts)
            for start in range(len(parts) - size - 1, -1, -1):
                if parts[start:start + size] == Path(name).parts:
                    row = self._by_place.get((k, "/".join(parts[start + size:])))
                    if row is not None:
                        return row
        raise DatasetError(f"{path} is not in {self.path}")

    def audit(self, index: DatasetIndex, workers: int = 2, progress=None) -> AuditReport:
        records = []
        for sample in index.samples:
            i = self._row(sample.path)
            values = {name: self.table[name][i].item() for name in RECORD_FIELDS}
            notes = str(self.table["notes"][i])
            records.append(ImageRecord(sample, notes=notes.split("\n") if notes else [], **values))
        return audit_dataset(index, workers=workers, records=records)

    def _layer_for(self, row: int, config: PreprocessConfig) -> int:
        """The smallest layer at or above the config's size that holds the file with its crop,
        standardisation and window."""
        if self.manifest["crop"] != config.crop or \
                self.manifest["window"] != [config.window_center, config.window_width]:
            raise DatasetError(f"{self.path} holds crop {self.manifest['crop']!r}, window {self.manifest['window']}; "
                               f"this run asks for crop {config.crop!r}, window "
                               f"{[config.window_center, config.window_width]}")
        fits = [(layer["size"], k) for k, layer in enumerate(self.manifest["layers"])
                if layer["intensity"] == config.intensity and layer["size"] >= config.img_size
                and row in self.layer_rows[k]]
        if not fits:
            source = self.sources[int(self.table["source"][row])]
            raise DatasetError(f"{self.path} has no {config.intensity} layer of {source} at {config.img_size} px "
                               f"or more; write one with python -m training.pack --layer "
                               f"{config.intensity}:{config.img_size}:{source}")
        return min(fits)[1]

    def load(self, paths: list[Path], config: PreprocessConfig, *, workers: int = 2,
             on_progress=None) -> LoadedSquares:
        size = config.img_size
        images = torch.zeros(len(paths), 1, size, size)
        errors, digests, geometries = [""] * len(paths), [""] * len(paths), [None] * len(paths)
        for n, path in enumerate(paths):
            row = self._row(path)
            if self.table["error"][row]:
                errors[n] = str(self.table["error"][row])
                continue
            k = self._layer_for(row, config)
            at = self.layer_rows[k][row]
            square = self._images(k)[at]
            if square.shape[0] != size:
                square = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
            images[n, 0] = torch.from_numpy(square.astype(np.float32) / 255)
            g = self._geometry(k)[at].tolist()
            geometries[n] = Geometry(g[0], g[1], tuple(g[2:6]), g[6], g[7], g[8], bool(g[9]))
            digests[n] = str(self.table["digest"][row])
            if on_progress:
                on_progress(n + 1, len(paths))
        return LoadedSquares(images, errors, digests, geometries)

    def _images(self, k: int) -> np.ndarray:
        return self._cached(f"layer{k}_images")

    def _geometry(self, k: int) -> np.ndarray:
        return self._cached(f"layer{k}_geometry")

    def _cached(self, key: str) -> np.ndarray:
        # An NpzFile decompresses a member on every access: once per layer is enough.
        cache = self.__dict__.setdefault("_members", {})
        if key not in cache:
            cache[key] = self.arrays[key]
        return cache[key]


class FolderData:
    """The images on disk, behind the same three calls as :class:`PackedData`."""

    def scan(self, roots: list[str | Path], class_names: list[str] | None = None) -> DatasetIndex:
        return scan_sources(roots, class_names)

    def audit(self, index: DatasetIndex, workers: int = 2, progress=None) -> AuditReport:
        return audit_dataset(index, workers=workers, progress=progress)

    def load(self, paths: list[Path], config: PreprocessConfig, *, workers: int = 2,
             on_progress=None) -> LoadedSquares:
        return load_squares(paths, config, workers=workers, on_progress=on_progress)


def training_data(args: argparse.Namespace) -> PackedData | FolderData:
    """Where a run's slices come from: ``args.pack`` when given, else the folders."""
    pack = getattr(args, "pack", None)
    return PackedData(pack) if pack else FolderData()
