"""ResNet-50 training throughput: ``training.fit``'s loop against a plain fp32
PyTorch loop, on the same images in the same run.

    .venv/bin/python benchmarks/train_throughput.py [--data DIR] [--images 96] [--batch-size 16] [--img-size 128]

The plain loop is what a first version usually looks like: an ImageFolder-style
dataset that opens and resizes each file with PIL every step, contiguous fp32
tensors. ``training.fit``'s loop decodes once into an in-memory cache,
augments the small cached squares, runs channels_last, and uses bf16 autocast
only where the CPU has native bf16 (elsewhere it is emulated and slower; the
figure for forcing it is printed too).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctapp.data import scan_dataset  # noqa: E402
from ctapp.models import create_model  # noqa: E402
from ctapp.preprocess import PreprocessConfig, load_squares  # noqa: E402
from training.engine import Precision, SliceDataset, choose_precision, cpu_has_fast_bf16, train_one_epoch  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chest-ct-scan-images" / "Data"


class PlainFolder(Dataset):
    def __init__(self, samples, size):
        self.samples = samples
        self.transform = v2.Compose([
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((size, size), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1)),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        return self.transform(Image.open(sample.path).convert("RGB")), sample.label


def plain_loop(model, loader, optimizer, criterion) -> float:
    model.train()
    seen, start = 0, time.perf_counter()
    for images, labels in loader:
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def fit_loop(model, loader, optimizer, criterion, config, precision) -> float:
    return train_one_epoch(model, loader, criterion, optimizer, config, precision)["images_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a dataset folder (class or split layout)")
    p.add_argument("--images", type=int, default=160, help="images per measured pass")
    p.add_argument("--batch-size", type=int, default=32, help="as training.fit's default")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--no-bf16", action="store_true", help="skip the forced-bf16 measurement")
    args = p.parse_args()
    torch.manual_seed(0)
    if not args.data.is_dir():
        sys.exit(f"{args.data}: no such folder (pass --data)")
    samples = scan_dataset(args.data).samples
    samples = random.Random(0).sample(samples, min(args.images, len(samples)))  # every class, not the first folder
    config = PreprocessConfig(img_size=args.img_size)
    n_classes = max(2, max(s.label for s in samples) + 1)
    criterion = nn.CrossEntropyLoss()
    print(f"ResNet-50 training, {len(samples)} images of {args.data.name}, batch {args.batch_size}, "
          f"{args.img_size} px, {torch.get_num_threads()} threads, native bf16: {cpu_has_fast_bf16()}")

    def fresh():
        model = create_model("resnet50", n_classes)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    model, optimizer = fresh()
    plain = DataLoader(PlainFolder(samples, args.img_size), batch_size=args.batch_size, shuffle=True, num_workers=0)
    plain_loop(model, [next(iter(plain))], optimizer, criterion)  # warm-up
    plain_rate = plain_loop(model, plain, optimizer, criterion)
    print(f"plain fp32 loop (PIL per step, contiguous):      {plain_rate:6.2f} images/s")

    start = time.perf_counter()
    cached = load_squares([s.path for s in samples], config).images
    cache_seconds = time.perf_counter() - start
    dataset = SliceDataset(cached, [s.label for s in samples], "medium")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
    auto = choose_precision("auto", torch.device("cpu"))
    runs = [("training.fit loop (cache, channels_last, auto)", auto)]
    if auto.autocast_dtype is None:
        if not args.no_bf16:
            runs.append(("training.fit loop with bf16 autocast forced", Precision(torch.device("cpu"), torch.bfloat16)))
    else:  # show what the mixed precision itself adds
        runs.append(("training.fit loop in fp32 (cache, channels_last)", Precision(torch.device("cpu"), None)))
    for label, precision in runs:
        model, optimizer = fresh()
        model = model.to(memory_format=torch.channels_last)
        fit_loop(model, [next(iter(loader))], optimizer, criterion, config, precision)
        rate = fit_loop(model, loader, optimizer, criterion, config, precision)
        print(f"{label:<48} {rate:6.2f} images/s  ({rate / plain_rate:.2f}x plain; {precision.describe()})")
    print(f"one-off cache fill: {cache_seconds:.1f} s for {len(samples)} images")


if __name__ == "__main__":
    main()
