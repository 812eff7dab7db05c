"""Interrupted training: :func:`train_cmd` / :func:`run_training` run
``training.fit`` on a tiny dataset, :func:`kill_during_training` SIGKILLs it
at chosen moments and checks what survives, :func:`compare_runs` compares a
resumed run with an uninterrupted one, :func:`bad_datasets` lists data on
which training must stop with a clear message.
"""
from __future__ import annotations

import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fork_server import PYTHON, REPO, ForkServer, child_env

# 32 px (the smallest size), one thread: an epoch of 24 images takes ~0.5 s;
# a process spends ~7 s importing torch before it trains.
# Batch size 4, seed 3, medium augmentation: validation macro-F1 improves at
# epochs 1 and 5 of 6, so best.pt is rewritten mid-run and model.pt is not
# simply epoch 1. The checkpoints are kept so that finished runs can be
# compared by their last.pt.
TRAIN_ARGS = ["--arch", "baseline", "--img-size", "32", "--batch-size", "4", "--workers", "1",
              "--weight-storage", "fp32", "--seed", "3", "--augment", "medium", "--quiet", "--keep-checkpoints"]


def make_tiny_dataset(root: Path, classes: tuple[str, ...] = ("alpha", "beta"), train: int = 12,
                      valid: int = 4) -> Path:
    from tests.synthetic import make_split_dataset

    return make_split_dataset(root, list(classes), train=train, valid=valid)


