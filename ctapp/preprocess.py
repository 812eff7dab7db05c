"""The single home of preprocessing: every path (training, evaluation,
inference, Grad-CAM) turns a decoded slice into a model input here, from the
:class:`PreprocessConfig` stored in the checkpoint.

A slice is padded to a square with black (air) so anatomy is never stretched,
resized to ``img_size``, replicated from grey to ``channels`` channels and
normalised with ``mean``/``std``.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.transforms import v2

from .imaging import ImageDecodeError, Window, decode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    img_size: int = 128
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3  # grey is replicated to this many channels
    window_center: float = -600.0  # DICOM lung window, Hounsfield units
    window_width: float = 1500.0

    def __post_init__(self):
        if self.img_size < 32:
            raise ValueError(f"img_size must be at least 32, got {self.img_size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")

    @property
    def window(self) -> Window:
        return Window(self.window_center, self.window_width)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(x) for x in values[key])
        return cls(**values)


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside the padded square, to map a
    Grad-CAM back onto the original pixels."""

    height: int
    width: int
    top: int
    left: int
    side: int


def square(pixels: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """Pad (H, W) grey pixels to a centred square with zeros, resize to size x size."""
    h, w = pixels.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if h != w:
        padded = np.zeros((side, side), dtype=np.float32)
        padded[top:top + h, left:left + w] = pixels
    else:
        padded = pixels.astype(np.float32, copy=False)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    resized = cv2.resize(padded, (size, size), interpolation=interpolation)
    return np.clip(resized, 0.0, 1.0), Geometry(h, w, top, left, side)


def normalize(batch: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """(N, 1, S, S) grey in [0, 1] -> (N, C, S, S) normalised model input."""
    mean = torch.tensor(config.mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    return (batch.expand(-1, config.channels, -1, -1) - mean) / std


def model_input(pixels: np.ndarray, config: PreprocessConfig) -> tuple[torch.Tensor, Geometry]:
    """One decoded slice -> a (1, C, S, S) tensor and its geometry."""
    resized, geometry = square(pixels, config.img_size)
    batch = torch.from_numpy(resized)[None, None]
    return normalize(batch, config), geometry


def cam_to_image(cam: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A (S, S) map over the model input -> (H, W) over the original image."""
    full = cv2.resize(cam.astype(np.float32), (geometry.side, geometry.side), interpolation=cv2.INTER_LINEAR)
    return full[geometry.top:geometry.top + geometry.height, geometry.left:geometry.left + geometry.width]


@dataclass
class LoadedSquares:
    """Many files decoded and square-resized at once (for training and evaluation)."""

    images: torch.Tensor  # (N, 1, S, S) float32 in [0, 1]; zeros where a file failed
    errors: list[str]  # per file: '' or why it could not be read
    digests: list[str]  # per file: content hash of the decoded pixels ('' on error)


def load_squares(paths: list[Path], config: PreprocessConfig, *, workers: int = 2,
                 on_progress: Callable[[int, int], None] | None = None) -> LoadedSquares:
    size = config.img_size
    images = torch.zeros(len(paths), 1, size, size)
    errors, digests = [""] * len(paths), [""] * len(paths)

    def load(i: int) -> None:
        try:
            image = decode(paths[i], window=config.window)
        except ImageDecodeError as exc:
            errors[i] = str(exc)
            return
        images[i, 0] = torch.from_numpy(square(image.pixels, size)[0])
        digests[i] = image.content_hash()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, _ in enumerate(pool.map(load, range(len(paths))), 1):
            if on_progress:
                on_progress(done, len(paths))
    return LoadedSquares(images, errors, digests)


AUGMENT_LEVELS = {
    # rotation degrees, shift fraction, zoom range, brightness/contrast, horizontal-flip probability
    "none": (0.0, 0.0, 0.0, 0.0, 0.0),
    "light": (5.0, 0.04, 0.05, 0.1, 0.5),
    "medium": (10.0, 0.08, 0.10, 0.2, 0.5),
    "strong": (15.0, 0.10, 0.15, 0.3, 0.5),
}


def train_augment(level: str) -> v2.Transform:
    """Augmentations of the reference projects (rotation, shift, zoom, flip,
    brightness, contrast) on one (1, S, S) grey tensor in [0, 1]."""
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augmentation must be one of {sorted(AUGMENT_LEVELS)}, got {level!r}")
    degrees, shift, zoom, jitter, flip = AUGMENT_LEVELS[level]
    if level == "none":
        return v2.Identity()
    return v2.Compose([
        v2.RandomHorizontalFlip(flip),
        v2.RandomAffine(degrees=degrees, translate=(shift, shift), scale=(1 - zoom, 1 + zoom),
                        interpolation=v2.InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=jitter, contrast=jitter),
        v2.Lambda(lambda x: x.clamp(0.0, 1.0)),
    ])
