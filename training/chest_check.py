"""Training the chest-CT check (``ctapp.chest_check``) with outlier exposure:

    .venv/bin/python -m training.chest_check --pack /work/runs/pack.npz [--out models/chest-check]

Positives: the chest CT slices of every source under ``../shared/data`` (from a
packed set, or the folders), each also rendered as the app renders a scanner's
DICOM (``ScannerRender``) and shifted as another export would (the ``scanner``
augmentation), plus axial slices of synthetic chest volumes, so that
"synthetic" is no cue. Negatives: every kind of ``training.foreign`` drawn
afresh with seeds and parameters of their own (never the foreign set's), photos
and pictures found in the environment's packages (never scikit-learn's two
sample photos, which the foreign set uses) and drawn scenes.

Figures, printed and written to the card: (1) out of fold, the share of each
source's chest CT refused, by folds that keep patients together as the models'
own runs do; the threshold is chosen on those scores with a margin; (2) the
foreign set per kind with the final check; (3) leave one kind out: for each
foreign kind, a check trained without that kind's negatives, measured on it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ctapp.chest_check import CHEST, OUT_OF_FOLD_FILE, ChestCheck, build_network, save_check
from ctapp.checkpoint import atomic_write_text
from ctapp.data import FILE_PER_PATIENT_SOURCES, cv_folds, group_ids
from ctapp.imaging import LUNG_WINDOW, decode
from ctapp.preprocess import PreprocessConfig, ScannerRender, normalize, to_square, train_augment
from training.engine import backward_step
from training.foreign import (FOREIGN_KINDS, abdomen_ct, chest_volume, dicom_file, foreign_set, head_ct, jpeg_file,
                              pelvis_ct, png_file, radiograph, reformats, screenshot, shepp_logan, text_page)
from training.packed import FolderData, PackedData

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CHEST_SOURCES = ("chest-ct-scan-images/Data", "sarscov2-ctscan", "covid-ct-ucsd", "mosmed")
# How the shipped models keep patients together (their cards' cross_validation): the lung
# source by the number before the first space, the others by blocks of 40 file numbers.
GROUPING = {"chest-ct-scan-images/Data": {"pattern": r"^(\d+)", "block_size": None}}
DEFAULT_GROUPING = {"pattern": r"^(.+?)(?:-p\d|%\d+$)", "block_size": 40}
CONFIG = PreprocessConfig(img_size=48, crop="body", intensity="equalise")
WIDTH = 8  # BaselineCNN width: about 74 k parameters, 150 kB in fp16
EPOCHS = 3
BATCH = 64
LEARNING_RATE = 3e-3
NEGATIVES_PER_KIND = 60
NEGATIVE_COPIES = 2  # augmented copies of each negative besides itself
SCANNER_SHARE = 0.5  # of the positives, also rendered as a scanner's DICOM slice
SEED = 100  # the foreign set is drawn with seed 0 (and volumes 0, 1): every seed here is 100 or more
# The threshold is the lowest out-of-fold chest CT score divided by this (odds): a margin
# against chest slices less typical than any of the training sources'.
MARGIN_ODDS = 4.0


# --------------------------------------------------------------------------- negatives, kind by kind


def _size(rng: np.random.Generator) -> int:
    return int(rng.choice([160, 224, 256, 320]))


def _blank(rng, size):
    level = rng.uniform(0, 255)
    return png_file(np.clip(level + rng.normal(0, rng.uniform(0, 4), (size, size)), 0, 255).astype(np.uint8))


def _noise(rng, size):
    kind = rng.integers(4)
    if kind == 0:
        image = rng.integers(0, 256, (size, size))
    elif kind == 1:
        image = rng.normal(rng.uniform(60, 190), rng.uniform(10, 70), (size, size))
    elif kind == 2:
        image = (rng.random((size, size)) < rng.uniform(0.1, 0.9)) * 255.0
    else:
        blurred = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), rng.uniform(2, 12))
        image = (blurred - blurred.min()) / max(np.ptp(blurred), 1e-6) * 255
    return png_file(np.clip(image, 0, 255).astype(np.uint8))


def _pattern(rng, size):
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, np.pi)
    u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    kind, cells = rng.integers(5), rng.uniform(2, 40)
    if kind == 0:
        image = ((np.floor(u * cells) + np.floor(v * cells)) % 2) * 255
    elif kind == 1:
        image = (u - u.min()) / np.ptp(u) * 255
    elif kind == 2:
        image = np.clip(1 - np.hypot(x - rng.uniform(0.2, 0.8), y - rng.uniform(0.2, 0.8)) / 1.2, 0, 1) * 255
    elif kind == 3:
        image = (np.sin(u * cells * np.pi) > 0) * 255.0
    else:
        image = (np.sin(np.hypot(x - 0.5, y - 0.5) * cells * np.pi) * 0.5 + 0.5) * 255
    return png_file(image.astype(np.uint8))


def picture_files() -> list[Path]:
    """Photographs and pictures shipped with installed packages: matplotlib's
    sample data (a portrait, a photographed pack, a logo) and networkx's drawing
    baselines. Never scikit-learn's sample photos: the foreign set is made of them."""
    import matplotlib
    import networkx

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    found = [sample / "grace_hopper.jpg", sample / "Minduka_Present_Blue_Pack.png", sample / "logo2.png"]
    found += sorted((Path(networkx.__file__).parent / "drawing" / "tests" / "baseline").glob("*.png"))
    return [p for p in found if p.is_file() and "sklearn" not in p.parts]


