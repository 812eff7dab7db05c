"""The single home of preprocessing: every path (training, evaluation,
inference, Grad-CAM) turns a decoded slice into a model input here, from the
:class:`PreprocessConfig` stored in the checkpoint.

A slice is optionally cropped to the body (``crop="body"``: the black frame,
text, rulers and arrows outside the patient are removed, so that the model sees
anatomy rather than the export style), optionally standardised in intensity
(``intensity="percentile"`` stretches percentiles, ``"equalise"`` equalises
the histogram), padded to a square with black (air) so anatomy is
never stretched, resized to ``img_size``, replicated from grey to ``channels``
channels and normalised with ``mean``/``std``.
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
CROP_MODES = ("none", "body")
INTENSITY_MODES = ("none", "percentile", "equalise")


@dataclass(frozen=True)
class PreprocessConfig:
    img_size: int = 128
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3  # grey is replicated to this many channels
    window_center: float = -600.0  # DICOM lung window, Hounsfield units
    window_width: float = 1500.0
    # Checkpoints written before these fields existed load with "none": their
    # models keep seeing exactly what they were trained on.
    crop: str = "none"
    intensity: str = "none"

    def __post_init__(self):
        if self.img_size < 32:
            raise ValueError(f"img_size must be at least 32, got {self.img_size}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
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


Box = tuple[int, int, int, int]  # (top, left, bottom, right), as body_box finds it
# Why a slice with a body (the pixels and the box body_box found in them) is still
# not a chest CT, or '' where it passes: the app's ctapp.chest_check.ChestCheck.
InputCheck = Callable[[np.ndarray, Box], str]


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the original image, to map a
    Grad-CAM back onto the original pixels: the crop box ``(top, left, bottom,
    right)`` in the original, and where that crop sits inside the padded square
    of side ``side`` (offsets ``pad_top``, ``pad_left``) that was resized to the
    model's input."""

    height: int
    width: int
    box: Box
    pad_top: int
    pad_left: int
    side: int
    body_found: bool = True  # a body was found and no input check refused the slice
    refusal: str = ""  # why an input check (ctapp.chest_check) refused it: '' where none did


# A body smaller than this share of the slice is not trusted: the slice is left uncropped.
MIN_BODY_FRACTION = 0.05
BODY_MARGIN = 0.02  # of the longer crop side, so the skin line is never cut
BODY_PART_FRACTION = 0.25  # of the largest tissue component: big enough to be part of the body


def _inside_frame(grey: np.ndarray, level: float) -> Box:
    """``(top, left, bottom, right)`` inside a flat band brighter than ``level``
    pasted around the slice (the white or grey margin of a figure or an export),
    peeled one edge row or column at a time; the whole slice when there is none.
    Dark margins are left alone: they are background to the threshold anyway."""
    h, w = grey.shape

    def frame_line(line: np.ndarray) -> bool:
        value = float(np.median(line))
        return value > level and float(np.mean(np.abs(line.astype(np.int16) - value) <= 12)) >= 0.98

    top, left, bottom, right = 0, 0, h, w
    peeled = True
    while peeled:
        peeled = False
        if bottom - top > h // 4 and frame_line(grey[top, left:right]):
            top, peeled = top + 1, True
        if bottom - top > h // 4 and frame_line(grey[bottom - 1, left:right]):
            bottom, peeled = bottom - 1, True
        if right - left > w // 4 and frame_line(grey[top:bottom, left]):
            left, peeled = left + 1, True
        if right - left > w // 4 and frame_line(grey[top:bottom, right - 1]):
            right, peeled = right - 1, True
    return top, left, bottom, right


