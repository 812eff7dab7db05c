"""Decoding of CT slices from the files a CT export produces: PNG, JPEG, TIFF,
BMP (and JPEG 2000 where Pillow has the codec) whatever their extension says,
8- and 16-bit, and DICOM.

Every decoder returns a :class:`Slice`: one grey-scale float32 image in [0, 1]
plus what was done to get it. Every failure is an :class:`ImageDecodeError`
with a message a clinician can act on; nothing else escapes ``decode``.

Uploads are untrusted, so decoding is bounded by design: only allow-listed
formats are opened (Pillow's other ~40 formats, PostScript with its
Ghostscript hand-off among them, never are); every page and frame must fit one
pixel budget and a slice-like aspect ratio before any pixel is decoded; large
slices are downscaled right after decoding, so nothing downstream (model
input, Grad-CAM, overlay, caches) ever holds more than ``MAX_SIDE`` pixels a
side. Error messages are written here: a library's exception text never
reaches the user.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError, features

log = logging.getLogger(__name__)

# The one pixel budget of every page and frame of every format. A CT slice is
# at most a few megapixels; Pillow's own limit is set to the same budget, so
# no code path of this process opens a larger image without an error (Pillow
# warns above it and refuses outright above twice it).
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# A CT slice is close to square; a 65000x615 strip fits the pixel budget but
# no slice, and elongated images are what made Grad-CAM cost gigabytes.
MAX_ASPECT = 8
# Decoded slices are downscaled to at most this many pixels on the long side:
# more than a display needs and far more than a model's input.
MAX_SIDE = 2048
# Reaching frame k of an animated PNG decodes frames 1..k onto the full canvas.
MAX_FRAME_PIXELS = 4 * MAX_PIXELS
# TIFF and MPO pages are separate images of their own sizes; each one is
# checked before any is decoded, and a file may hold at most this many.
PAGED_FORMATS = ("TIFF", "MPO")
MAX_PAGES = 1000
# Frames an animated image may declare: each costs work to reach, whatever its size.
MAX_FRAMES = 1000
MIN_SIDE = 16
# Uploads and files larger than this are refused before they are read.
MAX_FILE_BYTES = 200 * 1024 * 1024
# A deflated DICOM may inflate to one 16-bit frame at the pixel budget plus
# 1 MiB of header; beyond that it is a bomb, not a slice.
MAX_INFLATED_BYTES = 2 * MAX_PIXELS + 2**20
INFLATE_CHUNK = 1 << 20

# The raster formats a CT export uses; DICOM is read by pydicom, not Pillow.
ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP") + (("JPEG2000",) if features.check_codec("jpg_2000") else ())
ACCEPTED = "PNG, JPEG, TIFF, BMP or DICOM"

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


def decode(source: ImageSource, *, window: Window = LUNG_WINDOW, frame: int | None = None,
           on_bytes: Callable[[bytes], None] | None = None) -> Slice:
    """Decode a path, file bytes, numpy array or PIL image into a :class:`Slice`.

    The container is detected from the content, not the file name. ``frame``
    picks a frame of a multi-frame file (default: the middle one). ``on_bytes``
    is given the bytes of a path or of bytes before they are decoded (to hash
    them without reading the file again).
    """
    try:
        if isinstance(source, Image.Image):
            name, result = "image", _from_pil(source, frame, "image")
        elif isinstance(source, np.ndarray):
            name, result = "array", _from_array(source)
        else:
            data, name = _read_bytes(source)
            if on_bytes is not None:
                on_bytes(data)
            if not data:
                raise ImageDecodeError(f"{name}: the file is empty")
            result = _from_dicom(data, window, frame) if is_dicom(data) else _from_raster(data, name, frame)
        return _downscale(_check_decoded(result, name))
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError("the image is too large to decode in memory") from None
    except Exception as exc:  # any decoder failure becomes a clear, typed error
        log.info("decoder failure", exc_info=True)  # the library's own words go to the server log only
        raise ImageDecodeError(f"could not decode the image ({type(exc).__name__})") from exc


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


def _check_decoded(result: Slice, name: str) -> Slice:
    height, width = result.pixels.shape
    if min(height, width) < MIN_SIDE:
        raise ImageDecodeError(
            f"{name}: the image is {width}x{height} pixels; a CT slice needs at least {MIN_SIDE}x{MIN_SIDE}"
        )
    _check_geometry(width, height, name)
    if not np.isfinite(result.pixels).all():
        raise ImageDecodeError(f"{name}: the image contains NaN or infinite values")
    return result


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            f"{what}: the image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); "
            f"this app accepts at most {MAX_PIXELS / 1e6:.0f} megapixels (a possible decompression bomb)"
        )


def _check_geometry(width: int, height: int, what: str) -> None:
    """The pixel budget and the aspect ratio, checked from the header before decoding."""
    _check_pixels(width, height, what)
    if min(width, height) > 0 and max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageDecodeError(
            f"{what}: the image is {width}x{height} pixels, its long side {max(width, height) / min(width, height):.0f} "
            f"times its short side; a CT slice is close to square (this app accepts at most {MAX_ASPECT}:1)"
        )


def _downscale(result: Slice) -> Slice:
    """The slice with its long side reduced to MAX_SIDE (area averaging) when larger."""
    width, height = result.size
    scale = MAX_SIDE / max(width, height)
    if scale >= 1:
        return result
    size = (round(width * scale), round(height * scale))  # the short side stays >= MAX_SIDE / MAX_ASPECT

    def shrink(array: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(array.astype(np.float32, copy=False), mode="F")
                          .resize(size, Image.Resampling.BOX), dtype=np.float32)

    notes = [*result.notes, f"downscaled from {width}x{height} to {size[0]}x{size[1]} pixels"]
    hu = None if result.hu is None else shrink(result.hu)
    return replace(result, pixels=np.clip(shrink(result.pixels), 0.0, 1.0), hu=hu, notes=notes)


def _from_raster(data: bytes, name: str, frame: int | None) -> Slice:
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        result = _from_pil(image, frame, name)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        refused = _other_image_format(data)
        if refused:
            raise ImageDecodeError(f"{name}: {refused} files are not accepted; upload a {ACCEPTED} slice") from None
        kind = _guess_non_image(data)
        raise ImageDecodeError(f"{name}: not an image file{kind}; upload a {ACCEPTED} slice") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(
            f"{name}: refused as a possible decompression bomb (too many pixels; this app accepts at most "
            f"{MAX_PIXELS / 1e6:.0f} megapixels)"
        ) from None
    except (OSError, SyntaxError, EOFError, ValueError):
        log.info("%s: decoder failure", name, exc_info=True)
        raise ImageDecodeError(f"{name}: the file is truncated or corrupt") from None
    if image.format and Path(name).suffix:
        expected = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg", ".jpe"}, "TIFF": {".tif", ".tiff"}, "BMP": {".bmp"}}
        suffixes = expected.get(image.format)
        if suffixes and Path(name).suffix.lower() not in suffixes:
            result.notes.append(f"the file is a {image.format} although its name ends in {Path(name).suffix}")
    return result


def _other_image_format(data: bytes) -> str | None:
    """The name of a Pillow format outside the allow-list that recognises
    ``data`` by its magic bytes (nothing is decoded), e.g. "EPS" or "GIF"."""
    Image.init()
    prefix = data[:16]
    for fmt, (_factory, accept) in Image.OPEN.items():
        if fmt in ALLOWED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001 - a plugin's probe failing only means "not this format"
            continue
    return None


def _guess_non_image(data: bytes) -> str:
    head = data[:8]
    if head.startswith(b"%PDF"):
        return " (it is a PDF document)"
    if head.startswith(b"PK"):
        return " (it is a ZIP archive)"
    try:
        # The first 512 bytes may end inside a character: not final, so that is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(data[:512], final=False)
        return " (it looks like text)"
    except UnicodeDecodeError:
        return ""


def _count_frames(image: Image.Image, name: str) -> int:
    """The number of frames; every page of a paged format is checked against
    the pixel budget first (seeking a TIFF or MPO page reads only its header)."""
    if image.format not in PAGED_FORMATS:
        _check_pixels(image.width, image.height, name)
        n_frames = getattr(image, "n_frames", 1)  # an animated PNG declares it: nothing decoded yet
        if n_frames > MAX_FRAMES:
            raise ImageDecodeError(f"{name}: the image has {n_frames} frames; at most {MAX_FRAMES} are read; "
                                   "export the slice as a single image")
        return n_frames
    count = 0
    try:
        while True:
            image.seek(count)  # EOFError past the last page
            if count == MAX_PAGES:
                raise ImageDecodeError(f"{name}: the file has more than {MAX_PAGES} pages; export the slice as a "
                                       "single image")
            _check_pixels(image.width, image.height, f"{name}, page {count + 1}")
            count += 1
    except EOFError:
        pass
    image.seek(0)
    return count


def _from_pil(image: Image.Image, frame: int | None, name: str) -> Slice:
    notes: list[str] = []
    n_frames = _count_frames(image, name)
    if n_frames > 1:
        index = n_frames // 2 if frame is None else frame
        if not 0 <= index < n_frames:
            raise ImageDecodeError(f"frame {index} requested but the image has {n_frames} frames")
        work = (index + 1) * image.width * image.height
        if image.format not in PAGED_FORMATS and work > MAX_FRAME_PIXELS:
            raise ImageDecodeError(
                f"the image has {n_frames} frames of {image.width}x{image.height} pixels; reaching frame {index + 1} "
                f"means decoding {work / 1e6:.0f} megapixels, more than this app accepts "
                f"({MAX_FRAME_PIXELS / 1e6:.0f}); export the slice as a single image"
            )
        image.seek(index)
        notes.append(f"multi-frame image: used frame {index + 1} of {n_frames}")
    _check_geometry(image.width, image.height, name)  # the frame that is decoded, whatever the first one said
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
        if np.asarray(rgba)[..., 3].min() < 255:
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


def read_dicom(data: bytes):
    """The pydicom dataset of DICOM file bytes, pixel data not yet decoded.
    A deflated file is checked for its inflated size first; a damaged header
    or a file without pixel data is an :class:`ImageDecodeError`."""
    import pydicom

    _check_inflated_size(data)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception:
        log.info("DICOM header unreadable", exc_info=True)
        raise ImageDecodeError("the DICOM file could not be read: its header is damaged or incomplete") from None
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise ImageDecodeError("the DICOM file has no pixel data (it may be a report or a structured document)")
    return dataset


def dicom_pixels(dataset, index: int | None = None) -> np.ndarray:
    """The stored values of frame ``index`` (None: every frame) through
    pydicom's pixel-data plugins; a syntax no installed plugin decodes is
    named in the error."""
    from pydicom.pixels import pixel_array

    try:
        return dataset.pixel_array if index is None else pixel_array(dataset, index=index)
    except Exception:
        log.info("DICOM pixel data undecodable", exc_info=True)
        raise ImageDecodeError(
            f"the DICOM pixel data could not be decoded (transfer syntax: {_syntax_name(dataset)}); "
            "it may need an image codec that is not installed"
        ) from None


def dicom_colour_to_grey(array: np.ndarray, dataset) -> np.ndarray | None:
    """Grey in [0, 1] (ITU-R 601 luma) of a colour or palette-colour frame; None
    for a monochrome one."""
    from pydicom.pixels import apply_color_lut

    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        array = apply_color_lut(array, dataset)
    elif int(dataset.get("SamplesPerPixel", 1) or 1) == 1:
        return None
    rgb = np.asarray(array)
    if rgb.dtype == np.uint16:  # 16-bit palette entries
        rgb = np.round(rgb / 257.0).astype(np.uint8)
    rgb = _as_uint8(rgb)
    if rgb.ndim == 4:
        return np.stack([_luma(frame) for frame in rgb])
    return _luma(rgb)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("L"), np.float32) / 255.0


def _from_dicom(data: bytes, window: Window, frame: int | None) -> Slice:
    from pydicom.pixels import apply_modality_lut

    dataset = read_dicom(data)
    rows, cols = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    _check_geometry(cols, rows, "DICOM")
    notes: list[str] = []
    n_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    index = None
    if n_frames > 1:
        index = n_frames // 2 if frame is None else frame
        if not 0 <= index < n_frames:
            raise ImageDecodeError(f"frame {index} requested but the DICOM file has {n_frames} frames")
        notes.append(f"multi-frame DICOM: used frame {index + 1} of {n_frames}")
    # Only the frame used is decoded: a compressed multi-frame file would
    # otherwise inflate every frame (RLE: up to 64x the file size).
    array = dicom_pixels(dataset, index)
    grey = dicom_colour_to_grey(array, dataset)
    if grey is not None:
        if str(dataset.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
            notes.append("palette-colour DICOM shown in grey")
        return Slice(grey, "DICOM", notes, mode="DICOM")
    hu = np.asarray(apply_modality_lut(array, dataset), dtype=np.float32)
    modality = str(dataset.get("Modality", ""))[:16]  # a code string: at most 16 characters
    if modality and modality != "CT":
        notes.append(f"DICOM modality is {modality}, not CT")
    if "RescaleSlope" not in dataset and modality != "CT":
        notes.append("no rescale slope/intercept: pixel values scaled from their own range")
        return Slice(_min_max(hu), "DICOM", notes, mode="DICOM")
    notes.append(f"lung window: center {window.center:g} HU, width {window.width:g} HU")
    return Slice(window.apply(hu), "DICOM", notes, hu=hu, mode="DICOM")


def _syntax_name(dataset) -> str:
    """The registered name of the file's transfer syntax; an unknown UID is
    text from the file, so it is not repeated."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", None)
    return name if name and name != str(syntax) else "not a registered one"


def _check_inflated_size(data: bytes) -> None:
    """A deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) is inflated
    whole by pydicom before anything can be checked; 1 MB of zeros inflates to
    1 GB. The inflated size is counted here, chunk by chunk without keeping
    the output, and the file refused beyond MAX_INFLATED_BYTES."""
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
    try:
        size = _inflated_size(memoryview(data)[stream.tell():], MAX_INFLATED_BYTES)
    except zlib.error:
        raise ImageDecodeError("the deflated DICOM file is corrupt") from None
    if size > MAX_INFLATED_BYTES:
        raise ImageDecodeError(
            f"the deflated DICOM file inflates to more than {_megabytes(MAX_INFLATED_BYTES)}, more than one "
            "slice needs (a possible decompression bomb)"
        )


def _inflated_size(deflated: memoryview, limit: int) -> int:
    """Bytes that a raw deflate stream inflates to, counted up to just past ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    for start in range(0, len(deflated), INFLATE_CHUNK):
        pending = deflated[start:start + INFLATE_CHUNK]
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, INFLATE_CHUNK))
            if total > limit:
                return total
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    return total + len(inflater.flush())
