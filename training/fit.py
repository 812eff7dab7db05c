"""Train a CT slice classifier and write a model folder: the command line.

    python -m training.fit --data DIR --arch resnet50 --weights none --epochs 30 --out models/NAME

The folder receives ``model.pt`` (best epoch by validation macro-F1,
temperature-calibrated, with an out-of-distribution reference),
``model_card.json``, ``eval_report.json`` (+ per-image CSV) for the validation
split, ``history.csv`` and ``audit.json``. While it trains, ``last.pt`` (every
epoch, for ``--resume``) and ``best.pt``; a finished run removes both unless
``--keep-checkpoints``. With ``--cv K``: K-fold cross-validation
(:mod:`training.crossval`); without, one train/valid split
(:mod:`training.single_split`). Multi-process:
``torchrun --nproc_per_node=N -m training.fit ...``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from ctapp.checkpoint import CheckpointError
from ctapp.data import GROUP_PATTERN, DatasetError
from ctapp.imaging import LUNG_WINDOW
from ctapp.models import ARCHITECTURES, WeightsError
from ctapp.preprocess import AUGMENT_LEVELS, CROP_MODES, INTENSITY_MODES
from training.cli import INTERRUPTED_TRAINING, HelpFormatter, command
from training.crossval import cross_validate
from training.engine import TrainingError
from training.single_split import train_single_split
from training.trainer import start


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.fit", add_help=add_help, formatter_class=HelpFormatter,
                                description="Train a CT slice classifier on a folder of class sub-folders.")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, nargs="+", metavar="DIR",
                   help="dataset root(s): train/valid[/test] folders of class folders, or class folders only; "
                        "several roots are pooled (each is a 'source' in the reports)")
    g.add_argument("--pack", default=None, metavar="FILE",
                   help="with --cv: read the slices from a packed training set (python -m training.pack); --data "
                        "then names its sources (by the end of their path) and no image file is opened")
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
    g.add_argument("--augment", default="detail", choices=list(AUGMENT_LEVELS),
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
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep last.pt (weights and optimiser state) and best.pt once model.pt is written, e.g. to "
                        "finalise again with --resume; by default a finished run removes them")
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


def main(args: argparse.Namespace) -> Path:
    if args.pack and not args.cv:
        raise DatasetError("--pack needs --cv: a single split validates its model on the image files")
    setup = start(args)
    try:
        return cross_validate(setup) if args.cv else train_single_split(setup)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


run = command(get_args_parser, main, (DatasetError, TrainingError, CheckpointError, WeightsError, ValueError),
              INTERRUPTED_TRAINING)


if __name__ == "__main__":
    sys.exit(run())
