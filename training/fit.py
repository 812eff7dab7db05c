"""Train a CT slice classifier and write a model folder.

    python -m training.fit --data DIR --arch resnet50 --weights none --epochs 30 --out models/NAME

The folder receives ``model.pt`` (best epoch by validation macro-F1,
temperature-calibrated, with an out-of-distribution reference),
``model_card.json``, ``eval_report.json`` (+ per-image CSV) for the validation
split, ``history.csv``, ``audit.json``, and ``last.pt`` for ``--resume``.
Multi-process: ``torchrun --nproc_per_node=N -m training.fit ...``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import ctapp
from ctapp.audit import audit_dataset
from ctapp.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_model_file,
    pack_state,
    safe_load,
    save_model_file,
    sha256_file,
    unpack_state,
)
from ctapp.data import GROUP_PATTERN, DatasetError, DatasetIndex, assign_splits, scan_sources
from ctapp.evaluation import evaluate_files, write_report
from ctapp.imaging import LUNG_WINDOW
from ctapp.inference import NOT_CHEST_CT, UNLIKE_TRAINING, LoadedModel, batched_forward
from ctapp.model_folders import CARD_FILE, REPORT_FILE, WEIGHTS_FILE, load_model
from ctapp.ood import MahalanobisOOD, ood_feature_keys
from ctapp.metrics import calibrated, evaluation_report, fit_temperature
from ctapp.models import ARCHITECTURES, WeightsError, count_parameters, create_model, get_spec
from ctapp.preprocess import AUGMENT_LEVELS, CROP_MODES, INTENSITY_MODES, PreprocessConfig, load_squares
from training.engine import (
    Precision,
    Progress,
    SliceDataset,
    TrainingError,
    choose_precision,
    configure_threads,
    train_one_epoch,
)
from training.foreign import FAR_RULE, ct_phantom, far_threshold, foreign_images

STATE_FILE = "last.pt"
BEST_FILE = "best.pt"
DISCLAIMER = "Research use only. Not a medical device; not for diagnosis or treatment decisions."


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a CT slice classifier on a folder of class sub-folders.",
                                add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, nargs="+", metavar="DIR",
                   help="dataset root(s): train/valid[/test] folders of class folders, or class folders only; "
                        "several roots are pooled (each is a 'source' in the reports)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="validation share when the data has no splits")
    g.add_argument("--split-block", type=int, default=0, metavar="N",
                   help="split by blocks of N consecutive file numbers (keeps a patient's slices together); "
                        "0 splits by image")
    g.add_argument("--cv", type=int, default=0, metavar="K",
                   help="K-fold cross-validation over all labelled images (train and valid pooled, test never "
                        "touched): every image gets one out-of-fold prediction, which the card reports and "
                        "calibration is fitted on; the shipped model is then trained on all of them. 0: one "
                        "train/valid split, best epoch by validation macro-F1")
    g.add_argument("--group-pattern", default=GROUP_PATTERN, metavar="REGEX",
                   help="files whose name matches REGEX are kept together in splits and folds, grouped by its "
                        "first capture (default: figure crops '<paper>-p<page>...' and '<figure>%%<panel>'); "
                        "'' turns it off")
    g.add_argument("--keep-duplicates", action="store_true",
                   help="do not drop duplicates, cross-split copies and label conflicts (not recommended)")
    g.add_argument("--task", default="", help="task name shown in the app, e.g. 'Lung cancer (4 classes)'")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=sorted(ARCHITECTURES), help="architecture")
    g.add_argument("--weights", default="none",
                   help="initial weights: 'imagenet' (torchvision, downloaded and cached), 'none' (from scratch) "
                        "or the path of a local torchvision weight file")
    g.add_argument("--img-size", type=int, default=128, help="input side in pixels (slices are padded to square)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout before the classifier")
    g.add_argument("--crop", default="body", choices=list(CROP_MODES),
                   help="crop each slice to the patient's body (drops frames, text, rulers and arrows around it)")
    g.add_argument("--intensity", default="equalise", choices=list(INTENSITY_MODES),
                   help="intensity standardisation: percentile stretches the 1st..99th percentile of the slice to 0..1; equalise equalises its histogram (the same image whatever the window, gamma or contrast of the export)")
    g.add_argument("--window", type=float, nargs=2, default=(LUNG_WINDOW.center, LUNG_WINDOW.width),
                   metavar=("CENTER", "WIDTH"), help="DICOM intensity window in HU")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30, help="number of epochs")
    g.add_argument("--batch-size", type=int, default=32, help="images per batch (per process)")
    g.add_argument("--opt", default="adamw", choices=["sgd", "adamw"], help="optimiser")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "step", "plateau", "constant"],
                   help="learning-rate schedule (plateau: reduce when validation macro-F1 stalls)")
    g.add_argument("--warmup-epochs", type=int, default=2, help="linear warm-up epochs (cosine and step)")
    g.add_argument("--step-size", type=int, default=10, help="epochs between decays (step schedule)")
    g.add_argument("--gamma", type=float, default=0.1, help="decay factor (step and plateau schedules)")
    g.add_argument("--plateau-patience", type=int, default=3, help="epochs without improvement before a plateau decay")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy")
    g.add_argument("--class-weights", default="balanced", choices=["balanced", "none"],
                   help="weight the loss by inverse class frequency")
    g.add_argument("--augment", default="medium", choices=list(AUGMENT_LEVELS),
                   help="augmentation strength: rotation, shift, zoom, flip, brightness, contrast; "
                        "'acquisition' adds random gamma, window, blur/sharpening, noise and JPEG "
                        "artefacts, as slices from other scanners and exports differ; 'detail' adds only "
                        "blur/sharpening, noise and JPEG (fine detail as a cue of the source, not the class); "
                        "'export' is detail plus narrower windows")
    g.add_argument("--patience", type=int, default=0, help="early stopping: epochs without a better macro-F1 (0: off)")
    g = p.add_argument_group("transfer learning (with pretrained weights)")
    g.add_argument("--freeze-epochs", type=int, default=None,
                   help="epochs training only the new head on a frozen backbone (default: 3 with pretrained "
                        "weights, 0 from scratch)")
    g.add_argument("--unfreeze-blocks", type=int, default=0,
                   help="after the frozen phase, fine-tune only the last N backbone stages (0: all)")
    g.add_argument("--finetune-lr-scale", type=float, default=0.1,
                   help="learning-rate factor for the backbone after the frozen phase")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output model folder")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (the last completed epoch)")
    g.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="stop after N epochs in this invocation, as if interrupted (continue later with --resume)")
    g.add_argument("--seed", type=int, default=0, help="random seed (splits, initialisation, augmentation)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision: auto uses bf16/fp16 on CUDA and bf16 only on CPUs with native bf16")
    g.add_argument("--workers", type=int, default=2, help="threads decoding images into the in-memory cache")
    g.add_argument("--weight-storage", default="int8", choices=["fp32", "fp16", "int8"],
                   help="how the final model.pt stores weights (loaded back as fp32)")
    g.add_argument("--ood-quantile", type=float, default=0.95,
                   help="validation quantile of the out-of-distribution score used as its threshold")
    g.add_argument("--target-accuracy", type=float, default=0.95,
                   help="with --cv: the confidence threshold is the lowest at which out-of-fold answers reach this "
                        "accuracy; below it the app says 'uncertain'. Set above the 90%% goal because a threshold "
                        "fitted on the other folds does worse on a hard fold (lung VGG19-BN at 0.90: 88%% out of "
                        "fold, 74%% on fold 2; at 0.95: 95%%, 85%% on fold 2)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


# --------------------------------------------------------------------------- setup


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


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"ctapp {ctapp.__version__}" + (f" ({sha})" if sha else "")


def prepare_data(args, log) -> tuple[DatasetIndex, dict, dict]:
    """Scan, audit and split; returns the index with splits, the audit summary and the full report."""
    index = scan_sources(args.data)
    log(f"data: {index.root} ({index.layout} layout), {len(index.samples)} files, classes {index.class_names}")
    audit = audit_dataset(index, workers=args.workers)
    report = audit.to_dict()
    for warning in report["warnings"]:
        log(f"audit: {warning}")
    log(f"audit: {report['redundant_copies']} redundant copies in {report['duplicate_groups']} duplicate groups, "
        f"{report['cross_split_copies']} cross-split copies, {len(report['label_conflicts'])} label conflicts, "
        f"{len(report['unreadable'])} unreadable; shortcut probe accuracy "
        f"{report['shortcut_probe'].get('accuracy')} (chance {report['shortcut_probe']['chance']:.2f})")
    unreadable = {r.sample.path for r in audit.records if r.error}
    exclude = unreadable | (set() if args.keep_duplicates else set(audit.dropped))
    if index.layout == "classes":
        index = assign_splits(index, val_fraction=args.val_fraction, seed=args.seed,
                              block_size=args.split_block or None, pattern=args.group_pattern, exclude=exclude)
    else:
        index.samples = [s for s in index.samples if s.path not in exclude]
        if "valid" not in index.splits and "train" in index.splits:
            log("no validation split found: holding out part of the training split")
            index.samples = [s for s in index.samples if s.split == "train"]
            index.layout = "classes"
            index = assign_splits(index, val_fraction=args.val_fraction, seed=args.seed,
                                  block_size=args.split_block or None, pattern=args.group_pattern)
    train, valid = index.split("train"), index.split("valid")
    if not train or not valid:
        raise DatasetError(f"{args.data}: need readable images in both a training and a validation split "
                           f"(found {len(train)} and {len(valid)})")
    counts = np.bincount([s.label for s in train], minlength=len(index.class_names))
    empty = [index.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(f"{args.data}: class(es) {empty} have no readable training images; "
                           "remove the empty folder or add images")
    return index, audit.summary(), report


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


# --------------------------------------------------------------------------- main


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


def start(args: argparse.Namespace) -> Setup:
    device, rank, world = setup_distributed(args.device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    if args.freeze_epochs is None:
        args.freeze_epochs = 3 if args.weights != "none" else 0
    config = PreprocessConfig(img_size=args.img_size, window_center=args.window[0], window_width=args.window[1],
                              crop=args.crop, intensity=args.intensity)
    return Setup(args, device, rank, world, choose_precision(args.amp, device), config, [], log)


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
    model = create_model(args.arch, n_classes, weights=args.weights, dropout=args.dropout)
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
    dataset = SliceDataset(train_images, train_labels, args.augment)
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
                                                         "metrics": _short_metrics(report)})
            atomic_save({"arch": args.arch, "class_names": setup.class_names, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(),
                         "scheduler": plateau.state_dict() if plateau is not None else None,
                         "state": state}, out / STATE_FILE)
            _write_history(state["history"], out)
        setup.epochs_run += 1
        if state["early_stopped"]:
            log(f"early stop: no better validation macro-F1 for {args.patience} epochs")
            break
    if setup.world > 1:
        dist.barrier()
    return model, state


def main(args: argparse.Namespace) -> Path:
    setup = start(args)
    try:
        if args.cv:
            from training.crossval import cross_validate

            return cross_validate(setup)
        return train_single_split(setup)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def describe_data(index: DatasetIndex, audit_summary: dict) -> dict:
    return {"root": str(index.root), "sources": sorted({s.source for s in index.samples}),
            "fingerprint": index.fingerprint(), "layout": index.layout, "splits": index.counts(),
            "notes": index.notes, "audit": audit_summary}


def meta_for(setup: Setup, index: DatasetIndex, audit_summary: dict) -> dict:
    args = setup.args
    return {
        "arch": args.arch, "class_names": index.class_names, "display_names": index.display_names,
        "preprocess": setup.config.to_dict(), "cam_layer": get_spec(args.arch).cam_layer,
        "train_args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": describe_data(index, audit_summary),
        "code_version": code_version(),
    }


def train_single_split(setup: Setup) -> Path:
    """One training and one validation split: the best epoch by validation macro-F1
    is kept, calibrated and reported on that split."""
    args, log = setup.args, setup.log
    out = Path(args.out)
    index, audit_summary, audit_report = prepare_data(args, log)
    setup.class_names = index.class_names
    train, valid = index.split("train"), index.split("valid")
    log(f"split: train {len(train)}, valid {len(valid)} images | {setup.precision.describe()} | "
        f"world size {setup.world}")
    bar = Progress(len(train), "caching", unit="image", enabled=setup.is_main and not args.quiet)
    train_images = load_squares([s.path for s in train], setup.config, workers=args.workers,
                                on_progress=lambda done, total: bar.update(done)).images
    valid_images = load_squares([s.path for s in valid], setup.config, workers=args.workers).images
    valid_labels = np.array([s.label for s in valid])
    meta_base = meta_for(setup, index, audit_summary)
    if setup.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(audit_report, indent=2), out / "audit.json")
    _, state = train_model(setup, out, train_images, [s.label for s in train], valid_images, valid_labels,
                           meta_base=meta_base, keep_best=True, seed=args.seed)
    if setup.is_main and not state["paused"]:
        finalize(args, out, meta_base, state, index, train_images, valid_images, valid_labels, setup.precision,
                 log)
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _short_metrics(report: dict) -> dict:
    keys = ("images", "accuracy", "macro_f1", "ece", "sensitivity", "specificity", "positive_class")
    short = {k: report[k] for k in keys if k in report}
    short["roc_auc_macro"] = report["roc_auc"]["macro"]
    return short


def _write_history(history: list[dict], out: Path) -> None:
    if not history:
        return
    lines = [",".join(history[0])] + [",".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                               for v in row.values()) for row in history]
    atomic_write_text("\n".join(lines) + "\n", out / "history.csv")


def finalize(args, out: Path, meta_base: dict, state: dict, index: DatasetIndex, train_images, valid_images,
             valid_labels, precision, log) -> None:
    """Best epoch -> weights as they will be stored, temperature, OOD reference,
    validation report, model card, model.pt."""
    model, best_meta = load_model_file(out / BEST_FILE)
    valid = index.split("valid")

    def validate(meta: dict) -> tuple[dict, list[dict]]:
        # Computed exactly as training.evaluate computes it: through a LoadedModel.
        report, rows = evaluate_files(LoadedModel(model, meta, path=out), [s.path for s in valid],
                                      [s.label for s in valid], workers=args.workers, root=index.root)
        return {**report, "split": "valid", "data": str(index.root)}, rows

    fp32_report, _ = validate(best_meta)
    # Everything below is fitted on the weights exactly as model.pt will hold them.
    model.load_state_dict(unpack_state(*pack_state(model.state_dict(), args.weight_storage)))
    config = PreprocessConfig.from_dict(best_meta["preprocess"])
    layers = ood_feature_keys(get_spec(args.arch).feature_layers(model))
    logits, valid_features = batched_forward(model, valid_images, config, feature_layers=layers)
    _, train_features = batched_forward(model, train_images, config, feature_layers=layers)
    temperature = fit_temperature(logits, valid_labels)
    ood = MahalanobisOOD.fit(train_features, np.array([s.label for s in index.split("train")]), valid_features)
    valid_scores, valid_far_scores = ood.scores(valid_features)
    ood.threshold = float(np.quantile(valid_scores, args.ood_quantile))
    ood.far_threshold = far_threshold(valid_far_scores)
    meta = {**best_meta, "temperature": temperature, "ood": ood.to_dict(), "name": out.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    report, rows = validate(meta)
    meta["metrics"] = _short_metrics(report)
    # A card left by an earlier finalisation describes weights about to be replaced.
    (out / CARD_FILE).unlink(missing_ok=True)
    save_model_file(out / WEIGHTS_FILE, model, meta, storage=args.weight_storage)
    write_report(report, rows, out / REPORT_FILE)
    shipped = load_model(out / WEIGHTS_FILE)
    card = model_card(args, out, meta, state, report, count_parameters(model), index)
    card["out_of_distribution"].update(ood_check(shipped, report))
    card["latency_ms"] = measure_latency(shipped)
    card["weight_storage_check"] = {
        "fp32 (uncalibrated)": {k: fp32_report[k] for k in ("accuracy", "macro_f1", "ece")},
        f"{args.weight_storage} (uncalibrated)": {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                                                  "ece": report["ece_uncalibrated"]},
    }
    atomic_write_text(json.dumps(card, indent=2), out / CARD_FILE)
    log(f"saved {out / WEIGHTS_FILE} (epoch {state['best_epoch']}, validation macro-F1 {report['macro_f1']:.4f}, "
        f"ECE {report['ece_uncalibrated']:.3f} -> {report['ece']:.3f} at T={temperature:.2f})")


def ood_check(model: LoadedModel, report: dict) -> dict:
    """Share of validation slices and of clearly foreign images that the OOD check flags."""
    states = {name: model.predict(image).state for name, image in foreign_images().items()}
    flagged = {name: state in (NOT_CHEST_CT, UNLIKE_TRAINING) for name, state in states.items()}
    return {"validation_flagged": report.get("ood_flagged"),
            "foreign_flagged": sum(flagged.values()) / len(flagged), "foreign_images": flagged,
            "foreign_not_chest_ct": sum(state == NOT_CHEST_CT for state in states.values()) / len(states),
            "foreign_states": states}


def measure_latency(model: LoadedModel, repeat: int = 10) -> dict:
    """Median CPU milliseconds of predict and predict + Grad-CAM on one 512x512 slice."""
    image = ct_phantom(512)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return round(float(np.median(times)), 1)

    return {"predict": median_ms(lambda: model.predict(image)),
            "predict_gradcam": median_ms(lambda: model.analyse(image)),
            "image": "512x512", "threads": torch.get_num_threads(), "machine": platform.machine()}


def model_card(args, out: Path, meta: dict, state: dict, report: dict, parameters: int,
               index: DatasetIndex) -> dict:
    spec = get_spec(args.arch)
    weights_origin = {"none": "from scratch (random initialisation)",
                      "imagenet": f"ImageNet ({spec.imagenet_weights}, torchvision)"}.get(
        str(args.weights), f"local torchvision weight file {Path(str(args.weights)).name}")
    return {
        "name": out.name,
        "task": args.task or " / ".join(index.display_names),
        "classes": index.class_names,
        "display_names": index.display_names,
        "architecture": args.arch,
        "architecture_title": spec.title,
        "weights_origin": weights_origin,
        "parameters": parameters,
        "weight_storage": args.weight_storage,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
        "size_bytes": (out / WEIGHTS_FILE).stat().st_size,
        "preprocessing": meta["preprocess"],
        "gradcam_layer": meta["cam_layer"],
        "training_data": meta["dataset"],
        "training": {"settings": meta["train_args"], "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
                     "train_seconds": round(state["train_seconds"], 1),
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "validation": {k: report[k] for k in ("images", "accuracy", "macro_f1", "roc_auc", "per_class",
                                              "sensitivity", "specificity", "positive_class") if k in report},
        "calibration": {"method": "temperature scaling fitted on the validation split",
                        "temperature": meta["temperature"], "ece_before": report["ece_uncalibrated"],
                        "ece_after": report["ece"]},
        "out_of_distribution": {"method": "Mahalanobis distance of pooled features to the nearest training-class "
                                          "mean (PCA, shared covariance) at every backbone stage, pooled by mean, "
                                          "spread and peak, relative to its validation median; the score is the "
                                          "geometric mean of these ratios",
                                "layers": list(meta["ood"]["layers"]),
                                "threshold": meta["ood"]["threshold"],
                                "threshold_rule": f"{args.ood_quantile:.0%} quantile of validation scores",
                                "far_threshold": meta["ood"].get("far_threshold"),
                                "far_threshold_rule": FAR_RULE},
        "confidence_threshold": meta.get("confidence_threshold") or round(0.5 + 0.5 / len(index.class_names), 4),
        "created": meta["created"],
        "code_version": meta["code_version"],
        "intended_use": "Research and education: exploring CT slice classifiers and their explanations.",
        "limitations": [
            DISCLAIMER,
            "Trained on 2-D slices from public datasets, not on whole CT studies; one slice is not a diagnosis.",
            "Validation figures come from a small split of the same sources; expect lower accuracy on other "
            "scanners, hospitals and patient groups.",
        ],
        "disclaimer": DISCLAIMER,
    }


def run(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (DatasetError, TrainingError, CheckpointError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is in last.pt; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run())
