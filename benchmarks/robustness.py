"""Robustness figures: one line per area of issues 5 and 11.

    .venv/bin/python benchmarks/robustness.py [--fuzz 3000] [--seconds 20] [--threads 8] [--areas ...]

It runs the same cases as the robustness tests (their helpers in ``tests/``)
with larger budgets and prints what was tried and what went wrong:

* bad inputs: every awkward file, decoded from its path and from its bytes;
* fuzz: random and mutated bytes through the decoder (only ImageDecodeError may escape);
* concurrency: threads sharing one model, each answer compared with the single-threaded one;
* training kills: ``training.fit`` SIGKILLed at chosen moments, checkpoints reloaded, then resumed;
* audit log: concurrent writers in threads and processes, and a writer killed mid-stream;
* worst inputs (issue 11): the costliest small files found, each through ``predict`` + ``explain``
  in a fresh process: refused, or handled within +1.5 GB of peak memory and 20 s;
* cache memory: resident memory while one process analyses distinct large uploads through the
  app's caches (it must level off at the cache bound);
* shared model: another user's ``predict`` latency while a folder evaluation runs on the same model.

Exit status 1 when any area found a problem.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from audit_stress import hammer_audit_log, kill_audit_writer  # noqa: E402
from bad_inputs import (  # noqa: E402
    ct_pattern,
    deflated_dicom,
    fuzz_decode,
    hu_slice,
    png_bomb,
    png_bytes,
    tiff_pages,
    try_bad_inputs,
)
from fork_server import ForkServer, child_env  # noqa: E402
from interrupted_training import (  # noqa: E402
    compare_runs,
    fit_argv,
    kill_during_training,
    make_tiny_dataset,
    run_training,
)
from tiny_models import hammer_model, sample_images, tiny_model, write_model_folder  # noqa: E402

SHIPPED_MODEL = ROOT / "models" / "covid-resnet50"  # the worst inputs run through a real ResNet-50 when present
MEMORY_LIMIT = 1.5 * 2**30
TIME_LIMIT = 20.0


def bad_inputs(tmp: Path) -> tuple[str, bool]:
    cases, problems = try_bad_inputs(tmp / "bad")
    line = f"bad inputs: {cases} kinds x (path, bytes) = {2 * cases} tried, {2 * cases - len(problems)} handled"
    return line + "".join(f"\n    {p}" for p in problems), not problems


def fuzz(cases: int) -> tuple[str, bool]:
    start = time.perf_counter()
    try:
        counts = fuzz_decode(cases, seed=1)
    except AssertionError as exc:
        return f"fuzz: FAILED: {exc}", False
    return (f"fuzz: {cases} random/mutated inputs in {time.perf_counter() - start:.0f} s: {counts['ok']} decoded, "
            f"{counts['refused']} refused with ImageDecodeError, 0 other exceptions"), True


def concurrency(threads: int, seconds: float) -> tuple[str, bool]:
    loaded = tiny_model(img_size=64)
    images = sample_images(8, 96)
    result = hammer_model(loaded, images, threads=threads, seconds=seconds, warmup=3.0)
    growth = result.growth(3.0) / 2**20
    ok = not result.mismatches and not result.errors
    line = (f"concurrency: {threads} threads, {seconds:.0f} s: {result.requests} requests checked "
            f"({result.predicts} predict, {result.explains} explain), {len(result.mismatches)} mismatches, "
            f"{len(result.errors)} errors, memory growth {growth:.1f} MiB after warm-up")
    return line + "".join(f"\n    {p}" for p in (result.errors + result.mismatches)[:10]), ok


def training_kills(tmp: Path) -> tuple[str, bool]:
    data = make_tiny_dataset(tmp / "train_data")
    epochs = 6
    with ForkServer() as server:
        reference = server.start("training.fit", fit_argv(data, tmp / "reference", epochs), tmp / "logs")
        report = kill_during_training(server, data, tmp / "killed", epochs, timeout=300)
        reference.wait(300)
        resumed = run_training(data, tmp / "killed", epochs, "--resume", server=server)
    differences = compare_runs(tmp / "reference", tmp / "killed") if resumed.returncode == 0 else ["resume failed"]
    ok = not report.problems and report.checkpoints_lost == 0 and not differences and reference.returncode == 0
    line = (f"training kills: {report.kills} SIGKILLs survived ({report.kills_during_write} mid-write), "
            f"{report.checkpoints_checked} checkpoints reloaded, {report.checkpoints_lost} lost; resumed run "
            f"{'equals' if not differences else 'DIFFERS from'} the uninterrupted run")
    return line + "".join(f"\n    {p}" for p in (report.problems + differences)[:10]), ok


def audit_log(tmp: Path) -> tuple[str, bool]:
    processes, threads, count = 4, 4, 100
    stats = hammer_audit_log(tmp / "audit.sqlite", processes=processes, threads=threads, count=count)
    killed = kill_audit_writer(tmp / "killed.sqlite", after=200)
    lost = stats["lost"] + killed["lost"]
    ok = (lost == 0 and stats["corrupt"] == 0 and stats["duplicated"] == 0 and stats["integrity"] == "ok"
          and killed["integrity"] == "ok" and killed["writable_after_restart"])
    line = (f"audit log: {stats['written']} records written by {processes} processes x {threads} threads "
            f"(+ {threads} threads here), {stats['stored']} stored, {stats['lost']} lost, {stats['corrupt']} corrupt; "
            f"writer killed after {killed['reported']} records: {killed['lost']} lost, "
            f"integrity {killed['integrity']}, writable after restart: {killed['writable_after_restart']}")
    return line, ok


def model_folder(tmp: Path) -> Path:
    return SHIPPED_MODEL if (SHIPPED_MODEL / "model.pt").is_file() else write_model_folder(tmp / "tiny-model")


def worst_input_files(folder: Path) -> dict[str, Path]:
    """The costliest small files we could build (the first four are issue 11's findings)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "PNG 65000x615": ("strip.png", png_bomb(65000, 615)),
        "PNG 40000x1000": ("long.png", png_bomb(40000, 1000)),
        "TIFF, 3 pages, 13000x13000 middle": ("pages.tif", tiff_pages([(64, 64), (13000, 13000), (64, 64)])),
        "deflated DICOM, 1 MB -> 256 MiB": ("bomb.dcm", deflated_dicom(hu_slice(64), 256 << 20)),
        "PNG 6324x6324 (the 40 Mpx budget)": ("square.png", png_bomb(6324, 6324)),
        "PNG 17888x2236 (8:1, 40 Mpx)": ("eight.png", png_bomb(17888, 2236)),
        "RGBA PNG 6000x6000 (36 Mpx, alpha)": ("rgba.png", png_bytes(Image.new("RGBA", (6000, 6000)))),
        "16-bit PNG 6000x6000": ("sixteen.png", png_bytes(Image.new("I;16", (6000, 6000)))),
    }
    paths = {}
    for name, (file_name, data) in files.items():
        paths[name] = folder / file_name
        paths[name].write_bytes(data)
    return paths