def _terrain(rng, size):
    """matplotlib's elevation samples in a colour map: a landscape seen from above."""
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    name = str(rng.choice(["topobathy.npz", "jacksboro_fault_dem.npz"]))
    with np.load(sample / name) as f:
        heights = f[f.files[0]].astype(np.float32)
    heights = (heights - heights.min()) / max(np.ptp(heights), 1e-6)
    colours = matplotlib.colormaps[str(rng.choice(["terrain", "gist_earth", "viridis", "gray"]))](heights)
    return (colours[..., :3] * 255).astype(np.uint8)


def _scene(rng, size):
    """A drawn scene: sky or a wall, ground, and shapes of random colours."""
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    horizon = rng.uniform(0.4, 0.8) * size
    draw.rectangle([0, horizon, size, size], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    for _ in range(rng.integers(2, 9)):
        box = sorted(rng.uniform(0, size, 2)), sorted(rng.uniform(0, size, 2))
        shape = [box[0][0], box[1][0], box[0][1] + 4, box[1][1] + 4]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(shape, fill=fill)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2))))


def _photo(rng, size):
    choice = rng.random()
    if choice < 0.5:
        files = picture_files()
        image = np.asarray(Image.open(files[rng.integers(len(files))]).convert("RGB"))
    elif choice < 0.7:
        image = _terrain(rng, size)
    else:
        image = _scene(rng, size)
    h, w = image.shape[:2]
    crop_h, crop_w = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
    top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
    picture = Image.fromarray(np.ascontiguousarray(image[top:top + crop_h, left:left + crop_w])).resize((size, size))
    if rng.random() < 0.3:
        picture = picture.convert("L")
    return jpeg_file(np.asarray(picture)) if rng.random() < 0.5 else png_file(np.asarray(picture))


def _document(rng, size):
    page = Image.fromarray(text_page(size, rng, int(rng.integers(8, 30)), dark=rng.random() < 0.2,
                                      colour=rng.random() < 0.3))
    if rng.random() < 0.7:
        page = page.convert("L")
    if rng.random() < 0.4:
        page = page.rotate(rng.uniform(-6, 6), fillcolor=230 if page.mode == "L" else (230, 230, 230))
        noisy = np.asarray(page, np.float64) + rng.normal(0, rng.uniform(3, 15), np.asarray(page).shape)
        return jpeg_file(np.clip(noisy, 0, 255).astype(np.uint8))
    return png_file(np.asarray(page))


def _screen(rng, size):
    return png_file(screenshot(size, rng, bool(rng.random() < 0.5), bool(rng.random() < 0.5)))


def _volume(rng) -> np.ndarray:
    return chest_volume(64, int(rng.integers(SEED, 10 * SEED)), lung_width=rng.uniform(0.22, 0.36))


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image.astype(np.float32)).resize((size, size), Image.BILINEAR))


def _radiograph(rng, size):
    if rng.random() < 0.2:  # drawn: dark lung fields in a bright thorax, ribs
        y, x = np.mgrid[0:size, 0:size] / size
        spread, height = rng.uniform(0.1, 0.16), rng.uniform(0.22, 0.32)
        lungs = sum(np.exp(-(((x - c) / spread) ** 2 + ((y - 0.5) / height) ** 2)) for c in (0.32, 0.68))
        xray = rng.uniform(0.7, 0.95) - 0.6 * lungs + 0.08 * np.sin(y * rng.uniform(40, 80)) * (lungs > 0.2)
        return png_file((np.clip(xray + rng.normal(0, 0.02, xray.shape), 0, 1) * 255).astype(np.uint8))
    projection = _resized(radiograph(_volume(rng), int(rng.choice([1, 2]))), size)
    if rng.random() < 0.5:
        return dicom_file(projection, modality="DX")
    return png_file((projection / projection.max() * 255).astype(np.uint8))


