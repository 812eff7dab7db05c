"""Training one model: the invocation's shared setup (device, processes,
precision, preprocessing), the optimiser and learning-rate schedule, and
:func:`train_model`, which runs one model's epochs with a checkpoint after each
(``last.pt``: weights, optimiser and schedule, what ``--resume`` continues from)
and, on a single split, the best epoch's weights (``best.pt``).

The single-split run (:mod:`training.single_split`) and cross-validation
(:mod:`training.crossval`) train through it; one epoch is
:func:`training.engine.train_one_epoch`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ctapp.checkpoint import CheckpointError, atomic_save, atomic_write_text, safe_load, save_model_file
from ctapp.inference import batched_forward
from ctapp.metrics import calibrated, evaluation_report
from ctapp.models import create_model, get_spec
from ctapp.preprocess import PreprocessConfig
from training.card import short_metrics
from training.engine import (
    Precision,
    Progress,
    SliceDataset,
    TrainingError,
    choose_precision,
    configure_threads,
    train_one_epoch,
)

STATE_FILE = "last.pt"
BEST_FILE = "best.pt"


def setup_distributed(device_arg: str) -> tuple[torch.device, int, int]:
    """Device, rank and world size; initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device_arg == "auto" else device_arg)
    if device.type == "cuda" and device.index is None:  # plain "cuda": this process's GPU under torchrun
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return device, (dist.get_rank() if dist.is_initialized() else 0), world


@dataclass
class Setup:
    """What every training run of one invocation shares (all folds and the final model)."""

    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    precision: Precision
    config: PreprocessConfig
    class_names: list[str]
    log: Callable[[str], None]
    epochs_run: int = 0  # in this invocation, over all runs (--stop-after counts these)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_freeze_epochs(weights: str) -> int:
    """Epochs on a frozen backbone when --freeze-epochs is not given: a few with pretrained weights."""
    return 3 if weights != "none" else 0