_MEASURE = r"""
import json, sys, time
import numpy as np
from ctapp.imaging import ImageDecodeError
from ctapp.model_folders import load_model

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

model = load_model(sys.argv[1])
warm_up = np.zeros((64, 64), np.float32)
model.predict(warm_up)
model.explain(warm_up)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
base, start, outcome = status("VmRSS"), time.perf_counter(), "handled"
try:
    model.predict(sys.argv[2])
    model.explain(sys.argv[2])
except ImageDecodeError as exc:
    outcome = "refused: " + str(exc)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_growth": status("VmHWM") - base,
                  "outcome": outcome}))
"""


def worst_inputs(tmp: Path) -> tuple[str, bool]:
    model = model_folder(tmp)
    lines, ok = [f"worst inputs (predict + explain with {model.name}, each in a fresh process):"], True
    for name, path in worst_input_files(tmp / "worst").items():
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(model), str(path)], capture_output=True,
                              text=True, env=child_env(), timeout=300)
        if done.returncode:
            lines.append(f"    {name}: FAILED ({done.stderr.strip().splitlines()[-1:]})")
            ok = False
            continue
        m = json.loads(done.stdout.strip().splitlines()[-1])
        within = m["peak_growth"] <= MEMORY_LIMIT and m["seconds"] <= TIME_LIMIT
        ok &= within
        lines.append(f"    {name} ({path.stat().st_size / 1e3:.0f} kB): {m['seconds']:.2f} s, peak memory "
                     f"+{m['peak_growth'] / 2**20:.0f} MiB, {m['outcome'][:110]}{'' if within else '  OVER BUDGET'}")
    return "\n".join(lines), ok