def _mri_head(rng, size):
    """matplotlib's sample MRI slice of a head, turned and cropped."""
    import matplotlib

    raw = gzip.open(Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz").read()
    image = np.frombuffer(raw, np.uint16).reshape(256, 256).astype(np.float32)
    image = np.rot90(image, int(rng.integers(4)))
    return png_file((_resized(image / image.max(), size) * 255).clip(0, 255).astype(np.uint8))


def _head(rng, size):
    if rng.random() < 0.15:
        return _mri_head(rng, size)
    return dicom_file(head_ct(size, rng, rng.uniform(0.7, 1.15), bool(rng.random() < 0.7)))


def _abdomen(rng, size):
    return dicom_file(abdomen_ct(size, rng, rng.uniform(0.7, 0.95), int(rng.integers(0, 9))))


def _pelvis(rng, size):
    return dicom_file(pelvis_ct(size, rng, rng.uniform(0.75, 0.97), rng.uniform(0.04, 0.28)))


def _reformat(plane: str):
    def make(rng, size):
        image = reformats(_volume(rng), plane, [rng.uniform(0.3, 0.75)])[0]
        return dicom_file(_resized(image, size))
    return make


def _phantom(rng, size):
    y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    kind = rng.integers(3)
    if kind == 0:
        image = shepp_logan(size, rng.uniform(-30, 30))
        if rng.random() < 0.5:
            return png_file((image * 255).astype(np.uint8))
        return dicom_file(np.where(image > 0, 30 + (image - 0.2) * rng.uniform(800, 1600), -1000))
    radius = rng.uniform(0.5, 0.9)
    hu = np.where(np.hypot(x / rng.uniform(0.8, 1.0), y) < radius, rng.uniform(-20, 20), -1000.0)
    if kind == 2:
        for k in range(int(rng.integers(4, 9))):
            angle = 2 * np.pi * k / 8 + rng.uniform(0, 0.3)
            hu[np.hypot(x - radius * 0.6 * np.cos(angle), y - radius * 0.6 * np.sin(angle)) < 0.1 * radius] = \
                rng.uniform(-1000, 1000)
    return dicom_file(cv2.GaussianBlur(hu.astype(np.float32), (0, 0), 0.8) + rng.normal(0, 10, hu.shape))


NEGATIVES: dict[str, Callable[[np.random.Generator, int], bytes]] = {
    "blank": _blank, "noise": _noise, "pattern": _pattern, "photo": _photo, "document": _document,
    "screenshot": _screen, "radiograph": _radiograph, "head_ct": _head, "abdomen_ct": _abdomen,
    "pelvis_ct": _pelvis, "coronal_reformat": _reformat("coronal"), "sagittal_reformat": _reformat("sagittal"),
    "phantom": _phantom,
}
assert tuple(NEGATIVES) == FOREIGN_KINDS


def negative_files(per_kind: int, seed: int, kinds: tuple[str, ...] = FOREIGN_KINDS) -> dict[str, list[bytes]]:
    """``per_kind`` generated files of each foreign kind of ``kinds``, as the app would be sent them."""
    files = {}
    for k, (kind, make) in enumerate(NEGATIVES.items()):
        if kind not in kinds:
            continue
        rng = np.random.default_rng([seed, k])
        files[kind] = [make(rng, _size(rng)) for _ in range(per_kind)]
    return files


def synthetic_chest_files(count: int, seed: int) -> list[bytes]:
    """Axial slices through the lungs of synthetic chest volumes, as DICOM."""
    rng = np.random.default_rng(seed)
    files = []
    while len(files) < count:
        volume = chest_volume(96, int(rng.integers(SEED, 10 * SEED)), lung_width=rng.uniform(0.24, 0.34))
        for z in rng.integers(int(0.25 * len(volume)), int(0.75 * len(volume)), 6):
            files.append(dicom_file(_resized(volume[z], _size(rng))))
    return files[:count]


def squares_of(files: list[bytes]) -> torch.Tensor:
    """Files decoded as the app decodes them (lung window) -> the check's (N, 1, S, S) squares."""
    squares = torch.zeros(len(files), 1, CONFIG.img_size, CONFIG.img_size)
    for i, data in enumerate(files):
        squares[i, 0] = torch.from_numpy(to_square(decode(data, window=LUNG_WINDOW).pixels, CONFIG)[0])
    return squares


# --------------------------------------------------------------------------- chest CT of the sources


@dataclass
class ChestSlices:
    squares: torch.Tensor  # (N, 1, S, S)
    images: list[str]  # path under the data root, as eval reports name them
    sources: np.ndarray  # source name per slice
    folds: np.ndarray


def chest_slices(pack: Path | None, data: Path, folds: int, seed: int) -> ChestSlices:
    """Every readable chest CT slice of :data:`CHEST_SOURCES` (outside a test
    split) and its fold: stratified by source and class, patients kept whole
    (:data:`GROUPING`, identical images together)."""
    reader = PackedData(pack) if pack else FolderData()
    roots = [data / source for source in CHEST_SOURCES if pack or (data / source).is_dir()]
    index = reader.scan(roots)
    samples = [s for s in index.samples if s.split != "test"]
    loaded = reader.load([s.path for s in samples], CONFIG)
    keep = [i for i, error in enumerate(loaded.errors) if not error]
    samples = [samples[i] for i in keep]
    groups = np.zeros(len(samples), int)
    for source in sorted({s.source for s in samples}):
        members = [i for i, s in enumerate(samples) if s.source == source]
        full = next((name for name in CHEST_SOURCES if name.endswith(source)), source)
        ids = group_ids([samples[i] for i in members], digests=[loaded.digests[keep[i]] for i in members],
                        file_per_patient=FILE_PER_PATIENT_SOURCES, **GROUPING.get(full, DEFAULT_GROUPING))
        groups[members] = ids + groups.max() + 1
    fold_of = cv_folds(samples, groups, folds, seed, index.class_names)
    images = [str(s.path.relative_to(data)) if s.path.is_relative_to(data) else str(s.path) for s in samples]
    return ChestSlices(loaded.images[keep], images, np.array([s.source for s in samples]), fold_of)


# --------------------------------------------------------------------------- augmentation and training


def augmented(squares: torch.Tensor, copies: int, seed: int, render_share: float = 0.0) -> torch.Tensor:
    """``copies`` shifted copies of every square (the ``scanner`` augmentation,
    which renders some as a scanner's DICOM slice by chance); in the first copy a
    fixed, evenly spread ``render_share`` of the squares is rendered so for certain."""
    torch.manual_seed(seed)
    shift, render = train_augment("scanner", CONFIG), ScannerRender(p=1.0, crop=CONFIG.crop,
                                                                     intensity=CONFIG.intensity)
    out = []
    for copy in range(copies):
        for i, square in enumerate(squares):
            rendered = copy == 0 and (i * 7919 % 1000) / 1000 < render_share
            out.append(shift(render(square) if rendered else square))
    return torch.stack(out) if out else squares[:0]


@dataclass
class TrainingSet:
    positives: torch.Tensor
    negatives: dict[str, torch.Tensor]  # by foreign kind

    def without(self, kind: str) -> "TrainingSet":
        return TrainingSet(self.positives, {k: v for k, v in self.negatives.items() if k != kind})


def train_check(data: TrainingSet, seed: int, epochs: int = EPOCHS) -> torch.nn.Module:
    """A check trained on ``data``: positives and negatives weigh alike, and so
    does each kind of negative."""
    torch.manual_seed(seed)
    kinds = list(data.negatives)
    images = torch.cat([data.positives, *data.negatives.values()])
    labels = torch.cat([torch.full((len(data.positives),), CHEST),
                        torch.full((len(images) - len(data.positives),), 1 - CHEST)])
    weights = torch.cat([torch.full((len(data.positives),), 0.5 / len(data.positives))] +
                        [torch.full((len(data.negatives[k]),), 0.5 / len(kinds) / len(data.negatives[k]))
                         for k in kinds]) * len(images)
    network = build_network(WIDTH)
    optimizer = torch.optim.AdamW(network.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    steps = epochs * math.ceil(len(images) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps)
    network.train()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), BATCH):
            batch = order[start:start + BATCH]
            x = normalize(images[batch], CONFIG)
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            loss = (torch.nn.functional.cross_entropy(network(x), labels[batch], reduction="none")
                    * weights[batch]).mean()
            backward_step(loss, optimizer)
            schedule.step()
    return network.eval()


