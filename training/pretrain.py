"""Self-supervised pretraining of a backbone on CT slices, without ImageNet.

    python -m training.pretrain --data ../shared/data/chest-ct-scan-images/Data ../shared/data/sarscov2-ctscan \\
        ../shared/data/covid-ct-ucsd ../shared/data/mosmed --arch resnet50 --out runs/pretrain/resnet50/full
    python -m training.fit ... --weights runs/pretrain/resnet50/full/backbone.pt

BYOL (Grill et al., 2020, through ``lightly``): an online network learns to
predict, from one augmented view of a slice, a slowly moving average of itself
on another view. Labels are never read; every slice of every class and source
is used. BYOL rather than SimCLR or MoCo v2 because it needs no negative pairs:
SimCLR's contrast wants batches of thousands and MoCo's queue of 65536 keys
would hold each of our 4000 slices many times over (a slice would be its own
negative), and BYOL lost far less than SimCLR when its authors took colour
distortion away, which grey CT slices cannot use. Views differ by crop, flip,
rotation, brightness and contrast, blur, and the scanner render of
``--augment scanner`` (kernel, dose noise, slice thickness, window): what the
features should not depend on.

``--exclude-fold K --cv N`` leaves out every slice of fold K's evaluation
split, with the fold assignment ``training.fit --cv N`` makes on ``--fold-data``
(its ``--data``; same ``--seed``, ``--split-block``, ``--group-pattern``), and
any other file with the same pixels: the fold's model can then start from these
weights without its evaluation images having shaped them (``--weights
DIR/{fold}/backbone.pt`` in fit names one file per fold).

``OUT/backbone.pt`` is a torchvision state dict of the backbone (no classifier),
written when the last epoch is done; ``OUT/last.pt`` after every epoch
(``--resume``); ``OUT/history.csv``; ``OUT/pretrain.json`` (what it saw).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ctapp.checkpoint import CheckpointError, atomic_save, atomic_write_text, safe_load
from ctapp.data import GROUP_PATTERN, DatasetError
from ctapp.imaging import LUNG_WINDOW
from ctapp.models import ARCHITECTURES, WeightsError, create_model, get_spec
from ctapp.preprocess import CROP_MODES, INTENSITY_MODES, PreprocessConfig, ScannerRender
from training.cli import INTERRUPTED_TRAINING, command
from training.engine import Progress, TrainingError, backward_step, choose_precision, configure_threads, to_input
from training.packed import training_data

BACKBONE_FILE = "backbone.pt"
STATE_FILE = "last.pt"
PRETRAINABLE = sorted(name for name, spec in ARCHITECTURES.items() if spec.imagenet_weights)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Self-supervised (BYOL) pretraining of a backbone on CT slices.",
                                add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, nargs="+", metavar="DIR",
                   help="dataset roots: every slice of every class is used, labels unread (test splits never)")
    g.add_argument("--pack", default=None, metavar="FILE", help="read the slices from a packed set (training.pack)")
    g.add_argument("--exclude-fold", type=int, default=None, metavar="K",
                   help="leave out the evaluation split of fold K of training.fit --cv N on --fold-data")
    g.add_argument("--cv", type=int, default=0, metavar="N", help="the folds of the fit (with --exclude-fold)")
    g.add_argument("--fold-data", nargs="+", default=None, metavar="DIR",
                   help="the fit's --data whose folds are meant (default: --data)")
    g.add_argument("--split-block", type=int, default=0, metavar="N", help="as training.fit")
    g.add_argument("--group-pattern", default=GROUP_PATTERN, metavar="REGEX", help="as training.fit")
    g.add_argument("--keep-duplicates", action="store_true", help="as training.fit")
    g.add_argument("--crop", default="body", choices=list(CROP_MODES), help="as training.fit")
    g.add_argument("--intensity", default="equalise", choices=list(INTENSITY_MODES), help="as training.fit")
    g.add_argument("--window", type=float, nargs=2, default=(LUNG_WINDOW.center, LUNG_WINDOW.width),
                   metavar=("CENTER", "WIDTH"), help="as training.fit")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--arch", default="resnet50", choices=PRETRAINABLE, help="backbone (ctapp.models)")
    g.add_argument("--img-size", type=int, default=128, help="input side in pixels")
    g.add_argument("--epochs", type=int, default=100, help="epochs over the slices")
    g.add_argument("--batch-size", type=int, default=64, help="slices per batch (two views each)")
    g.add_argument("--lr", type=float, default=0.06, help="SGD learning rate per 256 slices a batch (scaled)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    g.add_argument("--warmup-epochs", type=int, default=5, help="linear warm-up epochs")
    g.add_argument("--momentum-start", type=float, default=0.99,
                   help="the target network's moving-average momentum, rising to 1 over the run (cosine)")
    g.add_argument("--hidden", type=int, default=4096, help="width of the projection and prediction heads")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    g.add_argument("--stop-after", type=int, default=0, metavar="N", help="stop after N epochs (resume later)")
    g.add_argument("--seed", type=int, default=0, help="random seed (and the fit's fold seed)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"], help="as training.fit")
    g.add_argument("--workers", type=int, default=2, help="decoding threads")
    g.add_argument("--loader-workers", type=int, default=0,
                   help="processes drawing the augmented views (0: in the training process; on a GPU machine "
                        "about the number of cores, as the scanner render runs on the CPU)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def view_transform(config: PreprocessConfig) -> v2.Transform:
    """One random view of a (1, S, S) grey square in [0, 1]."""
    size = config.img_size
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomRotation(15)], p=0.5),
        v2.ColorJitter(brightness=0.4, contrast=0.4),
        v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.3),
        ScannerRender(p=0.5, crop=config.crop, intensity=config.intensity),
        v2.Lambda(lambda x: x.clamp(0.0, 1.0)),
    ])


class TwoViews(Dataset):
    def __init__(self, images: torch.Tensor, transform: v2.Transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.transform(self.images[i])


class BYOL(nn.Module):
    """Online backbone, projection and prediction; a momentum copy of backbone and projection."""

    def __init__(self, arch: str, hidden: int):
        super().__init__()
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = create_model(arch, 2, weights="none")
        setattr(self.backbone, get_spec(arch).head, nn.Identity())  # pooled features out
        self.backbone.eval()
        with torch.no_grad():
            features = self.backbone(torch.zeros(2, 3, 64, 64)).shape[1]
        self.projection = BYOLProjectionHead(features, hidden, 256)
        self.prediction = BYOLPredictionHead(256, hidden, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_momentum = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction(self.projection(self.backbone(x)))

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_momentum(self.backbone_momentum(x)).detach()

    def update_target(self, momentum: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, momentum)
        update_momentum(self.projection, self.projection_momentum, momentum)

    def backbone_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
                for k, v in self.backbone.state_dict().items()}


def evaluation_digests(args: argparse.Namespace, out: Path, log) -> set[str]:
    """The pixel digests of fold ``--exclude-fold``'s evaluation images, as the fit
    would assign its folds (``OUT/folds.csv`` records them)."""
    from training.crossval import assign_folds, pooled_index

    if args.cv < 2 or not 0 <= args.exclude_fold < args.cv:
        raise DatasetError(f"--exclude-fold {args.exclude_fold} needs --cv N with N >= 2 and 0 <= K < N")
    fit_args = SimpleNamespace(data=args.fold_data or args.data, pack=args.pack, workers=args.workers,
                               keep_duplicates=args.keep_duplicates, split_block=args.split_block,
                               group_pattern=args.group_pattern, cv=args.cv, seed=args.seed, resume=args.resume)
    setup = SimpleNamespace(args=fit_args, is_main=True, log=log)
    index, _, _, digests = pooled_index(setup, log)
    folds = assign_folds(setup, index, digests, out)
    held = {digests[s.path] for s, k in zip(index.samples, folds) if k == args.exclude_fold and s.path in digests}
    log(f"exclude: fold {args.exclude_fold} of {args.cv} holds {int((folds == args.exclude_fold).sum())} "
        "evaluation images; they and their copies are left out")
    return held


def pretraining_images(args: argparse.Namespace, config: PreprocessConfig, out: Path, log) -> tuple[torch.Tensor, dict]:
    data = training_data(args)
    index = data.scan(args.data)
    samples = [s for s in index.samples if s.split != "test"]
    loaded = data.load([s.path for s in samples], config, workers=args.workers)
    held = evaluation_digests(args, out, log) if args.exclude_fold is not None else set()
    keep = [i for i, (error, digest) in enumerate(zip(loaded.errors, loaded.digests))
            if not error and digest not in held]
    seen = {"sources": sorted({s.source for s in samples}), "files": len(index.samples),
            "test_split_left_out": len(index.samples) - len(samples),
            "unreadable": sum(1 for e in loaded.errors if e),
            "evaluation_images_left_out": sum(1 for d in loaded.digests if d and d in held),
            "slices": len(keep)}
    log(f"pretraining on {len(keep)} slices of {seen['sources']} ({seen['evaluation_images_left_out']} of a fold's "
        f"evaluation split and {seen['test_split_left_out']} of test splits left out)")
    if len(keep) < 2:
        raise DatasetError(f"{args.data}: {len(keep)} usable slice(s); pretraining needs at least 2")
    return loaded.images[keep], seen


def learning_rate(args: argparse.Namespace, step: int, steps_per_epoch: int) -> float:
    peak = args.lr * args.batch_size / 256
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    total = max(args.epochs * steps_per_epoch - warmup, 1)
    return float(peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / total)))


def main(args: argparse.Namespace) -> Path:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.utils.scheduler import cosine_schedule

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    configure_threads()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    precision = choose_precision(args.amp, device)
    config = PreprocessConfig(img_size=args.img_size, crop=args.crop, intensity=args.intensity,
                              window_center=args.window[0], window_width=args.window[1])
    images, seen = pretraining_images(args, config, out, log)

    torch.manual_seed(args.seed)
    model = BYOL(args.arch, args.hidden).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if precision.autocast_dtype == torch.float16 else None
    history, start_epoch = [], 0
    if args.resume and (out / STATE_FILE).is_file():
        saved = safe_load(out / STATE_FILE)
        if saved.get("arch") != args.arch or saved.get("slices") != seen["slices"]:
            raise CheckpointError(f"{out / STATE_FILE} pretrained {saved.get('arch')} on {saved.get('slices')} "
                                  f"slices; this run is {args.arch} on {seen['slices']}: use a new --out")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history, start_epoch = saved["history"], saved["epoch"]
        log(f"resumed from {out / STATE_FILE}: {start_epoch} epoch(s) done")
    criterion = NegativeCosineSimilarity()
    dataset = TwoViews(images, view_transform(config))
    batch = min(args.batch_size, len(dataset))
    steps = len(dataset) // batch
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after and epoch - start_epoch >= args.stop_after:
            log(f"stopping after {args.stop_after} epoch(s) as asked; continue with --resume")
            return out
        torch.manual_seed(args.seed * 100_003 + epoch)  # a resumed run repeats the uninterrupted one
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=args.loader_workers,
                            generator=torch.Generator().manual_seed(args.seed * 7919 + epoch),
                            persistent_workers=False)
        bar = Progress(steps, f"pretrain epoch {epoch + 1}/{args.epochs}", enabled=not args.quiet)
        momentum = float(cosine_schedule(epoch, args.epochs, args.momentum_start, 1.0))
        model.train()
        total, started = 0.0, time.perf_counter()
        for step, (first, second) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, epoch * steps + step, steps)
            model.update_target(momentum)
            x1, x2 = to_input(first, config, precision), to_input(second, config, precision)
            with precision.autocast():
                loss = 0.5 * (criterion(model(x1).float(), model.target(x2).float())
                              + criterion(model(x2).float(), model.target(x1).float()))
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at epoch {epoch + 1}: lower --lr")
            backward_step(loss, optimizer, scaler)
            total += loss.item()
            bar.update(step + 1, loss=total / (step + 1))
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "loss": total / max(steps, 1), "momentum": momentum,
                        "slices_per_second": steps * batch / max(seconds, 1e-9), "seconds": seconds})
        log(f"pretrain epoch {epoch + 1}: loss {history[-1]['loss']:.4f} | "
            f"{history[-1]['slices_per_second']:.1f} slices/s | {precision.describe()}")
        atomic_save({"arch": args.arch, "slices": seen["slices"], "epoch": epoch + 1, "history": history,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / STATE_FILE)
        atomic_write_text("epoch,loss,momentum,slices_per_second,seconds\n" + "".join(
            f"{r['epoch']},{r['loss']:.6g},{r['momentum']:.6g},{r['slices_per_second']:.4g},{r['seconds']:.4g}\n"
            for r in history), out / "history.csv")
    atomic_save(model.backbone_weights(), out / BACKBONE_FILE)
    provenance = {"method": "BYOL (lightly)", "arch": args.arch, "epochs": args.epochs, "img_size": args.img_size,
                  "preprocess": config.to_dict(), "data": [str(d) for d in args.data], "pack": args.pack,
                  "excluded_fold": None if args.exclude_fold is None else
                  {"fold": args.exclude_fold, "cv": args.cv, "fold_data": [str(d) for d in args.fold_data or args.data],
                   "seed": args.seed, "split_block": args.split_block, "group_pattern": args.group_pattern},
                  **seen, "seconds": round(sum(r["seconds"] for r in history), 1), "device": precision.describe(),
                  "final_loss": history[-1]["loss"] if history else None}
    atomic_write_text(json.dumps(provenance, indent=2), out / "pretrain.json")
    log(f"saved {out / BACKBONE_FILE}: training.fit --arch {args.arch} --weights {out / BACKBONE_FILE}")
    return out


run = command(get_args_parser, main, (DatasetError, TrainingError, CheckpointError, WeightsError, ValueError),
              INTERRUPTED_TRAINING)


if __name__ == "__main__":
    sys.exit(run())
