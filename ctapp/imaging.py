"""Decoding of CT slices from any file a user may have: PNG/JPEG/other rasters
whatever their extension says, 8- and 16-bit, and DICOM.

Every decoder returns a :class:`Slice`: one grey-scale float32 image in [0, 1]
plus what was done to get it. Every failure is an :class:`ImageDecodeError`
with a message a clinician can act on; nothing else escapes ``decode``.
"""
from __future__ import annotations

import hashlib
import io
import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageSequence, UnidentifiedImageError

# Pillow refuses images above ~179 megapixels; a CT slice is at most a few
# megapixels, so anything above this is refused long before Pillow's limit.
MAX_PIXELS = 40_000_000
# Reaching frame k of an animated GIF/PNG decodes frames 1..k onto the full
# canvas: a 9 kB GIF of 400 one-pixel frames on a 4000x4000 canvas took 10 s.
MAX_FRAME_PIXELS = 4 * MAX_PIXELS
MIN_SIDE = 16
# Uploads and files larger than this are refused before they are read.
MAX_FILE_BYTES = 200 * 1024 * 1024

# A truncated file must be reported, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image]


class ImageDecodeError(ValueError):
    """A file or array that cannot be used as a CT slice (message says why)."""


@dataclass(frozen=True)
class Window:
    """A CT intensity window in Hounsfield units (DICOM only)."""

    center: float = -600.0
    width: float = 1500.0

    def apply(self, hu: np.ndarray) -> np.ndarray:
        if self.width <= 0:
            raise ImageDecodeError(f"window width must be positive, got {self.width}")
        low = self.center - self.width / 2
        return np.clip((hu - low) / self.width, 0.0, 1.0).astype(np.float32)


LUNG_WINDOW = Window(-600.0, 1500.0)
MEDIASTINUM_WINDOW = Window(40.0, 400.0)


