"""A packed training set: every source's slices preprocessed once, as uint8
squares, with what the fit needs to know about each file (class folder, split,
source, size, the audit's reading), in one LZMA-compressed ``.npz`` (no pickle).

    python -m training.pack --data ../shared/data/chest-ct-scan-images/Data ../shared/data/sarscov2-ctscan \\
        ../shared/data/covid-ct-ucsd ../shared/data/mosmed --out /work/runs/pack.npz

``python -m training.fit --pack FILE --data DIR ...`` (and ``training.pretrain``)
then train from it without the images: ``--data`` names the sources (matched by
the end of their path), and the index, audit, groups, folds and model inputs
come out as they do from the images, so a run from the pack and one from the
folders write the same folds and the same card. A layer holds one
standardisation at one size for some sources (default: the shipped recipes'
lung 192 px equalised, COVID 128 px equalised and percentile-stretched); a fit
at a smaller size resizes the stored squares (cv2 INTER_AREA).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch

from ctapp.audit import AuditReport, ImageRecord, audit_dataset
from ctapp.data import DatasetError, DatasetIndex, FolderListing, index_listing, list_folder, scan_sources, \
    source_names
from ctapp.imaging import LUNG_WINDOW
from ctapp.preprocess import CROP_MODES, INTENSITY_MODES, Geometry, LoadedSquares, PreprocessConfig, load_squares

PACK_FORMAT = 1
LUNG = "chest-ct-scan-images/Data"
COVID = "sarscov2-ctscan,covid-ct-ucsd,mosmed"
DEFAULT_LAYERS = (f"equalise:192:{LUNG}", f"equalise:128:{COVID}", f"percentile:128:{COVID}")
RECORD_FIELDS = ("error", "width", "height", "mode", "brightness", "contrast", "digest")
GEOMETRY_FIELDS = ("height", "width", "top", "left", "bottom", "right", "pad_top", "pad_left", "side", "body_found")


@dataclass(frozen=True)
class Layer:
    """One standardisation at one size, for some sources (none named: all)."""

    intensity: str
    size: int
    sources: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Layer":
        """'INTENSITY:SIZE[:SOURCE,SOURCE...]', e.g. 'equalise:128:sarscov2-ctscan,mosmed'."""
        parts = text.split(":", 2)
        if len(parts) < 2 or parts[0] not in INTENSITY_MODES or not parts[1].isdigit():
            raise argparse.ArgumentTypeError(
                f"{text!r}: a layer is INTENSITY:SIZE[:SOURCE,...] with INTENSITY one of {INTENSITY_MODES}")
        sources = tuple(s for s in parts[2].split(",") if s) if len(parts) == 3 else ()
        return cls(parts[0], int(parts[1]), sources)

    def covers(self, source: str) -> bool:
        return not self.sources or source in self.sources


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Preprocess every slice of the given sources once and pack them.",
                                add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", metavar="DIR", help="dataset roots (the sources)")
    p.add_argument("--out", required=True, help="the pack file to write (.npz)")
    p.add_argument("--layer", dest="layers", type=Layer.parse, action="append", metavar="INTENSITY:SIZE[:SOURCES]",
                   help=f"a standardisation and size for some sources, repeatable (default: {' '.join(DEFAULT_LAYERS)})")
    p.add_argument("--crop", default="body", choices=list(CROP_MODES), help="crop of every layer")
    p.add_argument("--window", type=float, nargs=2, default=(LUNG_WINDOW.center, LUNG_WINDOW.width),
                   metavar=("CENTER", "WIDTH"), help="DICOM intensity window in HU")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    return p


def _geometry_row(g: Geometry | None) -> list[int]:
    if g is None:
        return [0] * len(GEOMETRY_FIELDS)
    return [g.height, g.width, *g.box, g.pad_top, g.pad_left, g.side, int(g.body_found)]


def write_pack(roots: list[Path], out: Path, layers: list[Layer], *, crop: str = "body",
               window: tuple[float, float] = (LUNG_WINDOW.center, LUNG_WINDOW.width), workers: int = 2,
               log=print) -> dict:
    """Pack ``roots``; returns the manifest. Every file is listed, readable or not."""
    roots = [Path(r) for r in roots]
    _, names = source_names(roots)
    for layer in layers:
        unknown = sorted(set(layer.sources) - set(names))
        if unknown:
            raise DatasetError(f"layer {layer.intensity}:{layer.size} names sources {unknown}, not among {names}")
    listings = [list_folder(root) for root in roots]
    index = scan_sources(roots)
    log(f"pack: {len(index.samples)} files in {len(roots)} sources; reading each for the audit")
    records = audit_dataset(index, workers=workers).records
    source_of = {name: i for i, name in enumerate(names)}
    folder_of = {path: (folder, split) for listing in listings for path, folder, split in listing.files}
    root_of = dict(zip(names, roots))
    arrays: dict[str, np.ndarray] = {
        "file_source": np.array([source_of[s.source] for s in index.samples], np.int16),
        "file_path": np.array([s.path.relative_to(root_of[s.source]).as_posix() for s in index.samples]),
        "file_folder": np.array([folder_of[s.path][0] for s in index.samples]),
        "file_split": np.array([folder_of[s.path][1] for s in index.samples]),
        "file_bytes": np.array([s.path.stat().st_size for s in index.samples], np.int64),
        "file_notes": np.array(["\n".join(r.notes) for r in records]),
        **{f"file_{name}": np.array([getattr(r, name) for r in records]) for name in RECORD_FIELDS},
    }
    readable = [i for i, r in enumerate(records) if not r.error]
    layer_info = []
    for k, layer in enumerate(layers):
        rows = [i for i in readable if layer.covers(index.samples[i].source)]
        config = PreprocessConfig(img_size=layer.size, crop=crop, intensity=layer.intensity,
                                  window_center=window[0], window_width=window[1])
        log(f"pack: layer {k} ({layer.intensity}, {layer.size} px): {len(rows)} slices")
        loaded = load_squares([index.samples[i].path for i in rows], config, workers=workers)
        arrays[f"layer{k}_rows"] = np.array(rows, np.int32)
        arrays[f"layer{k}_images"] = np.round(loaded.images[:, 0].numpy() * 255).astype(np.uint8)
        arrays[f"layer{k}_geometry"] = np.array([_geometry_row(g) for g in loaded.geometries], np.int32)
        layer_info.append({"intensity": layer.intensity, "size": layer.size, "sources": list(layer.sources),
                           "images": len(rows)})
    manifest = {
        "format": PACK_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "crop": crop, "window": list(window), "layers": layer_info,
        "sources": [{"name": name, "layout": listing.layout, "notes": listing.notes,
                     "empty": [e.relative_to(root).as_posix() for e in listing.empty]}
                    for name, root, listing in zip(names, roots, listings)],
    }
    arrays["manifest"] = np.array(json.dumps(manifest))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    # LZMA members: a fifth smaller than np.savez_compressed's deflate; np.load reads them all the same.
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_LZMA) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    os.replace(partial, out)
    return manifest


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


def default_layers(names: list[str]) -> list[Layer]:
    """The shipped recipes' layers for the sources among ``names``; a source they
    do not name gets an equalised 128 px layer."""
    layers = []
    for text in DEFAULT_LAYERS:
        layer = Layer.parse(text)
        present = tuple(s for s in layer.sources if s in names)
        if present:
            layers.append(Layer(layer.intensity, layer.size, present))
    others = tuple(n for n in names if not any(layer.covers(n) for layer in layers))
    return layers + ([Layer("equalise", 128, others)] if others else [])


def main(args: argparse.Namespace) -> dict:
    _, names = source_names([Path(d) for d in args.data])
    layers = args.layers or default_layers(names)
    manifest = write_pack([Path(d) for d in args.data], Path(args.out), layers, crop=args.crop,
                          window=tuple(args.window), workers=args.workers,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size / 2 ** 20:.1f} MiB, " + "; ".join(
        f"{la['intensity']} {la['size']} px: {la['images']} slices" for la in manifest["layers"]))
    return manifest


def run(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
