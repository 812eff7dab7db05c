"""Memory and time of reading hostile and large inputs through the series path.

    .venv/bin/python benchmarks/series_memory.py [--only NAME ...] [--keep DIR]

Builds, in a temporary folder, each input of issue 24 (item 2) that once cost
gigabytes or minutes, then reads it through ``ctapp.series_inputs.read_inputs``
(what the viewer and the command line call) in a fresh Python process per
input, as uploads held in memory. Prints, per input: its size, what the read
gave (series and slices, or the first error), the peak growth of the process's
resident memory over what it held before the read (``ru_maxrss`` against
``/proc/self/statm``), and the seconds the read took (wall clock, and CPU
time, which a busy machine inflates less), against the budget: +1.5 GiB and
60 s of wall clock (5 s for a DICOM whose frame count lies).
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from series_synthetic import SeriesUids, ct_slice, stored_from_hu  # noqa: E402

GIB = 1 << 30
MEMORY_BUDGET = 1.5 * GIB
SECONDS_BUDGET = 60.0
LYING_FRAMES_SECONDS = 5.0
SIDE = 512
SLICES = 1000


def nifti_header(shape: tuple[int, ...], dtype) -> bytes:
    """A NIfTI-1 single-file header (and the 4-byte extension flag) for ``shape`` voxels of ``dtype``."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([0.7, 0.7, 1.25, 1.0]), code=1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def write_large_nifti_gz(path: Path) -> None:
    """512x512x1000 float64 voxels (2 GiB) of an empty field, gzip-packed to about 2 MB."""
    with gzip.open(path, "wb", compresslevel=6) as out:
        out.write(nifti_header((SIDE, SIDE, SLICES), np.float64))
        block = np.full((SIDE, SIDE), -1000.0).tobytes(order="F")
        for _ in range(SLICES):
            out.write(block)


def write_truncated_nifti(path: Path) -> None:
    """The same header with about 1 kB of voxels: the file is cut short."""
    path.write_bytes(nifti_header((SIDE, SIDE, SLICES), np.float64) + bytes(1024))


def dicom_zip(path: Path, slices: int = SLICES) -> None:
    """One series of ``slices`` deflated 512x512 DICOM slices (a disc of soft tissue in air)."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    disc = np.where((yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 < (SIDE / 3) ** 2, 40.0, -1000.0)
    stored = stored_from_hu(disc)
    uids = SeriesUids()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for k in range(slices):
            archive.writestr(f"series/IM{k:04d}", ct_slice(stored, uids=uids, instance=k + 1,
                                                           position=[0, 0, -1.25 * k], spacing=0.7))


def lying_dicom(path: Path, frames: int) -> None:
    """A 9 kB DICOM whose header claims ``frames`` frames of 512x512."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(ct_slice(np.zeros((SIDE, SIDE), np.int16))))
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(8192)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())


def zeros_zip(path: Path) -> None:
    """Six members of 192 MiB of zeros each (about 1 MB packed)."""
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(6):
            with archive.open(f"IM{i}", "w", force_zip64=True) as member:
                for _ in range(192):
                    member.write(zeros)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def apng(path: Path, frames: int = 400_000, side: int = 16) -> None:
    """An animated PNG of ``frames`` frames of ``side`` x ``side`` grey pixels."""
    row = b"\0" + bytes(side)  # filter byte, then the pixels
    pixels = zlib.compress(row * side)
    parts = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)),
             _png_chunk(b"acTL", struct.pack(">II", frames, 0))]
    sequence = 0
    for k in range(frames):
        parts.append(_png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, side, side, 0, 0, 1, 10, 0, 0)))
        sequence += 1
        if k == 0:
            parts.append(_png_chunk(b"IDAT", pixels))
        else:
            parts.append(_png_chunk(b"fdAT", struct.pack(">I", sequence) + pixels))
            sequence += 1
    parts.append(_png_chunk(b"IEND", b""))
    path.write_bytes(b"".join(parts))


def single_slices(folder: Path, patients: int = 10, slices: int = 62) -> list[Path]:
    """``slices`` single 512x512 DICOM slices of ``patients`` patients, each slice a series of its own."""
    folder.mkdir(exist_ok=True)
    studies = [SeriesUids() for _ in range(patients)]
    paths = []
    for k in range(slices):
        study = studies[k % patients]
        hu = np.full((SIDE, SIDE), -1000.0)
        hu[100:400, 100 + k:400] = 40.0
        path = folder / f"patient{k % patients}_IM{k}.dcm"
        path.write_bytes(ct_slice(stored_from_hu(hu), uids=SeriesUids(study=study.study), instance=1,
                                  position=[0, 0, float(k)], spacing=0.7))
        paths.append(path)
    return paths