def body_box(pixels: np.ndarray) -> Box | None:
    """Bounding box ``(top, left, bottom, right)`` of the patient's body in a grey
    slice in [0, 1], or None when no body-sized region is found.

    Classical and deterministic: a flat bright frame around the slice is peeled
    off first; then an Otsu threshold separates air (outside the body and in the
    lungs) from tissue, a morphological opening cuts thin links to rulers, text
    and table edges, and the connected components of tissue are found. The body
    is the largest with every component at least a quarter of its size (a body
    cut in two by a stitching line, arms beside the chest). Everything outside
    its box (frame, labels, arrows beside the patient) is dropped by the crop;
    the lungs, enclosed by the body wall, stay within it. A slice cut off by its
    frame keeps its extent, as the body then reaches the edges.
    """
    grey = np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    if int(grey.max()) - int(grey.min()) < 8:
        return None
    otsu, _ = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    top, left, bottom, right = _inside_frame(grey, otsu)
    if (top, left, bottom, right) != (0, 0, *grey.shape):
        grey = grey[top:bottom, left:right]
        if int(grey.max()) - int(grey.min()) < 8:
            return None
        otsu, _ = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    h, w = grey.shape
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(3, round(min(h, w) / 64)) | 1,) * 2)
    # Where bone or contrast is bright enough to draw Otsu's cut above soft
    # tissue, half of it still separates the body from air.
    for level in (otsu, otsu / 2):
        mask = cv2.morphologyEx((grey > level).astype(np.uint8), cv2.MORPH_OPEN, kernel)
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if count < 2:
            continue
        areas = stats[1:, cv2.CC_STAT_AREA]
        if areas.max() < MIN_BODY_FRACTION * h * w:
            continue
        parts = stats[1:][areas >= BODY_PART_FRACTION * areas.max()]
        x, y = int(parts[:, cv2.CC_STAT_LEFT].min()), int(parts[:, cv2.CC_STAT_TOP].min())
        x_end = int((parts[:, cv2.CC_STAT_LEFT] + parts[:, cv2.CC_STAT_WIDTH]).max())
        y_end = int((parts[:, cv2.CC_STAT_TOP] + parts[:, cv2.CC_STAT_HEIGHT]).max())
        margin = round(BODY_MARGIN * max(x_end - x, y_end - y))
        return (top + max(0, y - margin), left + max(0, x - margin),
                top + min(h, y_end + margin), left + min(w, x_end + margin))
    return None


