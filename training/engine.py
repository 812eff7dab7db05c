"""The training loop shared by ``training.fit`` and the benchmarks: a dataset
over cached slices, precision selection, one epoch of training, and a progress
line with speed and time left."""
from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ctapp.precision import Precision, cpu_has_fast_bf16
from ctapp.preprocess import PreprocessConfig, normalize, train_augment


class TrainingError(RuntimeError):
    """Training cannot go on (message says why and what to change)."""


class SliceDataset(Dataset):
    """Cached slices with per-sample augmentation; yields (1, S, S) grey and the label."""

    def __init__(self, images: torch.Tensor, labels: list[int], augment: str = "none",
                 config: PreprocessConfig | None = None):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = train_augment(augment, config)  # the scanner render preprocesses as the model does

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def choose_precision(amp: str, device: torch.device) -> Precision:
    if amp == "off":
        return Precision(device, None)
    if device.type == "cuda":
        if amp in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return Precision(device, torch.bfloat16)
        return Precision(device, torch.float16)
    if amp == "bf16" or (amp == "auto" and cpu_has_fast_bf16()):
        return Precision(device, torch.bfloat16)
    if amp == "fp16":
        raise TrainingError("fp16 autocast is for CUDA devices; use --amp bf16 or off on a CPU")
    return Precision(device, None)


def to_input(batch: torch.Tensor, config: PreprocessConfig, precision: Precision) -> torch.Tensor:
    x = normalize(batch.to(precision.device, non_blocking=True), config)
    return x.contiguous(memory_format=torch.channels_last) if precision.channels_last else x


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    config: PreprocessConfig, precision: Precision, scaler: torch.amp.GradScaler | None = None,
                    progress: "Progress | None" = None, epoch: int = 0) -> dict:
    model.train()
    total_loss, seen, correct = 0.0, 0, 0
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader, 1):
        x = to_input(images, config, precision)
        labels = labels.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
            loss = criterion(logits.float(), labels)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss.item()} at epoch {epoch + 1}, batch {step}: training diverged. "
                "Lower the learning rate (--lr), or check the data for corrupt images"
            )
        backward_step(loss, optimizer, scaler)
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        if progress:
            progress.update(step, loss=total_loss / seen)
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "images_per_second": seen / max(elapsed, 1e-9), "seconds": elapsed}


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None = None) -> None:
    """Clear the gradients, back-propagate ``loss`` (scaled under fp16 autocast) and step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


class Progress:
    """One status line: step/total, speed, time left; redrawn in place on a
    terminal, printed every ``every`` seconds otherwise."""

    def __init__(self, total: int, label: str, unit: str = "batch", enabled: bool = True, every: float = 30.0,
                 initial: int = 0):
        self.total, self.label, self.unit = total, label, unit
        self.enabled = enabled
        self.every = every
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.initial = self.done = initial  # work done before this process started (a resumed run)

    def advance(self, steps: int = 1, **values: float) -> None:
        self.update(self.done + steps, **values)

    def update(self, done: int, **values: float) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        final = done >= self.total
        if not final and not self.tty and now - self.last < self.every:
            return
        self.last = now
        rate = (done - self.initial) / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else math.inf
        extras = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = (f"{self.label} {done}/{self.total} {self.unit}es" if self.unit == "batch" else
                f"{self.label} {done}/{self.total} {self.unit}s")
        line += f" | {rate:.2f} {self.unit}/s | left {_duration(left)} {extras}".rstrip()
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100) + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def configure_threads(local_world_size: int = 1) -> None:
    """Split the CPU cores between local processes (torchrun) unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world_size, 1)))
