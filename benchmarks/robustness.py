"""Robustness figures: one line per area of issue 5.

    .venv/bin/python benchmarks/robustness.py [--fuzz 3000] [--seconds 20] [--threads 8]

It runs the same cases as the robustness tests (``tests/robustness_helpers.py``)
with larger budgets and prints what was tried and what went wrong:

* bad inputs: every awkward file, decoded from its path and from its bytes;
* fuzz: random and mutated bytes through the decoder (only ImageDecodeError may escape);
* concurrency: threads sharing one model, each answer compared with the single-threaded one;
* training kills: ``training.fit`` SIGKILLed at chosen moments, checkpoints reloaded, then resumed;
* audit log: concurrent writers in threads and processes, and a writer killed mid-stream.

Exit status 1 when any area found a problem.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import robustness_helpers as rh  # noqa: E402


def bad_inputs(tmp: Path) -> tuple[str, bool]:
    cases, problems = rh.try_bad_inputs(tmp / "bad")
    line = f"bad inputs: {cases} kinds x (path, bytes) = {2 * cases} tried, {2 * cases - len(problems)} handled"
    return line + "".join(f"\n    {p}" for p in problems), not problems


def fuzz(cases: int) -> tuple[str, bool]:
    start = time.perf_counter()
    try:
        counts = rh.fuzz_decode(cases, seed=1)
    except AssertionError as exc:
        return f"fuzz: FAILED: {exc}", False
    return (f"fuzz: {cases} random/mutated inputs in {time.perf_counter() - start:.0f} s: {counts['ok']} decoded, "
            f"{counts['refused']} refused with ImageDecodeError, 0 other exceptions"), True


def concurrency(threads: int, seconds: float) -> tuple[str, bool]:
    loaded = rh.tiny_model(img_size=64)
    images = rh.sample_images(8, 96)
    result = rh.hammer_model(loaded, images, threads=threads, seconds=seconds, warmup=3.0)
    growth = result.growth(3.0) / 2**20
    ok = not result.mismatches and not result.errors
    line = (f"concurrency: {threads} threads, {seconds:.0f} s: {result.requests} requests checked "
            f"({result.predicts} predict, {result.explains} explain), {len(result.mismatches)} mismatches, "
            f"{len(result.errors)} errors, memory growth {growth:.1f} MiB after warm-up")
    return line + "".join(f"\n    {p}" for p in (result.errors + result.mismatches)[:10]), ok


def training_kills(tmp: Path) -> tuple[str, bool]:
    data = rh.make_tiny_dataset(tmp / "train_data")
    epochs = 6
    with rh.ForkServer() as server:
        reference = server.start("training.fit", rh.fit_argv(data, tmp / "reference", epochs), tmp / "logs")
        report = rh.kill_during_training(server, data, tmp / "killed", epochs, timeout=300)
        reference.wait(300)
        resumed = rh.run_training(data, tmp / "killed", epochs, "--resume", server=server)
    differences = rh.compare_runs(tmp / "reference", tmp / "killed") if resumed.returncode == 0 else ["resume failed"]
    ok = not report.problems and report.checkpoints_lost == 0 and not differences and reference.returncode == 0
    line = (f"training kills: {report.kills} SIGKILLs survived ({report.kills_during_write} mid-write), "
            f"{report.checkpoints_checked} checkpoints reloaded, {report.checkpoints_lost} lost; resumed run "
            f"{'equals' if not differences else 'DIFFERS from'} the uninterrupted run")
    return line + "".join(f"\n    {p}" for p in (report.problems + differences)[:10]), ok


def audit_log(tmp: Path) -> tuple[str, bool]:
    processes, threads, count = 4, 4, 100
    stats = rh.hammer_audit_log(tmp / "audit.sqlite", processes=processes, threads=threads, count=count)
    killed = rh.kill_audit_writer(tmp / "killed.sqlite", after=200)
    lost = stats["lost"] + killed["lost"]
    ok = (lost == 0 and stats["corrupt"] == 0 and stats["duplicated"] == 0 and stats["integrity"] == "ok"
          and killed["integrity"] == "ok" and killed["writable_after_restart"])
    line = (f"audit log: {stats['written']} records written by {processes} processes x {threads} threads "
            f"(+ {threads} threads here), {stats['stored']} stored, {stats['lost']} lost, {stats['corrupt']} corrupt; "
            f"writer killed after {killed['reported']} records: {killed['lost']} lost, "
            f"integrity {killed['integrity']}, writable after restart: {killed['writable_after_restart']}")
    return line, ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fuzz", type=int, default=3000, help="fuzz cases")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds of the concurrency test")
    p.add_argument("--threads", type=int, default=8, help="threads sharing one model")
    args = p.parse_args()
    # Fuzzed DICOM headers make pydicom warn about every odd value; the outcome is what counts.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for run in (lambda: bad_inputs(tmp), lambda: fuzz(args.fuzz),
                    lambda: concurrency(args.threads, args.seconds), lambda: training_kills(tmp),
                    lambda: audit_log(tmp)):
            line, ok = run()
            all_ok &= ok
            print(line, flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