def train_cmd(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [PYTHON, "-m", "training.fit", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            *TRAIN_ARGS, *extra]


def fit_argv(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--epochs", str(epochs), *TRAIN_ARGS, *extra]


def run_training(data: Path, out: Path, epochs: int, *extra: str, server: "ForkServer | None" = None,
                 timeout: float = 300):
    """``python -m training.fit`` to the end: a CompletedProcess, or with
    ``server`` a finished ServerJob (same returncode/stdout/stderr)."""
    if server is not None:
        return server.run("training.fit", fit_argv(data, out, epochs, *extra), out.parent / "logs", timeout=timeout)
    return subprocess.run(train_cmd(data, out, epochs, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env())


def temp_files(out: Path, names: tuple[str, ...] = ("last.pt", "best.pt", "model.pt")) -> list[Path]:
    """Temporary files of atomic writes in progress (or left by a killed writer)."""
    try:
        return [p for p in out.iterdir() if p.name.endswith(".tmp") and p.name.startswith(tuple(f".{n}." for n in names))]
    except FileNotFoundError:
        return []


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@dataclass
class KillReport:
    kills: int = 0
    kills_during_write: int = 0
    finished_early: int = 0
    checkpoints_checked: int = 0
    checkpoints_lost: int = 0
    leftover_temp_files: int = 0
    moments: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_checkpoints(out: Path, epochs: int) -> tuple[dict[str, int], list[str]]:
    """Load the checkpoints in ``out``: best.pt as a model, last.pt as training
    state. Returns ({name: epoch} of those that load, problems)."""
    from ctapp.checkpoint import CheckpointError, load_model_file, safe_load

    loaded, problems = {}, []
    if (out / "best.pt").exists():
        try:
            _, meta = load_model_file(out / "best.pt", arch="baseline", num_classes=2)
            loaded["best.pt"] = int(meta["epoch"])
        except CheckpointError as exc:
            problems.append(f"best.pt does not load: {exc}")
    if (out / "last.pt").exists():
        try:
            state = safe_load(out / "last.pt")
            done = int(state["state"]["epoch"])
            if not 1 <= done <= epochs or len(state["state"]["history"]) != done:
                problems.append(f"last.pt is inconsistent: epoch {done}, {len(state['state']['history'])} history rows")
            loaded["last.pt"] = done
        except (CheckpointError, KeyError, TypeError) as exc:
            problems.append(f"last.pt does not load: {exc}")
    return loaded, problems


KILL_MOMENTS = ("writing last.pt", "mid-epoch", "writing a checkpoint", "mid-epoch", "writing model.pt")


def kill_during_training(server: ForkServer, data: Path, out: Path, epochs: int, *,
                         moments: tuple[str, ...] = KILL_MOMENTS, seed: int = 0, timeout: float = 240) -> KillReport:
    """Start (or resume) training and SIGKILL it at each moment in turn;
    after every kill, the checkpoints present before must still be there and
    load, and never go back in epochs.

    Moments: 'writing last.pt' / 'writing a checkpoint' / 'writing model.pt':
    as soon as that atomic write's temporary file appears (the file is being
    written); 'mid-epoch': a random 0-0.6 s after this attempt's first
    last.pt, i.e. somewhere in the next epoch."""
    rng = random.Random(seed)
    report = KillReport()
    deadline = time.monotonic() + timeout
    targets = {"writing last.pt": ("last.pt",), "writing a checkpoint": ("last.pt", "best.pt"),
               "writing model.pt": ("model.pt",)}
    before: dict[str, int] = {}
    for moment in moments:
        if time.monotonic() > deadline:
            report.problems.append("ran out of time")
            break
        stale = set(temp_files(out))
        resume = ["--resume"] if (out / "last.pt").exists() else []
        proc = server.start("training.fit", fit_argv(data, out, epochs, *resume), out.parent / "logs")
        last_seen, kill_at, killed = _mtime(out / "last.pt"), None, False
        while proc.poll() is None and time.monotonic() < deadline:
            if moment in targets:
                if set(temp_files(out, targets[moment])) - stale:
                    proc.kill()
                    killed = True
                    break
                time.sleep(0.001)
            else:
                if kill_at is None and _mtime(out / "last.pt") != last_seen:
                    kill_at = time.monotonic() + rng.uniform(0.0, 0.6)
                if kill_at is not None and time.monotonic() >= kill_at:
                    proc.kill()
                    killed = True
                    break
                time.sleep(0.01)
        proc.wait(timeout=60)
        stderr = proc.stderr
        if killed and proc.returncode == -signal.SIGKILL:
            report.kills += 1
            during = bool(set(temp_files(out)) - stale)  # its temp file is left: killed mid-write
            report.kills_during_write += during
            report.moments.append(moment + (" (temp file left: mid-write)" if during else ""))
        elif proc.returncode == 0:
            report.finished_early += 1
            report.moments.append(f"{moment}: finished before the kill")
            break
        else:
            report.problems.append(f"training exited {proc.returncode}: {stderr[-2000:]}")
            break
        loaded, problems = check_checkpoints(out, epochs)
        report.checkpoints_checked += len(loaded)
        report.problems += problems
        for name, epoch in before.items():
            if name not in loaded:
                report.checkpoints_lost += 1
                report.problems.append(f"{name} (epoch {epoch}) was lost by the kill '{moment}'")
            elif loaded[name] < epoch:
                report.checkpoints_lost += 1
                report.problems.append(f"{name} went back from epoch {epoch} to {loaded[name]}")
        before = loaded
    report.leftover_temp_files = len(temp_files(out))
    return report


@dataclass
class BadDataset:
    name: str
    data: Path
    args: tuple[str, ...]
    words: tuple[str, ...]  # the error line must contain these (case insensitive)
    out: Path | None = None  # an output folder prepared beforehand


def bad_datasets(root: Path) -> list[BadDataset]:
    """Datasets and settings on which training must stop with a clear message."""
    import shutil

    good = make_tiny_dataset(root / "good")
    empty = root / "empty_class"
    shutil.copytree(good, empty)
    for split in ("train", "valid"):
        (empty / split / "gamma").mkdir()
    one = make_tiny_dataset(root / "one_class", classes=("alpha",))
    unreadable = root / "unreadable"
    for split in ("train", "valid"):
        for name in ("alpha", "beta"):
            folder = unreadable / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{name} ({i}).png").write_bytes(b"not an image " * (i + 1))
    few = root / "four_images"
    for name in ("alpha", "beta"):
        (few / name).mkdir(parents=True)
        for src in sorted((good / "train" / name).iterdir())[:2]:
            shutil.copy(src, few / name / src.name)
    other_run = root / "other_run"
    other_run.mkdir()
    import torch

    torch.save({"arch": "resnet50", "class_names": ["alpha", "beta"], "model": {}, "optimizer": {}, "state": {}},
               other_run / "last.pt")
    return [
        BadDataset("loss becomes NaN", good, ("--lr", "1e30"), ("loss became", "diverged", "--lr")),
        BadDataset("empty class folder", empty, (), ("gamma", "no")),
        BadDataset("one class", one, (), ("2 classes",)),
        BadDataset("no readable images", unreadable, (), ("readable images",)),
        BadDataset("no such data folder", root / "missing", (), ("no such folder",)),
        BadDataset("four images in all", few, (), ("4", "images")),
        BadDataset("resume another run", good, ("--resume",), ("resnet50", "cannot resume"), out=other_run),
    ]


def final_weights(out: Path) -> dict:
    from ctapp.checkpoint import load_model_file

    model, meta = load_model_file(out / "model.pt")
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "meta": meta}


def compare_runs(a: Path, b: Path, *, atol: float = 0.0) -> list[str]:
    """Differences between two finished runs: the final epoch's weights and
    optimizer state (last.pt), the stored model (model.pt: best epoch, after
    calibration), its metadata and the per-epoch history."""
    import torch

    from ctapp.checkpoint import safe_load

    problems = []

    def compare(name: str, x, y) -> None:
        if isinstance(x, dict):
            if set(x) != set(y):
                problems.append(f"{name}: keys differ")
                return
            for key in x:
                compare(f"{name}.{key}", x[key], y[key])
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y):
                problems.append(f"{name}: lengths differ")
                return
            for i, (u, v) in enumerate(zip(x, y)):
                compare(f"{name}[{i}]", u, v)
        elif isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                problems.append(f"{name}: shapes differ")
            elif x.is_floating_point():
                diff = float((x - y).abs().max()) if x.numel() else 0.0
                if diff > atol:
                    problems.append(f"{name} differs by {diff:.3g}")
            elif not torch.equal(x, y):
                problems.append(f"{name} differs")
        elif x != y and not (isinstance(x, float) and abs(x - y) <= atol):
            problems.append(f"{name}: {x!r} != {y!r}")

    la, lb = safe_load(a / "last.pt"), safe_load(b / "last.pt")
    compare("last.pt model", la["model"], lb["model"])
    compare("last.pt optimizer", la["optimizer"], lb["optimizer"])
    for key in ("epoch", "best_f1", "best_epoch", "stale"):
        compare(f"last.pt state.{key}", la["state"][key], lb["state"][key])
    wa, wb = final_weights(a), final_weights(b)
    compare("model.pt weights", wa["state"], wb["state"])
    for key in ("epoch", "metrics", "temperature", "ood"):
        compare(f"model.pt {key}", wa["meta"].get(key), wb["meta"].get(key))
    ha, hb = _history(a), _history(b)
    if ha != hb:
        problems.append(f"history differs:\n{ha}\nvs\n{hb}")
    return problems


def _history(out: Path) -> list[dict]:
    """history.csv without the timing columns (seconds, speed)."""
    lines = (out / "history.csv").read_text().strip().splitlines()
    names = lines[0].split(",")
    keep = [i for i, n in enumerate(names) if n not in ("seconds", "images_per_second")]
    return [{names[i]: row.split(",")[i] for i in keep} for row in lines[1:]]
