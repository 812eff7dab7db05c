"""Evaluating a folder of real slices: wall time of ``ctapp.evaluation.evaluate_files``
and how often it opens each image file.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluate_files.py [--model models/covid-resnet50]
        [--data ../shared/data/sarscov2-ctscan] [--slices 100] [--repeat 3]

Takes the first ``--slices`` files of ``--data`` (every other one from each
class folder, sorted), evaluates them ``--repeat`` times with the model and
prints the median and best wall time, the opens of image files per file (an
audit hook counts them) and the bytes the process read per file. The files are
read once before timing, so every run finds them in the page cache: the time a
second read costs is its system calls and its hashing, not the disk. The load
average is printed with the figures: other processes on the machine slow every
figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctapp.evaluation import evaluate_files  # noqa: E402
from ctapp.model_folders import load_model  # noqa: E402

opened: list[str] = []


def count_opens(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        opened.append(os.fspath(args[0]))


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def slices(data: Path, count: int) -> tuple[list[Path], list[int]]:
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    per_class = [sorted(p for p in folder.iterdir() if p.is_file()) for folder in folders]
    paths, labels = [], []
    for i in range(count):
        label = i % len(folders)
        paths.append(per_class[label][i // len(folders)])
        labels.append(label)
    return paths, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "covid-resnet50"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sarscov2-ctscan"))
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    model = load_model(args.model)
    paths, labels = slices(Path(args.data), args.slices)
    for path in paths:
        path.read_bytes()
    sys.addaudithook(count_opens)
    names = {str(path) for path in paths}
    times, opens, read = [], [], []
    for _ in range(args.repeat):
        opened.clear()
        start_bytes, start = bytes_read(), time.perf_counter()
        evaluate_files(model, paths, labels, workers=2)
        times.append(time.perf_counter() - start)
        read.append(bytes_read() - start_bytes)
        opens.append(sum(name in names for name in opened))
    size = sum(path.stat().st_size for path in paths)
    print(f"{model.name}, {len(paths)} slices of {args.data} ({size / len(paths) / 1024:.0f} KiB each), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.2f}")
    print(f"evaluate_files: median {statistics.median(times):.2f} s, best {min(times):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)}); {statistics.median(opens) / len(paths):.1f} opens and "
          f"{statistics.median(read) / size:.2f}x the files' bytes read per file")


if __name__ == "__main__":
    main()