def scores(network: torch.nn.Module, squares: torch.Tensor) -> np.ndarray:
    """P(axial chest CT) of squares, in batches."""
    check = ChestCheck(network, CONFIG, 0.5)
    return np.concatenate([check.chest_probability(squares[i:i + 512]) for i in range(0, len(squares), 512)]) \
        if len(squares) else np.zeros(0)


def choose_threshold(oof_scores: np.ndarray) -> float:
    """:data:`MARGIN_ODDS` below the lowest out-of-fold chest CT score, in odds."""
    lowest = float(np.clip(oof_scores.min(), 1e-6, 1 - 1e-6))
    odds = lowest / (1 - lowest) / MARGIN_ODDS
    return odds / (1 + odds)


# --------------------------------------------------------------------------- the run


def foreign_pixels() -> dict[str, list[np.ndarray]]:
    """The foreign set (``training.foreign.foreign_set(seed=0)``) decoded as the app decodes it, by kind."""
    decoded: dict[str, list[np.ndarray]] = {kind: [] for kind in FOREIGN_KINDS}
    for image in foreign_set():
        decoded[image.kind].append(decode(image.data, window=LUNG_WINDOW).pixels)
    return decoded


def foreign_verdicts(check: ChestCheck, pixels_of: dict[str, list[np.ndarray]]) -> dict[str, dict]:
    """Per kind of foreign image: the share the check refuses, and the share
    refused before any network (no body found, or the check)."""
    out = {}
    for kind, pixels in pixels_of.items():
        verdicts = [to_square(image, check.config, check)[1] for image in pixels]
        out[kind] = {"images": len(verdicts),
                     "refused_by_check": sum(bool(g.refusal) for g in verdicts) / len(verdicts),
                     "not_chest_ct": sum(not g.body_found for g in verdicts) / len(verdicts)}
    return out


