"""A whole CT series end to end, and the per-slice cost inside a series
against one ``predict`` call per slice.

    .venv/bin/python benchmarks/series.py [--model models/covid-resnet50] [--slices 300] [--syntax RLE]

Writes a generated series of ``--slices`` 512x512 CT slices (phantoms with
noise, int16 with rescale, shuffled extension-less names; optionally
compressed) to a temporary folder, then times:

* end to end: reading the folder (grouping, ordering, decoding, Hounsfield
  units) and classifying every slice in batches (``ctapp.series``), as
  ``python -m ctapp.predict FOLDER`` does;
* one ``LoadedModel.predict`` call per slice (path in, prediction out) on
  ``--single`` of the same files, the way slices were classified before.

The goals of issue 9: a 300-slice series in 10 s or less on 2 cores, and a
per-slice cost inside a series at least 2x below a ``predict`` call. The load
average is printed with the figures: other processes on the machine slow both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from series_synthetic import SeriesUids, ct_slice, stored_from_hu  # noqa: E402

from ctapp.model_folders import DEFAULT_MODELS_DIR, load_model  # noqa: E402
from ctapp.series import classify_series  # noqa: E402
from ctapp.series_inputs import inputs_from_paths, read_inputs  # noqa: E402
from training.foreign import ct_phantom  # noqa: E402

SYNTAXES = {"none": None, "RLE": "1.2.840.10008.1.2.5", "JPEG-LS": "1.2.840.10008.1.2.4.80",
            "JPEG2000": "1.2.840.10008.1.2.4.90"}


def write_series(folder: Path, slices: int, size: int, syntax: str | None) -> list[Path]:
    rng = np.random.default_rng(0)
    base = ct_phantom(size).astype(np.float32) / 255.0
    uids = SeriesUids()
    paths = []
    for k in rng.permutation(slices):
        hu = base * 1500.0 - 1350.0 + rng.normal(0, 15, base.shape) + 40 * np.sin(k / 20)
        path = folder / f"IM{rng.integers(10**7, 10**8)}"
        path.write_bytes(ct_slice(stored_from_hu(hu), uids=uids, instance=int(k) + 1,
                                  position=[0, 0, -1.25 * float(k)], spacing=0.7, syntax=syntax))
        paths.append(path)
    return paths


def main() -> int:
    shipped = DEFAULT_MODELS_DIR / "covid-resnet50"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(shipped), help="model folder (default: models/covid-resnet50)")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--syntax", choices=list(SYNTAXES), default="none", help="compress the generated files")
    p.add_argument("--single", type=int, default=40, help="slices timed with one predict call each")
    p.add_argument("--repeat", type=int, default=2, help="end-to-end runs (the best is reported)")
    args = p.parse_args()

    model = load_model(args.model)
    print(f"model {model.name} ({model.arch}), torch threads {torch.get_num_threads()}, "
          f"load average before {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_series(Path(tmp), args.slices, args.size, SYNTAXES[args.syntax])
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"wrote {len(paths)} slices of {args.size}x{args.size} ({args.syntax}, {size_mb:.0f} MB) in "
              f"{time.perf_counter() - start:.1f} s")
        model.predict(paths[0])  # warm-up: first-call allocations, oneDNN kernels
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            read = read_inputs(inputs_from_paths(paths))
            (series,) = read.series
            t1 = time.perf_counter()
            result = classify_series(model, series)
            t2 = time.perf_counter()
            runs.append((t2 - t0, t1 - t0, t2 - t1))
            assert len(result.predictions) == args.slices
        total, reading, classifying = min(runs)
        single = []
        for path in paths[:args.single]:
            t = time.perf_counter()
            model.predict(path)
            single.append(time.perf_counter() - t)
    per_slice = total / args.slices * 1000
    predict_ms = statistics.median(single) * 1000
    print(f"series of {args.slices}: {total:.2f} s end to end (read {reading:.2f} s, classify {classifying:.2f} s); "
          f"{per_slice:.1f} ms per slice")
    print(f"one predict call per slice: median {predict_ms:.1f} ms over {len(single)} slices")
    print(f"per-slice cost in a series: {predict_ms / per_slice:.1f}x cheaper than a predict call "
          f"(goal: 2x); 300 slices would take {per_slice * 0.3:.1f} s (goal: 10 s)")
    print(f"load average after {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