def _written(path: Path, write) -> list[Path]:
    """``[path]``, written by ``write(path)`` unless it is there already (``--keep``)."""
    if not path.exists():
        write(path)
    return [path]


def cases(folder: Path) -> dict[str, tuple[Callable[[], list[Path]], float]]:
    """Each case: how to build its files (in ``folder``) and its time budget in seconds."""
    def zips(count: int) -> list[Path]:
        return [p for i in range(count) for p in _written(folder / f"series{i}.zip", dicom_zip)]

    def lying(frames: int) -> list[Path]:
        return _written(folder / f"lying{frames}.dcm", lambda path: lying_dicom(path, frames))

    return {
        "nii.gz 512x512x1000 float64": (lambda: _written(folder / "large.nii.gz", write_large_nifti_gz),
                                        SECONDS_BUDGET),
        "truncated NIfTI, same header": (lambda: _written(folder / "cut.nii", write_truncated_nifti), SECONDS_BUDGET),
        "zip of 1000 DICOM slices": (lambda: zips(1), SECONDS_BUDGET),
        "two such zips": (lambda: zips(2), SECONDS_BUDGET),
        "four such zips": (lambda: zips(4), SECONDS_BUDGET),
        "DICOM claiming 1e6 frames": (lambda: lying(1_000_000), LYING_FRAMES_SECONDS),
        "DICOM claiming 2e9 frames": (lambda: lying(2_000_000_000), LYING_FRAMES_SECONDS),
        "zip of 6 x 192 MiB zeros": (lambda: _written(folder / "zeros.zip", zeros_zip), SECONDS_BUDGET),
        "400,000-frame 16x16 APNG": (lambda: _written(folder / "frames.png", apng), SECONDS_BUDGET),
        "62 single slices, 10 patients": (lambda: single_slices(folder / "singles"), SECONDS_BUDGET),
    }


# Run in a fresh interpreter per case: ru_maxrss is the process's peak.
MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
from ctapp.series_inputs import read_inputs
from ctapp.volumes import Input

def resident() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

inputs = [Input(p.name, p.read_bytes()) for p in map(Path, sys.argv[1:])]
before = resident()
started, cpu_started = time.perf_counter(), cpu()
result = read_inputs(inputs)
seconds, cpu_seconds = time.perf_counter() - started, cpu() - cpu_started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - before, "seconds": seconds, "cpu": cpu_seconds,
                  "series": [len(s) for s in result.series], "images": len(result.images),
                  "errors": [e.message for e in result.errors]}))
"""


def measure(paths: list[Path]) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, *map(str, paths)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        return {"growth": float("nan"), "seconds": float("nan"), "cpu": float("nan"), "series": [], "images": 0,
                "errors": [f"crashed: {last}"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def outcome(result: dict) -> str:
    parts = []
    if result["series"]:
        parts.append(f"{len(result['series'])} series ({sum(result['series'])} slices)")
    if result["images"]:
        parts.append(f"{result['images']} images")
    if result["errors"]:
        parts.append(f"{len(result['errors'])} refused: {result['errors'][0][:90]}")
    return "; ".join(parts) or "nothing"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="cases whose name contains any of these words")
    p.add_argument("--keep", type=Path, help="build the inputs in this folder and keep them (built ones are reused)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"{'input':32} {'size':>9} {'growth':>10} {'seconds':>8} {'cpu s':>7}  ok  result")
        failed = 0
        for name, (build, seconds_budget) in cases(folder).items():
            if args.only and not any(word in name for word in args.only):
                continue
            paths = build()
            result = measure(paths)
            size = sum(path.stat().st_size for path in paths)
            ok = result["growth"] <= MEMORY_BUDGET and result["seconds"] <= seconds_budget
            failed += not ok
            print(f"{name:32} {size / 2**20:8.2f}M {result['growth'] / 2**20:9.0f}M {result['seconds']:8.2f} "
                  f"{result['cpu']:7.2f}  "
                  f"{'yes' if ok else 'NO '} {outcome(result)}", flush=True)
    print(f"budget: +{MEMORY_BUDGET / GIB:.1f} GiB peak growth; {SECONDS_BUDGET:.0f} s "
          f"({LYING_FRAMES_SECONDS:.0f} s for a lying frame count)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