def per_source(oof: np.ndarray, sources: np.ndarray, threshold: float, rendered: np.ndarray | None) -> dict:
    rows = {}
    for source in sorted(set(sources)):
        mine = sources == source
        rows[source] = {"slices": int(mine.sum()), "refused": float((oof[mine] < threshold).mean()),
                        "lowest_score": float(oof[mine].min())}
        if rendered is not None:
            rows[source]["refused_as_scanner_dicom"] = float((rendered[mine] < threshold).mean())
    return rows


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log = print
    chest = chest_slices(args.pack, args.data, args.folds, args.seed)
    log(f"chest CT: {len(chest.images)} slices of {sorted(set(chest.sources))}, {args.folds} folds")
    synthetic = squares_of(synthetic_chest_files(args.synthetic, args.seed))
    negatives = {kind: squares_of(files) for kind, files in negative_files(args.per_kind, args.seed).items()}
    negatives = {kind: torch.cat([plain, augmented(plain, NEGATIVE_COPIES, args.seed + k)])
                 for k, (kind, plain) in enumerate(negatives.items())}

    # Shifted once for every run: a fold's positives are the plain and shifted copies of its slices.
    shifted = augmented(chest.squares, 1, args.seed, SCANNER_SHARE)
    synthetic = torch.cat([synthetic, augmented(synthetic, 1, args.seed)])

    def positives(mask: np.ndarray) -> torch.Tensor:
        return torch.cat([chest.squares[mask], shifted[mask], synthetic])

    torch.manual_seed(args.seed + 1)
    render = ScannerRender(p=1.0, crop=CONFIG.crop, intensity=CONFIG.intensity)
    as_scanner_dicom = torch.stack([render(square) for square in chest.squares])
    log(f"data ready in {time.perf_counter() - started:.0f} s: {sum(len(v) for v in negatives.values())} negatives")

    oof, rendered = np.zeros(len(chest.images)), np.zeros(len(chest.images))
    for k in range(args.folds):
        held = chest.folds == k
        network = train_check(TrainingSet(positives(~held), negatives), args.seed + k, args.epochs)
        oof[held], rendered[held] = scores(network, chest.squares[held]), scores(network, as_scanner_dicom[held])
        log(f"fold {k}: lowest held-out chest CT score {oof[held].min():.4f} "
            f"({time.perf_counter() - started:.0f} s)")
    threshold = choose_threshold(oof)
    foreign = foreign_pixels()
    network = train_check(TrainingSet(positives(np.ones(len(oof), bool)), negatives), args.seed,
                          args.epochs)
    final = ChestCheck(network, CONFIG, threshold)
    figures = {"out_of_fold": per_source(oof, chest.sources, threshold, rendered),
               "foreign_set": foreign_verdicts(final, foreign)}
    log(f"threshold {threshold:.4f}; final check trained ({time.perf_counter() - started:.0f} s)")
    leave_one_out = {}
    if not args.skip_leave_one_out:
        full = TrainingSet(positives(np.ones(len(oof), bool)), negatives)
        for kind in FOREIGN_KINDS:
            held_out = ChestCheck(train_check(full.without(kind), args.seed, args.epochs), CONFIG, threshold)
            leave_one_out[kind] = foreign_verdicts(held_out, {kind: foreign[kind]})[kind]
            log(f"without {kind}: {leave_one_out[kind]['refused_by_check']:.0%} of its foreign images refused")
    figures["leave_one_kind_out"] = leave_one_out
    card = {"task": "is this an axial chest CT slice? (refused: 'not a chest CT' for every model)",
            "recipe": recipe(args), "figures": figures, "seconds": round(time.perf_counter() - started)}
    args.out.mkdir(parents=True, exist_ok=True)
    save_check(args.out, network, WIDTH, CONFIG, threshold, card)
    lines = ["image,source,fold,score,score_as_scanner_dicom"] + [
        f"\"{image}\",{source},{fold},{score:.5f},{as_dicom:.5f}"
        for image, source, fold, score, as_dicom in zip(chest.images, chest.sources, chest.folds, oof, rendered)]
    atomic_write_text("\n".join(lines) + "\n", args.out / OUT_OF_FOLD_FILE)
    print(summary(card))
    return card


