"""A whole CT series end to end through the default ensemble, against the
plain per-slice loop, in one run, and the share of the arithmetic limit reached.

    .venv/bin/python benchmarks/series.py [--model models/lung-ensemble] [--slices 300] [--precision off int8]

Writes a generated series of ``--slices`` 512x512 CT slices (phantoms with
noise, int16 with rescale, shuffled extension-less names; optionally
compressed) to a temporary folder, then times:

* end to end: reading the folder (grouping, ordering, decoding, Hounsfield
  units) and classifying every slice in batches (``ctapp.series``), as
  ``python -m ctapp.predict FOLDER`` does: ``--repeat`` runs, median and best,
  once per ``--precision`` (``CTAPP_INFERENCE_AMP``'s choices: fp32 is "off";
  int8 needs the members' calibration files);
* the plain per-slice loop on ``--plain`` of its slices, scaled to the series:
  each slice squared and normalised as the model does, then each member's
  network alone in fp32, contiguous, one slice at a time (no out-of-distribution
  check, no batching);
* the arithmetic limit: the networks' floating-point operations per slice
  (``torch.utils.flop_counter``) over the matrix-multiply rate this CPU reaches
  in the same run, in bf16 where it has native bf16 kernels (the fast path's
  arithmetic), else in fp32.

The goal of issue 26: a 300-slice series through the default ensemble in 20 s
or less on 2 cores. The load average is printed with the figures: other
processes on the machine slow every figure.
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
from ctapp.models import create_model  # noqa: E402
from ctapp.precision import INFERENCE_CHOICES, cpu_has_fast_bf16, inference_precision  # noqa: E402
from ctapp.preprocess import normalize, to_square  # noqa: E402
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


def plain_loop(model, series, count: int) -> float:
    """Seconds of the plain per-slice loop over the first ``count`` slices: the
    model's own squaring and normalisation, then each member's network alone in
    fp32, contiguous, one slice at a time."""
    nets = []
    for member in model.members:
        net = create_model(member.arch, len(member.class_names))
        net.load_state_dict(member.model.state_dict())
        nets.append((net.eval(), member.preprocess))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(count):
            pixels = series.slice(i, model.preprocess.window).pixels
            for net, config in nets:
                square, _ = to_square(pixels, config)
                net(normalize(torch.from_numpy(square)[None, None], config))
    return time.perf_counter() - start


def flops_per_slice(model) -> float:
    """Floating-point operations of every member's network on one slice."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for member in model.members:
        config = member.preprocess
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            member.model(torch.zeros(1, config.channels, config.img_size, config.img_size))
        total += counter.get_total_flops()
    return float(total)


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeat: int = 5) -> float:
    """The best floating-point operations per second of a square matrix product."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeat))
    return 2 * size ** 3 / best


def series_runs(model, paths: list[Path], repeat: int) -> tuple[float, float, float, float]:
    """Median seconds end to end, reading and classifying, and the best end to end, of ``repeat`` runs."""
    model.predict(paths[0])  # warm-up: first-call allocations, oneDNN kernels
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        read = read_inputs(inputs_from_paths(paths))
        (series,) = read.series
        t1 = time.perf_counter()
        result = classify_series(model, series)
        t2 = time.perf_counter()
        runs.append((t2 - t0, t1 - t0, t2 - t1))
        assert len(result.predictions) == len(paths)
    total, reading, classifying = (statistics.median(column) for column in zip(*runs))
    return total, reading, classifying, min(run[0] for run in runs)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    shipped = DEFAULT_MODELS_DIR / "lung-ensemble"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(shipped), help="model or ensemble folder (default: models/lung-ensemble, "
                                                         "ResNet-50 at 192 px and VGG19-BN at 128 px)")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--syntax", choices=list(SYNTAXES), default="none", help="compress the generated files")
    p.add_argument("--plain", type=int, default=20, help="slices timed through the plain per-slice loop")
    p.add_argument("--repeat", type=int, default=3, help="end-to-end runs (median and best are reported)")
    p.add_argument("--precision", nargs="+", choices=INFERENCE_CHOICES, default=["off", "int8"],
                   help="run the series at each (off: fp32)")
    args = p.parse_args()

    model = load_model(args.model)
    print(f"model {model.name} ({', '.join(f'{m.arch} {m.preprocess.img_size} px' for m in model.members)}), "
          f"torch threads {torch.get_num_threads()}, "
          f"load average before {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    flops = flops_per_slice(model)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_series(Path(tmp), args.slices, args.size, SYNTAXES[args.syntax])
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"wrote {len(paths)} slices of {args.size}x{args.size} ({args.syntax}, {size_mb:.0f} MB) in "
              f"{time.perf_counter() - start:.1f} s")
        for choice in args.precision:
            model.set_precision(inference_precision(choice))
            unavailable = [m.int8_unavailable for m in model.members if m.int8_unavailable]
            if unavailable:
                print(f"{choice}: not measured: {'; '.join(unavailable)}")
                continue
            results[model.members[0].precision.describe()] = series_runs(model, paths, args.repeat)
        (series,) = read_inputs(inputs_from_paths(paths)).series
        plain = plain_loop(model, series, min(args.plain, args.slices)) / min(args.plain, args.slices)
    per_300 = 300 / args.slices
    print(f"plain per-slice loop (each member's network alone, fp32, one slice at a time): {plain * 1000:.0f} ms "
          f"per slice over {min(args.plain, args.slices)} slices, {plain * 300:.1f} s per 300 slices")
    bf16 = cpu_has_fast_bf16()
    rate = matmul_rate(torch.bfloat16 if bf16 else torch.float32)
    limit = flops * 300 / rate
    print(f"arithmetic: {flops / 1e9:.1f} GFLOP per slice; this CPU multiplies matrices at {rate / 1e9:.0f} GFLOP/s "
          f"in {'bf16' if bf16 else 'fp32'}{'' if bf16 else ' (no native bf16 kernels here)'}, so 300 slices need "
          f"at least {limit:.1f} s in floating point")
    for described, (total, reading, classifying, best) in results.items():
        print(f"{described}: median {total:.1f} s end to end for {args.slices} slices (read {reading:.1f} s, "
              f"classify {classifying:.1f} s), best {best:.1f} s of {args.repeat}; per 300-slice series: "
              f"{total * per_300:.1f} s against {plain * 300:.1f} s for the plain loop, "
              f"{plain * args.slices / total:.2f}x (goal: 300 slices in 20 s); classifying at "
              f"{limit / (classifying * per_300):.0%} of the {'bf16' if bf16 else 'fp32'} limit")
    print(f"load average after {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