_CACHE = r"""
import io, json, os, sys
import numpy as np
from PIL import Image
from ctapp import ui_cache

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

model, count = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
sizes = []
for i in range(count):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (3000, 3000), dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    ui_cache.analyse(model, f"upload-{i}", buffer.getvalue())
    sizes.append(rss())
print(json.dumps(sizes))
"""


def cache_memory(tmp: Path, uploads: int = 24) -> tuple[str, bool]:
    from ctapp.ui_cache import MAX_ANALYSES

    model = model_folder(tmp)
    done = subprocess.run([sys.executable, "-c", _CACHE, str(model), str(uploads)], capture_output=True, text=True,
                          env=child_env(), timeout=900)
    if done.returncode:
        return f"cache memory: FAILED ({done.stderr.strip().splitlines()[-1:]})", False
    rss = [size / 2**20 for size in json.loads(done.stdout.strip().splitlines()[-1])]
    bound = MAX_ANALYSES
    growth_after = rss[-1] - rss[bound - 1]
    ok = growth_after < 0.1 * (rss[bound - 1] - rss[0]) + 64
    marks = ", ".join(f"{n}: {rss[n - 1]:.0f}" for n in (1, 4, 8, 12, 16, 20, uploads) if n <= uploads)
    return (f"cache memory: {uploads} distinct 3000x3000 uploads analysed in one process (cache bound "
            f"{bound}); resident MiB after n uploads: {marks}; growth after the bound {growth_after:+.0f} MiB"), ok


def shared_model(tmp: Path, images: int = 512) -> tuple[str, bool]:
    """predict() latency for another user, alone and while a folder evaluation
    runs forward_batch on the same model: lock per chunk (now) and lock for the
    whole call (before issue 11)."""
    import numpy as np
    import torch

    from ctapp.model_folders import load_model

    model = load_model(model_folder(tmp))
    squares = torch.rand(images, 1, model.preprocess.img_size, model.preprocess.img_size)
    slice_ = np.asarray(ct_pattern(512), np.float32)
    model.predict(slice_)

    def latencies(evaluation) -> tuple[list[float], float]:
        done, seen = threading.Event(), []
        start = time.perf_counter()
        worker = threading.Thread(target=lambda: (evaluation(), done.set()))
        worker.start()
        while not done.is_set():
            t = time.perf_counter()
            model.predict(slice_)
            seen.append(time.perf_counter() - t)
        worker.join()
        return seen, time.perf_counter() - start

    def whole_call():
        with model._lock:
            model.forward_batch(squares)

    alone = []
    for _ in range(10):
        t = time.perf_counter()
        model.predict(slice_)
        alone.append(time.perf_counter() - t)
    chunked, chunked_run = latencies(lambda: model.forward_batch(squares))
    held, held_run = latencies(whole_call)
    ms = 1000
    line = (f"shared model ({model.name}, evaluation of {images} images): another user's predict alone "
            f"{statistics.median(alone) * ms:.0f} ms; during the evaluation, lock per chunk: median "
            f"{statistics.median(chunked) * ms:.0f} ms, max {max(chunked) * ms:.0f} ms ({len(chunked)} answered in "
            f"{chunked_run:.1f} s); lock for the whole run (before): max {max(held) * ms:.0f} ms "
            f"({len(held)} answered in {held_run:.1f} s)")
    return line, max(chunked) < max(held)


AREAS = ("bad-inputs", "fuzz", "concurrency", "training-kills", "audit-log", "worst-inputs", "cache-memory",
         "shared-model")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fuzz", type=int, default=3000, help="fuzz cases")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds of the concurrency test")
    p.add_argument("--threads", type=int, default=8, help="threads sharing one model")
    p.add_argument("--areas", nargs="+", choices=AREAS, default=list(AREAS), help="areas to run")
    args = p.parse_args()
    # Fuzzed DICOM headers make pydicom warn about every odd value; the outcome is what counts.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {"bad-inputs": lambda: bad_inputs(tmp), "fuzz": lambda: fuzz(args.fuzz),
                "concurrency": lambda: concurrency(args.threads, args.seconds),
                "training-kills": lambda: training_kills(tmp), "audit-log": lambda: audit_log(tmp),
                "worst-inputs": lambda: worst_inputs(tmp), "cache-memory": lambda: cache_memory(tmp),
                "shared-model": lambda: shared_model(tmp)}
        for area in args.areas:
            line, ok = runs[area]()
            all_ok &= ok
            print(line, flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