def standardise_intensity(pixels: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Stretch the ``low``..``high`` percentiles of the slice to 0..1: exports with
    another window, gamma or contrast come out alike. Flat images are left as they are."""
    lo, hi = np.percentile(pixels, (low, high))
    if hi - lo < 1e-3:
        return pixels
    return np.clip((pixels - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def equalise_intensity(pixels: np.ndarray) -> np.ndarray:
    """Histogram equalisation: each pixel becomes its rank among the slice's grey
    levels, so any monotonic change of the export (window, gamma, contrast,
    brightness) gives the same image, up to levels that clipping merged.
    Flat images are left as they are."""
    grey = np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    if int(grey.max()) - int(grey.min()) < 8:
        return pixels
    return cv2.equalizeHist(grey).astype(np.float32) / 255


def square(pixels: np.ndarray, size: int) -> tuple[np.ndarray, int, int, int]:
    """Pad (H, W) grey pixels to a centred square with zeros, resize to size x size.
    Returns the square and the padding ``(top, left)`` and side before resizing."""
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
    return np.clip(resized, 0.0, 1.0), top, left, side


def to_square(pixels: np.ndarray, config: PreprocessConfig,
              input_check: InputCheck | None = None) -> tuple[np.ndarray, Geometry]:
    """One decoded grey slice -> the (S, S) square the model sees, and its geometry.
    The single function behind training, evaluation, inference and Grad-CAM.
    ``input_check`` is asked about a slice with a body, and given its box."""
    # The body is looked for whether or not the model crops: a slice without one
    # (blank, noise) is not a chest CT for any model.
    found_box = body_box(pixels)
    refusal = input_check(pixels, found_box) if input_check is not None and found_box is not None else ""
    return square_found(pixels, config, found_box, refusal)


def square_found(pixels: np.ndarray, config: PreprocessConfig, found_box: Box | None,
                 refusal: str = "") -> tuple[np.ndarray, Geometry]:
    """:func:`to_square` of a slice whose :func:`body_box` is already known
    (``found_box``, None where it found no body), and an input check's ``refusal``."""
    h, w = pixels.shape
    box = found_box if found_box is not None and config.crop == "body" else (0, 0, h, w)
    region = pixels[box[0]:box[2], box[1]:box[3]]
    if config.intensity == "percentile":
        region = standardise_intensity(region)
    elif config.intensity == "equalise":
        region = equalise_intensity(region)
    resized, top, left, side = square(region, config.img_size)
    return resized, Geometry(h, w, box, top, left, side, found_box is not None and not refusal, refusal)


def asked_once(input_check: InputCheck | None) -> InputCheck | None:
    """``input_check`` answering each pixel array once, for squaring one batch of
    slices several ways (an ensemble's members): keyed by the array's id, so the
    caller keeps the arrays alive while it uses the answers."""
    if input_check is None:
        return None
    answers: dict[int, str] = {}

    def ask(pixels: np.ndarray, body: Box) -> str:
        if id(pixels) not in answers:
            answers[id(pixels)] = input_check(pixels, body)
        return answers[id(pixels)]

    return ask


def normalize(batch: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """(N, 1, S, S) grey in [0, 1] -> (N, C, S, S) normalised model input."""
    mean = torch.tensor(config.mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    return (batch.expand(-1, config.channels, -1, -1) - mean) / std


def model_input(pixels: np.ndarray, config: PreprocessConfig,
                input_check: InputCheck | None = None) -> tuple[torch.Tensor, Geometry]:
    """One decoded slice -> a (1, C, S, S) tensor and its geometry."""
    resized, geometry = to_square(pixels, config, input_check)
    batch = torch.from_numpy(resized)[None, None]
    return normalize(batch, config), geometry


# Outside the crop box the model saw nothing: there the map fades from its value at
# the box's edge to zero over this share of the padded square's side, instead of
# ending in a hard rectangle at the crop's edge.
CAM_FADE = 0.08


def cam_to_image(cam: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A (S, S) map over the model input -> (H, W) over the original image: the
    map itself inside the crop box, fading to zero outside it (:data:`CAM_FADE`).

    One affine warp samples the map straight at the original's pixels: nothing
    the size of the padded square (``side`` x ``side``) is ever allocated,
    however elongated the original.
    """
    top, left, bottom, right = geometry.box
    scale = cam.shape[0] / geometry.side
    # Original pixel (x, y) sits at (x - left + pad_left, y - top + pad_top) in the
    # padded square; pixel centres map as cv2.resize maps them.
    to_cam = np.array([[scale, 0.0, (geometry.pad_left - left + 0.5) * scale - 0.5],
                       [0.0, scale, (geometry.pad_top - top + 0.5) * scale - 0.5]])
    full = cv2.warpAffine(cam.astype(np.float32), to_cam, (geometry.width, geometry.height),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    if geometry.box == (0, 0, geometry.height, geometry.width):
        return full
    rows, cols = np.arange(geometry.height, dtype=np.float32), np.arange(geometry.width, dtype=np.float32)
    below = np.maximum(np.maximum(top - rows, rows - (bottom - 1)), 0)[:, None]
    beside = np.maximum(np.maximum(left - cols, cols - (right - 1)), 0)[None, :]
    fade = max(CAM_FADE * geometry.side, 1.0)
    return full * np.clip(1.0 - np.hypot(below, beside) / fade, 0.0, 1.0)


@dataclass
class LoadedSquares:
    """Many files decoded and square-resized at once (for training and evaluation)."""

    images: torch.Tensor  # (N, 1, S, S) float32 in [0, 1]; zeros where a file failed
    errors: list[str]  # per file: '' or why it could not be read
    digests: list[str]  # per file: content hash of the decoded pixels ('' on error)
    geometries: list[Geometry | None]  # per file: where the square came from (None on error)


def load_squares(paths: list[Path], config: PreprocessConfig, *, workers: int = 2,
                 on_progress: Callable[[int, int], None] | None = None,
                 input_check: InputCheck | None = None) -> LoadedSquares:
    size = config.img_size
    images = torch.zeros(len(paths), 1, size, size)
    boxes = [None] * len(paths)
    errors, digests = [""] * len(paths), [""] * len(paths)

    def load(i: int) -> None:
        try:
            image = decode(paths[i], window=config.window)
        except ImageDecodeError as exc:
            errors[i] = str(exc)
            return
        resized, geometry = to_square(image.pixels, config, input_check)
        images[i, 0] = torch.from_numpy(resized)
        boxes[i] = geometry
        digests[i] = image.content_hash()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, _ in enumerate(pool.map(load, range(len(paths))), 1):
            if on_progress:
                on_progress(done, len(paths))
    return LoadedSquares(images, errors, digests, boxes)


AUGMENT_LEVELS = {
    # rotation degrees, shift fraction, zoom range (low, high), brightness/contrast, horizontal-flip
    # probability, and the acquisition shifts added (AcquisitionShift kinds, probability of each)
    "none": (0.0, 0.0, (1.0, 1.0), 0.0, 0.0, ((), 0.0)),
    "light": (5.0, 0.04, (0.95, 1.05), 0.1, 0.5, ((), 0.0)),
    "medium": (10.0, 0.08, (0.90, 1.10), 0.2, 0.5, ((), 0.0)),
    "strong": (15.0, 0.10, (0.85, 1.15), 0.3, 0.5, ((), 0.0)),
    # medium geometry, zoom up to the tighter crops of other exports, plus every acquisition shift
    "acquisition": (10.0, 0.08, (0.90, 1.40), 0.2, 0.5, (("gamma", "window", "detail", "noise", "jpeg"), 0.2)),
    # medium, plus fine detail made uninformative: sharpening or blur, noise, JPEG. In the lung data
    # the normal slices come from a sharper source (median |Laplacian| 2.2-2.6x the cancer classes'),
    # and a network trained without this calls a sharpened cancer slice normal.
    "detail": (10.0, 0.08, (0.90, 1.10), 0.2, 0.5, (("detail", "noise", "jpeg"), 0.4)),
    # detail, plus narrower windows: the one export change that equalisation cannot undo, as
    # clipping merges grey levels (a soft-tissue window turns the lung fields black).
    "export": (10.0, 0.08, (0.90, 1.10), 0.2, 0.5, (("window", "detail", "noise", "jpeg"), 0.4)),
    # export, plus slices rendered as the app renders a scanner's DICOM series (ScannerRender): full
    # field of view with table and air, reconstruction kernels, dose noise, slice thickness, windows.
    "scanner": (10.0, 0.08, (0.90, 1.10), 0.2, 0.5, (("scanner", "window", "detail", "noise", "jpeg"), 0.4)),
}


class AcquisitionShift(torch.nn.Module):
    """How the same anatomy looks when another scanner, window or export made
    the slice: a gamma curve, a narrower window, blur or sharpening, noise and
    JPEG artefacts, each drawn at random, on one (1, S, S) grey tensor in [0, 1].

    Percentile standardisation undoes linear contrast changes but not these,
    and a model trained without them answers confidently on shifted slices.
    """

    KINDS = ("gamma", "window", "detail", "noise", "jpeg")

    def __init__(self, p: float = 0.2, kinds: tuple[str, ...] = KINDS):
        super().__init__()
        unknown = set(kinds) - set(self.KINDS)
        if unknown:
            raise ValueError(f"unknown acquisition shifts {sorted(unknown)}; known: {self.KINDS}")
        self.p, self.kinds = p, tuple(kinds)

    def _chance(self, kind: str) -> bool:
        return kind in self.kinds and bool(torch.rand(()) < self.p)

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(0.0, 1.0)
        if self._chance("gamma"):
            x = x ** float(np.exp(self._uniform(np.log(0.5), np.log(2.0))))
        if self._chance("window"):
            low, high = self._uniform(0.0, 0.25), self._uniform(0.75, 1.0)
            x = ((x - low) / (high - low)).clamp(0.0, 1.0)
        if self._chance("detail"):
            sigma = self._uniform(0.3, 1.5)
            blurred = v2.functional.gaussian_blur(x, kernel_size=2 * round(3 * sigma) + 1, sigma=sigma)
            x = blurred if torch.rand(()) < 0.5 else (x + self._uniform(0.3, 1.0) * (x - blurred)).clamp(0.0, 1.0)
        if self._chance("noise"):
            x = (x + self._uniform(0.0, 0.05) * torch.randn_like(x)).clamp(0.0, 1.0)
        if self._chance("jpeg"):
            quality = int(torch.randint(10, 71, ()))
            grey = np.round(x[0].numpy() * 255).astype(np.uint8)
            _, encoded = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, quality])
            x = torch.from_numpy(cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255)[None]
        return x


def train_augment(level: str, config: PreprocessConfig | None = None) -> v2.Transform:
    """Augmentations of the reference projects (rotation, shift, zoom, flip,
    brightness, contrast) on one (1, S, S) grey tensor in [0, 1]; the
    ``acquisition``, ``detail`` and ``export`` levels add :class:`AcquisitionShift`
    of their kinds, ``scanner`` also :class:`ScannerRender`, which crops and
    standardises its render as ``config`` says (the model's preprocessing)."""
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augmentation must be one of {sorted(AUGMENT_LEVELS)}, got {level!r}")
    degrees, shift, zoom, jitter, flip, (kinds, chance) = AUGMENT_LEVELS[level]
    if level == "none":
        return v2.Identity()
    steps = [
        v2.RandomHorizontalFlip(flip),
        v2.RandomAffine(degrees=degrees, translate=(shift, shift), scale=zoom,
                        interpolation=v2.InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=jitter, contrast=jitter),
    ]
    if "scanner" in kinds:
        config = config or PreprocessConfig(crop="body", intensity="equalise")
        steps.append(ScannerRender(p=chance, crop=config.crop, intensity=config.intensity))
        kinds = tuple(k for k in kinds if k != "scanner")
    if kinds:
        steps.append(AcquisitionShift(p=chance, kinds=kinds))
    steps.append(v2.Lambda(lambda x: x.clamp(0.0, 1.0)))  # blurring rounds a hair past 1
    return v2.Compose(steps)


# A training square taken as a lung-window render: 0 is air, 1 is beyond the window's top.
AIR_HU = -1000.0
SQUARE_SPAN_HU = 1250.0
OUTSIDE_FOV_HU = -2048.0  # what scanners store outside the reconstruction circle
SCANNER_MATRIX = 512  # pixels across a scanner's field of view


def field_of_view(hu: np.ndarray, *, body_share: float, offset: tuple[float, float] = (0.5, 0.5),
                  table_hu: float | None = -300.0, table_gap: float = 0.01, circle: bool = True) -> np.ndarray:
    """A (S, S) body crop in HU placed in a scanner's full field of view: a
    square canvas of side ``S / body_share`` filled with air, the crop at
    ``offset`` (share of the free space, top and left), a couch of ``table_hu``
    under it (``table_gap`` of the side below the crop; None: no couch), and,
    with ``circle``, the padding value outside the reconstruction circle."""
    if not 0.2 <= body_share <= 1.0:
        raise ValueError(f"body_share must be between 0.2 and 1, got {body_share}")
    size = hu.shape[0]
    side = max(size, round(size / body_share))
    canvas = np.full((side, side), AIR_HU, dtype=np.float32)
    top, left = round(offset[0] * (side - size)), round(offset[1] * (side - size))
    canvas[top:top + size, left:left + size] = np.maximum(hu, AIR_HU)
    if table_hu is not None:
        y = top + size + round(table_gap * side)
        thickness = max(2, round(0.025 * side))
        if y + thickness <= side:
            # The couch's top shell, a darker foam core and a bottom shell, across most of the view.
            x0, x1 = round(0.08 * side), round(0.92 * side)
            canvas[y:y + thickness, x0:x1] = table_hu
            canvas[y + thickness // 3:y + 2 * thickness // 3, x0 + 2:x1 - 2] = (table_hu + AIR_HU) / 2
    if circle:
        yy, xx = np.mgrid[0:side, 0:side] - (side - 1) / 2
        canvas[yy ** 2 + xx ** 2 > (side / 2) ** 2] = OUTSIDE_FOV_HU
    return canvas


def slice_thickness(hu: np.ndarray, mm: float) -> np.ndarray:
    """Partial volume of a slab ``mm`` thick (against a 1 mm reference):
    the mean of copies scaled about the centre by up to ±0.5% per mm, as
    structures grow and shrink through the slab; 1 mm and under is left as is."""
    spread = 0.005 * max(mm - 1.0, 0.0)
    if spread == 0:
        return hu
    h, w = hu.shape
    centre = ((w - 1) / 2, (h - 1) / 2)
    copies = [cv2.warpAffine(hu, cv2.getRotationMatrix2D(centre, 0.0, 1.0 + spread * step), (w, h),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
              for step in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    return np.mean(copies, axis=0).astype(np.float32)


def dose_noise(hu: np.ndarray, sigma_hu: float, noise: np.ndarray) -> np.ndarray:
    """Quantum noise of a scan: ``noise`` (standard normal, the slice's shape)
    times ``sigma_hu``, which grows as one over the square root of the dose
    (about 10 HU at a standard dose, 30-60 HU at low dose)."""
    return (hu + sigma_hu * noise).astype(np.float32)


def reconstruction_kernel(hu: np.ndarray, sharpness: float, pixel: float = 1.0) -> np.ndarray:
    """A reconstruction kernel from smooth (``sharpness`` -1, soft-tissue
    B30f-like: Gaussian of 1.5 scanner pixels) to sharp (+1, lung or bone
    B70f-like: unsharp mask adding 2x the detail above a 1 pixel Gaussian, noise
    included); 0 leaves the slice. ``pixel``: slice pixels per scanner pixel
    (under 1 when the slice is coarser than the scanner's 512 matrix)."""
    if sharpness < 0:
        sigma = 1.5 * -sharpness * pixel
        return cv2.GaussianBlur(hu, (0, 0), sigma) if sigma >= 0.1 else hu
    if sharpness > 0:
        detail = hu - cv2.GaussianBlur(hu, (0, 0), max(pixel, 0.5))
        return (hu + 2.0 * sharpness * detail).astype(np.float32)
    return hu


class ScannerRender(torch.nn.Module):
    """A training slice rendered as the app renders one slice of a scanner's DICOM
    series, with probability ``p``, on one (1, S, S) grey tensor in [0, 1].

    The square is taken as a lung-window render of the anatomy (0 air, 1 beyond
    the window), placed in a full field of view with air, couch and the
    reconstruction circle (:func:`field_of_view`), thickened
    (:func:`slice_thickness`, 0.6-5 mm), given quantum noise
    (:func:`dose_noise`, 5-60 HU at the scanner's 512 matrix), filtered by a
    smooth or sharp kernel (:func:`reconstruction_kernel`), shown through a lung window of another
    centre and width, and then preprocessed as the model's config says
    (``crop``, ``intensity``): body crop, standardisation, square. The training
    exports are already cropped and windowed; a department's DICOM is not.
    """

    def __init__(self, p: float = 0.5, *, crop: str = "body", intensity: str = "equalise"):
        super().__init__()
        self.p = p
        self.config = dict(crop=crop, intensity=intensity)

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.rand(()) < self.p):
            return x
        size = x.shape[-1]
        hu = AIR_HU + SQUARE_SPAN_HU * x[0].clamp(0.0, 1.0).numpy().astype(np.float32)
        hu = field_of_view(hu, body_share=self._uniform(0.6, 0.95),
                           offset=(self._uniform(0.2, 0.6), self._uniform(0.3, 0.7)),
                           table_hu=self._uniform(-500.0, 100.0) if torch.rand(()) < 0.8 else None,
                           table_gap=self._uniform(0.0, 0.03), circle=bool(torch.rand(()) < 0.5))
        pixel = hu.shape[0] / SCANNER_MATRIX
        hu = slice_thickness(hu, self._uniform(0.6, 5.0))
        # Noise of a 512 matrix averaged into the coarser slice's pixels: its spread shrinks in proportion.
        sigma = float(np.exp(self._uniform(np.log(5.0), np.log(60.0)))) * min(pixel, 1.0)
        hu = dose_noise(hu, sigma, torch.randn(hu.shape).numpy())
        hu = reconstruction_kernel(hu, self._uniform(-1.0, 1.0), min(pixel, 1.0))
        window = Window(self._uniform(-700.0, -450.0), self._uniform(900.0, 1800.0))
        square_pixels, _ = to_square(window.apply(hu), PreprocessConfig(img_size=size, **self.config))
        return torch.from_numpy(square_pixels)[None]