def start(args: argparse.Namespace) -> Setup:
    device, rank, world = setup_distributed(args.device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    if args.freeze_epochs is None:
        args.freeze_epochs = default_freeze_epochs(args.weights)
    config = PreprocessConfig(img_size=args.img_size, window_center=args.window[0], window_width=args.window[1],
                              crop=args.crop, intensity=args.intensity)
    return Setup(args, device, rank, world, choose_precision(args.amp, device), config, [], log)


def build_optimizer(args, model: nn.Module, head_name: str, backbone_scale: float) -> torch.optim.Optimizer:
    head, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith(head_name + ".") else backbone).append(param)
    groups = [{"params": head, "lr": args.lr, "base_lr": args.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": args.lr * backbone_scale, "base_lr": args.lr * backbone_scale})
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def set_trainable(model: nn.Module, spec, phase: str, unfreeze_blocks: int) -> None:
    """phase 'head': only the classifier learns; 'finetune': the head plus the last
    ``unfreeze_blocks`` backbone stages (0: everything)."""
    for param in model.parameters():
        param.requires_grad_(phase != "head" and unfreeze_blocks == 0)
    for param in model.get_submodule(spec.head).parameters():
        param.requires_grad_(True)
    if phase != "head" and unfreeze_blocks:
        for stage in spec.stages(model)[-unfreeze_blocks:]:
            for param in stage.parameters():
                param.requires_grad_(True)


def schedule_factor(args, epoch: int) -> float:
    """Learning-rate multiplier for epoch (cosine/step/constant; plateau is handled separately)."""
    if epoch < args.warmup_epochs and args.schedule != "plateau":
        return (epoch + 1) / (args.warmup_epochs + 1)
    if args.schedule == "cosine":
        span = max(args.epochs - args.warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / span)) * 0.99 + 0.01
    if args.schedule == "step":
        return float(args.gamma ** ((epoch - args.warmup_epochs) // args.step_size))
    return 1.0


def train_model(setup: Setup, out: Path, train_images: torch.Tensor, train_labels: list[int],
                valid_images: torch.Tensor | None, valid_labels: np.ndarray | None, *, meta_base: dict,
                keep_best: bool, seed: int, overall: Progress | None = None, title: str = "") -> tuple[nn.Module, dict]:
    """Train one model for ``args.epochs`` epochs, checkpointing every epoch to
    ``out/last.pt`` (``--resume`` continues there). Returns the last epoch's model
    and the run state.

    With ``keep_best`` the epoch with the best validation macro-F1 is also
    written to ``out/best.pt`` (a single train/valid split). Cross-validation
    folds and the final model pass False: their schedule is fixed in advance,
    and validation figures, when there are any, are only recorded.
    """
    args, device, precision, config = setup.args, setup.device, setup.precision, setup.config
    spec = get_spec(args.arch)
    log = setup.log
    n_classes = len(setup.class_names)
    torch.manual_seed(seed)
    # --weights DIR/{fold}/backbone.pt: each cross-validation run starts from its own pretraining (training.pretrain)
    weights = str(args.weights).replace("{fold}", out.name if out.name.startswith("fold-") else "full")
    model = create_model(args.arch, n_classes, weights=weights, dropout=args.dropout)
    model = model.to(device, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)

    counts = np.bincount(train_labels, minlength=n_classes).astype(float)
    weight = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32) \
        if args.class_weights == "balanced" else None
    criterion = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None,
                                    label_smoothing=args.label_smoothing)

    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": -1, "stale": 0, "history": [], "train_seconds": 0.0}
    optimizer_state = scheduler_state = None
    if args.resume and (out / STATE_FILE).is_file():
        saved = safe_load(out / STATE_FILE)
        if saved.get("arch") != args.arch or saved.get("class_names") != setup.class_names:
            raise CheckpointError(f"{out / STATE_FILE} is a {saved.get('arch')} run on classes "
                                  f"{saved.get('class_names')}; it cannot resume this {args.arch} run")
        model.load_state_dict(saved["model"])
        optimizer_state, scheduler_state = saved["optimizer"], saved.get("scheduler")
        state = saved["state"]
        log(f"resumed from {out / STATE_FILE}: {state['epoch']} epoch(s) done")
    elif args.resume:
        log(f"--resume: no {out / STATE_FILE} yet, starting from scratch")

    scaler = torch.amp.GradScaler("cuda") if precision.autocast_dtype == torch.float16 else None
    dataset = SliceDataset(train_images, train_labels, args.augment, config)
    validate = valid_images is not None and len(valid_images) > 0

    def make_phase(epoch: int):
        """Trainable parameters, optimiser and (under torchrun) the DDP wrapper for this epoch's phase."""
        phase = "head" if epoch < args.freeze_epochs else "finetune"
        set_trainable(model, spec, phase, args.unfreeze_blocks)
        scale = 1.0 if args.freeze_epochs == 0 else args.finetune_lr_scale
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None) if setup.world > 1 else model
        return phase, build_optimizer(args, model, spec.head, scale), wrapped

    def make_plateau(optimizer):
        if args.schedule != "plateau":
            return None
        if not validate:
            raise TrainingError("the plateau schedule needs a validation split; use cosine or step")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.gamma,
                                                          patience=args.plateau_patience)

    phase, optimizer, ddp_model = make_phase(state["epoch"])
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    plateau = make_plateau(optimizer)
    if plateau is not None and scheduler_state is not None:
        plateau.load_state_dict(scheduler_state)
    if setup.is_main:
        out.mkdir(parents=True, exist_ok=True)

    state["paused"] = False
    for epoch in range(state["epoch"], state["epoch"] if state.get("early_stopped") else args.epochs):
        if args.stop_after and setup.epochs_run >= args.stop_after:
            log(f"stopping after {args.stop_after} epoch(s) as asked; continue with --resume")
            state["paused"] = True
            break
        new_phase = "head" if epoch < args.freeze_epochs else "finetune"
        if new_phase != phase:
            phase, optimizer, ddp_model = make_phase(epoch)
            log(f"epoch {epoch + 1}: unfreezing the backbone ({args.unfreeze_blocks or 'all'} stages) at "
                f"{args.finetune_lr_scale}x the learning rate")
            plateau = make_plateau(optimizer)
        if plateau is None:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * schedule_factor(args, epoch)
        # Seeding per epoch makes a resumed run repeat exactly what an uninterrupted one does.
        torch.manual_seed(seed * 100_003 + epoch)
        if setup.world > 1:
            sampler = DistributedSampler(dataset, num_replicas=setup.world, rank=setup.rank, seed=seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=0,
                            drop_last=len(dataset) > args.batch_size)
        bar = Progress(len(loader), f"{title}epoch {epoch + 1}/{args.epochs}",
                       enabled=setup.is_main and not args.quiet and overall is None)
        stats = train_one_epoch(ddp_model, loader, criterion, optimizer, config, precision, scaler, bar, epoch)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats}
        improved = False
        if validate:
            logits, _ = batched_forward(model, valid_images, config, device=device, autocast=precision.autocast)
            report = evaluation_report(valid_labels, calibrated(logits, 1.0), setup.class_names)
            val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(valid_labels)))
            row.update(val_loss=val_loss, val_accuracy=report["accuracy"], val_macro_f1=report["macro_f1"],
                       val_auc=report["roc_auc"]["macro"], val_ece=report["ece"])
            if plateau is not None:
                plateau.step(report["macro_f1"])
            improved = report["macro_f1"] > state["best_f1"]
            if improved:
                state.update(best_f1=report["macro_f1"], best_epoch=epoch + 1, stale=0)
            else:
                state["stale"] += 1
        state["history"].append(row)
        state["train_seconds"] += stats["seconds"]
        state["epoch"] = epoch + 1
        state["early_stopped"] = bool(keep_best and args.patience and state["stale"] >= args.patience)
        line = f"{title}epoch {epoch + 1}: loss {stats['train_loss']:.4f}"
        if validate:
            line += (f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} macro-F1 "
                     f"{row['val_macro_f1']:.4f} AUC {_fmt(row['val_auc'])}")
        log(line + f" | {stats['images_per_second']:.1f} img/s" + (" | best" if improved and keep_best else ""))
        if overall is not None:
            overall.advance()
        if setup.is_main:
            if improved and keep_best:
                save_model_file(out / BEST_FILE, model, {**meta_base, "epoch": epoch + 1,
                                                         "metrics": short_metrics(report)})
            atomic_save({"arch": args.arch, "class_names": setup.class_names, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(),
                         "scheduler": plateau.state_dict() if plateau is not None else None,
                         "state": state}, out / STATE_FILE)
            write_history(state["history"], out)
        setup.epochs_run += 1
        if state["early_stopped"]:
            log(f"early stop: no better validation macro-F1 for {args.patience} epochs")
            break
    if setup.world > 1:
        dist.barrier()
    return model, state


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_history(history: list[dict], out: Path) -> None:
    if not history:
        return
    lines = [",".join(history[0])] + [",".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                               for v in row.values()) for row in history]
    atomic_write_text("\n".join(lines) + "\n", out / "history.csv")


def discard_checkpoints(folder: Path, args) -> None:
    """Once a run's model.pt is written, its checkpoints only serve a new
    finalisation; ``last.pt`` with its optimiser state is several times the size
    of model.pt, so both go unless ``--keep-checkpoints``."""
    if not args.keep_checkpoints:
        for name in (STATE_FILE, BEST_FILE):
            (folder / name).unlink(missing_ok=True)