def recipe(args: argparse.Namespace) -> dict:
    return {"network": f"BaselineCNN width {WIDTH}", "input": f"{CONFIG.img_size} px, body crop, equalised",
            "epochs": args.epochs, "batch": BATCH, "learning_rate": LEARNING_RATE, "optimiser": "AdamW, one cycle",
            "positives": f"chest CT of {', '.join(CHEST_SOURCES)}, each plain and shifted (scanner augmentation, "
                         f"{SCANNER_SHARE:.0%} rendered as a scanner's DICOM), {args.synthetic} synthetic axial slices",
            "negatives": f"{args.per_kind} generated images of each foreign kind (seeds from {args.seed}), "
                         f"each plain and {NEGATIVE_COPIES} shifted copies; positives and negatives weigh alike",
            "folds": f"{args.folds}, stratified by source and class, patients kept whole",
            "threshold": f"the lowest out-of-fold chest CT score over {MARGIN_ODDS:g} in odds", "seed": args.seed,
            "pack": str(args.pack) if args.pack else None}


def summary(card: dict) -> str:
    f = card["figures"]
    lines = ["| out of fold | slices | refused | refused as scanner DICOM | lowest score |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for source, row in f["out_of_fold"].items():
        lines.append(f"| {source} | {row['slices']} | {row['refused']:.1%} | "
                     f"{row.get('refused_as_scanner_dicom', float('nan')):.1%} | {row['lowest_score']:.4f} |")
    lines += ["", "| foreign kind | images | refused by the check | not a chest CT | not a chest CT, kind left out |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for kind, row in f["foreign_set"].items():
        held = f["leave_one_kind_out"].get(kind)
        lines.append(f"| {kind} | {row['images']} | {row['refused_by_check']:.0%} | {row['not_chest_ct']:.0%} | "
                     f"{'-' if held is None else format(held['not_chest_ct'], '.0%')} |")
    total = sum(r["images"] for r in f["foreign_set"].values())
    refused = sum(r["not_chest_ct"] * r["images"] for r in f["foreign_set"].values())
    lines.append(f"| all | {total} | | {refused / total:.0%} | |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pack", type=Path, default=None, help="a packed training set (training.pack); else the folders")
    p.add_argument("--data", type=Path, default=DATA, help="the data root holding the chest CT sources")
    p.add_argument("--out", type=Path, default=ROOT / "models" / "chest-check", help="where the check is written")
    p.add_argument("--folds", type=int, default=5, help="folds for the out-of-fold figures and the threshold")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of every training run")
    p.add_argument("--per-kind", type=int, default=NEGATIVES_PER_KIND, help="generated negatives of each kind")
    p.add_argument("--synthetic", type=int, default=96, help="synthetic axial chest slices among the positives")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the generated images, folds and training")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--skip-leave-one-out", action="store_true", help="no leave-one-kind-out runs (quick tries)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
