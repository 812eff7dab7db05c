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

import numpy as np

from ctapp.audit import audit_dataset
from ctapp.data import DatasetError, list_folder, scan_sources, source_names
from ctapp.imaging import LUNG_WINDOW
from ctapp.preprocess import CROP_MODES, INTENSITY_MODES, Geometry, PreprocessConfig, load_squares
from training.cli import command
from training.packed import GEOMETRY_FIELDS, PACK_FORMAT, RECORD_FIELDS

LUNG = "chest-ct-scan-images/Data"
COVID = "sarscov2-ctscan,covid-ct-ucsd,mosmed"
DEFAULT_LAYERS = (f"equalise:192:{LUNG}", f"equalise:128:{COVID}", f"percentile:128:{COVID}")


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


run = command(get_args_parser, main, (DatasetError,))


if __name__ == "__main__":
    sys.exit(run())