@dataclass
class Slice:
    """A decoded slice: grey float32 pixels in [0, 1], shape (H, W)."""

    pixels: np.ndarray
    source_format: str  # "PNG", "JPEG", "DICOM", "array", ...
    notes: list[str] = field(default_factory=list)
    hu: np.ndarray | None = None  # Hounsfield units, DICOM only (for re-windowing)
    mode: str = ""  # the stored pixel mode: "RGBA", "L", "I;16", "DICOM", ...

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL reports it."""
        return self.pixels.shape[1], self.pixels.shape[0]

    def rewindow(self, window: Window) -> "Slice":
        if self.hu is None:
            return self
        return replace(self, pixels=window.apply(self.hu), notes=list(self.notes))

    def to_uint8(self) -> np.ndarray:
        return np.round(self.pixels * 255.0).astype(np.uint8)

    def content_hash(self) -> str:
        """Hash of the decoded 8-bit pixels: equal for the same picture stored
        in another container, mode or extension."""
        grey = self.to_uint8()
        digest = hashlib.sha1(np.asarray(grey.shape, np.int64).tobytes())
        digest.update(np.ascontiguousarray(grey).tobytes())
        return digest.hexdigest()


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def decode(source: ImageSource, *, window: Window = LUNG_WINDOW, frame: int | None = None) -> Slice:
    """Decode a path, file bytes, numpy array or PIL image into a :class:`Slice`.

    The container is detected from the content, not the file name. ``frame``
    picks a frame of a multi-frame file (default: the middle one).
    """
    try:
        if isinstance(source, Image.Image):
            return _check_size(_from_pil(source, frame), "image")
        if isinstance(source, np.ndarray):
            return _check_size(_from_array(source), "array")
        data, name = _read_bytes(source)
        if not data:
            raise ImageDecodeError(f"{name}: the file is empty")
        if is_dicom(data):
            result = _from_dicom(data, window, frame)
        else:
            result = _from_raster(data, name, frame)
        return _check_size(result, name)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError("the image is too large to decode in memory") from None
    except Exception as exc:  # any decoder failure becomes a clear, typed error
        raise ImageDecodeError(f"could not decode the image: {type(exc).__name__}: {exc}") from exc


def _read_bytes(source) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > MAX_FILE_BYTES:
            raise ImageDecodeError(f"the file is {_megabytes(len(source))}; the limit is {_megabytes(MAX_FILE_BYTES)}")
        return bytes(source), "upload"
    path = Path(source)
    name = path.name
    if not path.exists():
        raise ImageDecodeError(f"{name}: no such file")
    if not path.is_file():
        raise ImageDecodeError(f"{name}: not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageDecodeError(f"{name}: the file is {_megabytes(size)}; the limit is {_megabytes(MAX_FILE_BYTES)}")
    return path.read_bytes(), name


def _megabytes(size: int) -> str:
    """Sizes in MB (2**20 bytes, as MAX_FILE_BYTES is defined) with enough
    digits that a file over the limit never reads as equal to it."""
    mb = size / 2**20
    return f"{mb:.0f} MB" if mb >= 10 and mb == round(mb) else f"{mb:.{1 if mb >= 10 else 2}f} MB"


def _check_size(result: Slice, name: str) -> Slice:
    height, width = result.pixels.shape
    if min(height, width) < MIN_SIDE:
        raise ImageDecodeError(
            f"{name}: the image is {width}x{height} pixels; a CT slice needs at least {MIN_SIDE}x{MIN_SIDE}"
        )
    if not np.isfinite(result.pixels).all():
        raise ImageDecodeError(f"{name}: the image contains NaN or infinite values")
    return result


def _check_pixels(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            f"{name}: the image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); "
            f"this app accepts at most {MAX_PIXELS / 1e6:.0f} megapixels (a possible decompression bomb)"
        )


def _from_raster(data: bytes, name: str, frame: int | None) -> Slice:
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image.width, image.height, name)
        result = _from_pil(image, frame)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        kind = _guess_non_image(data)
        raise ImageDecodeError(f"{name}: not an image file{kind}; upload a PNG, JPEG or DICOM slice") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(
            f"{name}: refused as a possible decompression bomb (too many pixels; this app accepts at most "
            f"{MAX_PIXELS / 1e6:.0f} megapixels)"
        ) from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"{name}: the file is truncated or corrupt ({exc})") from None
    if image.format and Path(name).suffix:
        expected = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg", ".jpe"}, "TIFF": {".tif", ".tiff"}, "BMP": {".bmp"}}
        suffixes = expected.get(image.format)
        if suffixes and Path(name).suffix.lower() not in suffixes:
            result.notes.append(f"the file is a {image.format} although its name ends in {Path(name).suffix}")
    return result


def _guess_non_image(data: bytes) -> str:
    head = data[:8]
    if head.startswith(b"%PDF"):
        return " (it is a PDF document)"
    if head.startswith(b"PK"):
        return " (it is a ZIP archive)"
    try:
        data[:512].decode("utf-8")
        return " (it looks like text)"
    except UnicodeDecodeError:
        return ""


def _from_pil(image: Image.Image, frame: int | None) -> Slice:
    notes: list[str] = []
    n_frames = getattr(image, "n_frames", 1)
    if n_frames > 1:
        index = n_frames // 2 if frame is None else frame
        if not 0 <= index < n_frames:
            raise ImageDecodeError(f"frame {index} requested but the image has {n_frames} frames")
        work = (index + 1) * image.width * image.height
        if work > MAX_FRAME_PIXELS:
            raise ImageDecodeError(
                f"the image has {n_frames} frames of {image.width}x{image.height} pixels; reaching frame {index + 1} "
                f"means decoding {work / 1e6:.0f} megapixels, more than this app accepts "
                f"({MAX_FRAME_PIXELS / 1e6:.0f}); export the slice as a single image"
            )
        image = ImageSequence.Iterator(image)[index]
        notes.append(f"multi-frame image: used frame {index + 1} of {n_frames}")
    fmt = image.format or "image"
    image.load()
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        notes.append(f"{_bit_depth(mode)} grey image scaled from its own minimum and maximum")
        return Slice(_min_max(pixels), fmt, notes, mode=mode)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite on black: transparent regions of a CT export are outside the body (air).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
        if mode != "RGBA" or np.asarray(rgba)[..., 3].min() < 255:
            notes.append("transparent pixels shown as black")
    if image.mode != "L":
        image = image.convert("L")  # ITU-R 601 luma for RGB, CMYK, palette, YCbCr...
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return Slice(pixels, fmt, notes, mode=mode)


def _bit_depth(mode: str) -> str:
    return "32-bit float" if mode == "F" else ("32-bit" if mode == "I" else "16-bit")


def _min_max(pixels: np.ndarray) -> np.ndarray:
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros_like(pixels, dtype=np.float32)
    return ((pixels - low) / (high - low)).astype(np.float32)


def _from_array(array: np.ndarray) -> Slice:
    pixels = np.asarray(array)
    notes: list[str] = []
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 3, 4):
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        else:
            pixels = np.asarray(Image.fromarray(_as_uint8(pixels[..., :3])).convert("L"))
    if pixels.ndim != 2:
        raise ImageDecodeError(f"expected a 2-D grey or (H, W, 3) colour array, got shape {array.shape}")
    if pixels.dtype == np.uint8:
        return Slice(pixels.astype(np.float32) / 255.0, "array", notes)
    if pixels.dtype == bool:
        return Slice(pixels.astype(np.float32), "array", notes)
    if np.issubdtype(pixels.dtype, np.floating) and pixels.size and 0.0 <= np.nanmin(pixels) and np.nanmax(pixels) <= 1.0:
        return Slice(pixels.astype(np.float32), "array", notes)
    if not np.issubdtype(pixels.dtype, np.number):
        raise ImageDecodeError(f"unsupported array type {pixels.dtype}")
    notes.append(f"{pixels.dtype} array scaled from its own minimum and maximum")
    return Slice(_min_max(pixels.astype(np.float32)), "array", notes)


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return np.round(_min_max(pixels.astype(np.float32)) * 255).astype(np.uint8)


def _from_dicom(data: bytes, window: Window, frame: int | None) -> Slice:
    import pydicom
    from pydicom.pixels import apply_modality_lut, pixel_array

    _check_inflated_size(data)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise ImageDecodeError(f"the DICOM file could not be read ({exc})") from None
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise ImageDecodeError("the DICOM file has no pixel data (it may be a report or a structured document)")
    rows, cols = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    _check_pixels(cols, rows, "DICOM")
    notes: list[str] = []
    n_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    index = None
    if n_frames > 1:
        index = n_frames // 2 if frame is None else frame
        if not 0 <= index < n_frames:
            raise ImageDecodeError(f"frame {index} requested but the DICOM file has {n_frames} frames")
        notes.append(f"multi-frame DICOM: used frame {index + 1} of {n_frames}")
    try:
        # Only the frame used is decoded: a compressed multi-frame file would
        # otherwise inflate every frame (RLE: up to 64x the file size).
        array = dataset.pixel_array if index is None else pixel_array(dataset, index=index)
    except Exception as exc:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax))
        raise ImageDecodeError(
            f"the DICOM pixel data could not be decoded (transfer syntax: {syntax_name}); "
            f"it may need an image codec that is not installed ({' '.join(str(exc).split())})"
        ) from None
    if samples > 1:
        rgb = _as_uint8(np.asarray(array))
        return Slice(np.asarray(Image.fromarray(rgb[..., :3]).convert("L"), np.float32) / 255.0, "DICOM", notes, mode="DICOM")
    hu = np.asarray(apply_modality_lut(array, dataset), dtype=np.float32)
    modality = str(dataset.get("Modality", ""))
    if modality and modality != "CT":
        notes.append(f"DICOM modality is {modality}, not CT")
    if "RescaleSlope" not in dataset and modality != "CT":
        notes.append("no rescale slope/intercept: pixel values scaled from their own range")
        return Slice(_min_max(hu), "DICOM", notes, mode="DICOM")
    notes.append(f"lung window: center {window.center:g} HU, width {window.width:g} HU")
    return Slice(window.apply(hu), "DICOM", notes, hu=hu, mode="DICOM")


def _check_inflated_size(data: bytes) -> None:
    """A deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) is inflated
    whole by pydicom before anything can be checked; 1 MB of zeros inflates to
    1 GB. Refuse the file when it inflates beyond MAX_FILE_BYTES."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
    except Exception:
        return  # not readable here: dcmread reports it
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(data[stream.tell():], MAX_FILE_BYTES + 1)
    except zlib.error as exc:
        raise ImageDecodeError(f"the deflated DICOM file is corrupt ({exc})") from None
    if inflater.unconsumed_tail:
        raise ImageDecodeError(
            f"the deflated DICOM file inflates to more than {_megabytes(MAX_FILE_BYTES)} "
            "(a possible decompression bomb)"
        )
