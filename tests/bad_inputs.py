"""Awkward inputs, shared by the robustness and hardening tests and
``benchmarks/robustness.py``:

* :func:`bad_input_cases` writes one file per awkward input (empty, text, PDF,
  truncated, decompression bombs, 1x1, 16-bit, palette, CMYK, animated, DICOM
  without pixels, with a missing codec, multi-frame, too large) and says what
  must happen to each; builders for such files (:func:`png_bomb`,
  :func:`dicom_bytes`, ...);
* :func:`fuzz_decode` feeds ``decode`` random and mutated bytes;
* :class:`TouchMarker` is pickled code that must never run;
  :func:`run_predict_cli` runs ``ctapp.predict`` on files in this process.
"""
from __future__ import annotations

import contextlib
import io
import random
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The upload limit used by tests and the benchmark instead of the real 200 MiB,
# so that an over-limit file is 3 MB, not 200 MB. Every other case is smaller.
SMALL_FILE_LIMIT = 2_000_000


@dataclass
class BadInput:
    """One awkward file and what must happen to it.

    ``error`` lists words the ImageDecodeError message must contain (case
    insensitive); ``None`` means the file must decode, with ``notes`` words in
    one of the slice's notes."""

    name: str
    path: Path
    error: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()
    check: str = ""  # an extra check for the tests: "16bit", "frame", ...
    needs_small_limit: bool = False  # only fails with MAX_FILE_BYTES = SMALL_FILE_LIMIT


def ct_pattern(size: int = 64, seed: int = 0) -> np.ndarray:
    """A CT-like grey picture in [0, 1] (body ellipse and a blob)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.where((((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.36) ** 2) < 1, 0.3, 0.0)
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.2)
    img = img + rng.uniform(0.3, 0.7) * (np.hypot(x - cx, y - cy) < r) + rng.normal(0, 0.02, (size, size))
    return np.clip(img, 0, 1)


def png_bytes(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kw)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kw)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, *, full: bool = True) -> bytes:
    """An 8-bit grey PNG of ``width`` x ``height`` black pixels.

    ``full``: a complete, valid zlib stream of every row (compresses about
    1000:1, so 64 megapixels are ~65 kB); otherwise only the header and a
    token IDAT (for sizes whose stream would take long to build; the size
    check must refuse the file before any pixel is decoded)."""
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    if full:
        packer = zlib.compressobj(9)
        row = bytes(width + 1)  # filter byte 0 + zeros
        rows_per_block = max(1, (1 << 22) // len(row))
        parts = []
        for start in range(0, height, rows_per_block):
            parts.append(packer.compress(row * min(rows_per_block, height - start)))
        parts.append(packer.flush())
        idat = b"".join(parts)
    else:
        idat = zlib.compress(bytes(width + 1) * 4)
    return header + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def tiff_pages(sizes: list[tuple[int, int]]) -> bytes:
    """A grey multi-page TIFF of black pages of the given (width, height), each
    one deflate-compressed strip (a 13000x13000 page costs ~170 kB)."""
    strips = []
    for width, height in sizes:
        packer = zlib.compressobj(9)
        rows = max(1, (1 << 22) // width)
        parts = [packer.compress(bytes(width * min(rows, height - start))) for start in range(0, height, rows)]
        strips.append(b"".join(parts) + packer.flush())
    out = bytearray(b"II*\x00" + bytes(4))
    offsets = []
    for strip in strips:
        offsets.append(len(out))
        out += strip
    previous_link = 4  # where the offset of the next IFD is written
    for (width, height), strip, offset in zip(sizes, strips, offsets):
        out += bytes(len(out) % 2)  # IFDs start on a word boundary
        struct.pack_into("<I", out, previous_link, len(out))
        entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, offset),
                   (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
        out += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            out += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<H2x", value) if kind == 3 else struct.pack("<I", value))
        previous_link = len(out)
        out += bytes(4)
    return bytes(out)


def eps_bytes() -> bytes:
    """A small Encapsulated PostScript file: Pillow hands these to Ghostscript."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
            b"0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


def gif_frame_bomb(side: int, frames: int) -> bytes:
    """An animated GIF: a ``side`` x ``side`` canvas and ``frames`` one-pixel
    frames (23 bytes each). Reaching the middle frame composes every earlier
    frame onto the full canvas: CPU time grows with frames x canvas."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff")
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for k in range(frames):
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control extension
        out += b"\x2c" + struct.pack("<HHHHB", k % side, 0, 1, 1, 0)  # a 1x1 frame at (k, 0)
        out += b"\x02\x02\x44\x01\x00"  # LZW: one black pixel
    return bytes(out + b"\x3b")


def dicom_bytes(pixels: np.ndarray | None = None, *, frames: int = 1, syntax: str | None = None,
                encapsulated: bytes | None = None, modality: str = "CT", rows: int | None = None,
                cols: int | None = None) -> bytes:
    """A minimal CT DICOM file: 16-bit signed HU pixels (``frames`` x (H, W)),
    no pixel data when ``pixels`` and ``encapsulated`` are None, or
    ``encapsulated`` bytes as one compressed fragment under ``syntax``."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["robustness"])
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Anonymous"
    if pixels is not None or encapsulated is not None:
        shape = pixels.shape[-2:] if pixels is not None else (rows or 64, cols or 64)
        ds.Rows, ds.Columns = int(rows or shape[0]), int(cols or shape[1])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if frames > 1:
            ds.NumberOfFrames = frames
        if encapsulated is not None:
            ds.PixelData = encapsulate([encapsulated] * frames)
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def deflated_dicom(pixels: np.ndarray, padding: int = 0) -> bytes:
    """A DICOM in the Deflated Explicit VR Little Endian transfer syntax; with
    ``padding`` a private element of that many zero bytes follows the pixels
    (it deflates about 230:1, so 256 MiB cost ~1 MB and 0.6 s)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = dicom_bytes(pixels)
    meta_end = _dicom_meta_end(plain)
    body = plain[meta_end:]
    if padding:
        creator = b"BOMB"
        body += struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", len(creator)) + creator
        body += struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, padding)
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(body)]
    zeros = bytes(min(padding, 1 << 22))
    left = padding
    while left > 0:
        parts.append(packer.compress(zeros[:left] if left < len(zeros) else zeros))
        left -= len(zeros)
    parts.append(packer.flush())
    return _with_transfer_syntax(plain[:meta_end], DeflatedExplicitVRLittleEndian) + b"".join(parts)


def _dicom_meta_end(data: bytes) -> int:
    """Offset of the first byte after the file meta group (explicit VR LE)."""
    group_length = struct.unpack("<I", data[132 + 8:132 + 12])[0]  # (0002,0000) UL, value after 8 header bytes
    return 132 + 12 + group_length


def _with_transfer_syntax(head: bytes, syntax: str) -> bytes:
    """Preamble + file meta of ``head`` with (0002,0010) replaced."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = pydicom.dcmread(io.BytesIO(head + b""), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = syntax
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=True)
    return head[:132] + out.getvalue()


def hu_slice(size: int = 64, seed: int = 0) -> np.ndarray:
    """A CT slice in stored values (HU + 1024): air outside, soft tissue, a dense blob."""
    return np.round(ct_pattern(size, seed) * 2000).astype(np.int16)


BAD_INPUT_NAMES = (
    "empty file", "text named .png", "PDF named .png", "truncated PNG", "truncated JPEG",
    "PNG bomb 8000x8000 (project limit)", "PNG bomb 40000x40000", "1x1 image", "16-bit grey PNG", "palette PNG",
    "CMYK JPEG", "animated GIF (format not accepted)", "animated PNG", "animated GIF bomb (400 frames of 4000x4000)",
    "multi-page TIFF", "TIFF with a 13000x13000 middle page", "PNG 65000x615 (39 kB)", "EPS (format not accepted)",
    "DICOM without pixel data", "DICOM needing a missing codec (JPEG-LS)",
    "multi-frame DICOM", "good DICOM", "deflated DICOM", "deflated DICOM bomb (1 MB -> 256 MiB)",
    "file over the upload limit", "good PNG", "good JPEG",
)


def bad_input_cases(folder: Path) -> list[BadInput]:
    """Write every awkward input into ``folder``; return the cases (in the
    order of BAD_INPUT_NAMES)."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = Image.fromarray(np.round(ct_pattern(64) * 255).astype(np.uint8))
    good_png, good_jpeg = png_bytes(grey), jpeg_bytes(grey.convert("RGB"), quality=90)
    cases: list[BadInput] = []

    def add(name: str, filename: str, data: bytes, **kw) -> None:
        path = folder / filename
        path.write_bytes(data)
        cases.append(BadInput(name, path, **kw))

    add("empty file", "empty.png", b"", error=("empty",))
    add("text named .png", "notes.png", b"Patient was scanned on Monday.\nNo findings.\n" * 3,
        error=("not an image", "text"))
    add("PDF named .png", "report.png", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n",
        error=("not an image", "PDF"))
    add("truncated PNG", "truncated.png", good_png[: len(good_png) // 2], error=("truncated",))
    add("truncated JPEG", "truncated.jpg", good_jpeg[: len(good_jpeg) // 2], error=("truncated",))
    # 64 megapixels: Pillow would decode it (below Image.MAX_IMAGE_PIXELS, 89 M);
    # the project's MAX_PIXELS (40 M) refuses it before any pixel is inflated.
    add("PNG bomb 8000x8000 (project limit)", "bomb_64mp.png", png_bomb(8000, 8000),
        error=("decompression bomb", "8000x8000"))
    # 1.6 gigapixels: above Pillow's own hard limit too.
    add("PNG bomb 40000x40000", "bomb_1600mp.png", png_bomb(40000, 40000, full=False),
        error=("decompression bomb",))
    add("1x1 image", "dot.png", png_bytes(Image.new("L", (1, 1), 128)), error=("1x1", "at least"))
    sixteen = (ct_pattern(64) * 60000 + 1000).astype(np.uint16)
    add("16-bit grey PNG", "sixteen.png", png_bytes(Image.fromarray(sixteen)), notes=("16-bit",), check="16bit")
    add("palette PNG", "palette.png", png_bytes(grey.convert("RGB").quantize(64)))
    add("CMYK JPEG", "cmyk.jpg", jpeg_bytes(grey.convert("CMYK"), quality=95))
    frames = [Image.fromarray(np.round(ct_pattern(64, seed) * 255).astype(np.uint8)) for seed in range(5)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    # GIF is outside the allow-list: refused by name before any frame is decoded.
    add("animated GIF (format not accepted)", "animated.gif", animated.getvalue(), error=("GIF", "not accepted"))
    apng = io.BytesIO()
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:], duration=100)
    add("animated PNG", "animated.png", apng.getvalue(), notes=("frame 3 of 5",), check="frame")
    # 9 kB; decoding frame 201 took 10 s before the frame budget existed.
    add("animated GIF bomb (400 frames of 4000x4000)", "frame_bomb.gif", gif_frame_bomb(4000, 400),
        error=("GIF", "not accepted"))
    tiff = io.BytesIO()
    frames[0].save(tiff, format="TIFF", save_all=True, append_images=frames[1:])
    add("multi-page TIFF", "pages.tif", tiff.getvalue(), notes=("frame 3 of 5",), check="frame")
    # Only the first page was checked once: the middle one (169 megapixels) is the one decoded.
    add("TIFF with a 13000x13000 middle page", "pages_bomb.tif", tiff_pages([(64, 64), (13000, 13000), (64, 64)]),
        error=("page 2", "13000x13000", "megapixels"))
    # Within the pixel budget, but a strip no CT slice is (and costly for Grad-CAM).
    add("PNG 65000x615 (39 kB)", "strip.png", png_bomb(65000, 615), error=("65000x615", "8:1"))
    add("EPS (format not accepted)", "drawing.png", eps_bytes(), error=("EPS", "not accepted"))
    add("DICOM without pixel data", "report.dcm", dicom_bytes(None), error=("no pixel data",))
    from pydicom.uid import JPEGLSLossless
    add("DICOM needing a missing codec (JPEG-LS)", "jpegls.dcm",
        dicom_bytes(encapsulated=b"\xff\xd8\xff\xf7" + bytes(range(256)) * 4, syntax=JPEGLSLossless),
        error=("JPEG-LS", "codec", "not installed"))
    stack = np.stack([hu_slice(64, seed) for seed in range(5)])
    add("multi-frame DICOM", "multiframe.dcm", dicom_bytes(stack, frames=5), notes=("frame 3 of 5",),
        check="dicom-frame")
    add("good DICOM", "good.dcm", dicom_bytes(hu_slice(64)), notes=("lung window",))
    add("deflated DICOM", "deflated.dcm", deflated_dicom(hu_slice(64)), notes=("lung window",))
    # 256 MiB of zeros in a 1 MB file: pydicom inflates a deflated data set
    # whole before anything can look at it.
    add("deflated DICOM bomb (1 MB -> 256 MiB)", "deflate_bomb.dcm", deflated_dicom(hu_slice(64), 256 << 20),
        error=("deflated", "decompression bomb"))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8))
    big = png_bytes(noise, compress_level=0)
    assert len(big) > SMALL_FILE_LIMIT
    add("file over the upload limit", "huge.png", big, error=("limit", "MB"), needs_small_limit=True)
    add("good PNG", "good.png", good_png)
    add("good JPEG", "good.jpg", good_jpeg)
    assert tuple(c.name for c in cases) == BAD_INPUT_NAMES
    return cases


def check_decoded(case: BadInput, image) -> list[str]:
    """Problems with a successful decode of ``case`` ([] when fine)."""
    problems = []
    pixels = image.pixels
    if pixels.dtype != np.float32 or pixels.ndim != 2:
        problems.append(f"pixels are {pixels.dtype} {pixels.shape}, not 2-D float32")
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        problems.append("pixels not finite values in [0, 1]")
    if pixels.size and float(pixels.std()) < 0.02:
        problems.append("the picture is flat: its content was lost")
    joined = " | ".join(image.notes).lower()
    for word in case.notes:
        if word.lower() not in joined:
            problems.append(f"no note mentions {word!r} (notes: {image.notes})")
    if case.check == "16bit":
        # The 16-bit picture spans 1000..61000; scaled, it must use the whole
        # range and keep the picture (correlate with the source pattern).
        expected = ct_pattern(64)
        if not (pixels.min() <= 0.01 and pixels.max() >= 0.99):
            problems.append(f"16-bit values not spread over [0, 1]: {pixels.min()}..{pixels.max()}")
        if np.corrcoef(expected.ravel(), pixels.ravel())[0, 1] < 0.99:
            problems.append("16-bit picture does not match its source")
    if case.check in ("frame", "dicom-frame"):
        # The middle of five frames (seed 2) is the one used.
        corr = [np.corrcoef(ct_pattern(64, s).ravel(), pixels.ravel())[0, 1] for s in range(5)]
        if int(np.argmax(corr)) != 2:
            problems.append(f"not the middle frame: correlation with frames {np.round(corr, 3).tolist()}")
    return problems


def check_error(case: BadInput, message: str) -> list[str]:
    low = message.lower()
    return [f"message {message!r} does not mention {word!r}" for word in case.error or () if word.lower() not in low]


def try_bad_inputs(folder: Path) -> tuple[int, list[str]]:
    """Decode every case from its path and from its bytes; (cases, problems)."""
    import ctapp.imaging as imaging

    cases = bad_input_cases(folder)
    problems = []
    saved = imaging.MAX_FILE_BYTES
    try:
        for case in cases:
            # Over-limit cases under the small limit; the others under the real
            # one (the deflate bomb must be refused by its inflated size).
            imaging.MAX_FILE_BYTES = SMALL_FILE_LIMIT if case.needs_small_limit else saved
            for source in (case.path, case.path.read_bytes()):
                try:
                    image = imaging.decode(source)
                except imaging.ImageDecodeError as exc:
                    if case.error is None:
                        problems.append(f"{case.name}: failed: {exc}")
                    else:
                        problems += [f"{case.name}: {p}" for p in check_error(case, str(exc))]
                except Exception as exc:  # noqa: BLE001 - the point is to catch anything
                    problems.append(f"{case.name}: {type(exc).__name__} escaped decode: {exc}")
                else:
                    if case.error is not None:
                        problems.append(f"{case.name}: decoded although it must fail")
                    else:
                        problems += [f"{case.name}: {p}" for p in check_decoded(case, image)]
    finally:
        imaging.MAX_FILE_BYTES = saved
    return len(cases), problems


class TouchMarker:
    """Unpickling this object calls ``Path.touch(marker)``: pickled code that must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def run_predict_cli(files: list[Path], model_dir: Path, *, max_file_bytes: int | None = None,
                    json_lines: bool = True) -> subprocess.CompletedProcess:
    """``python -m ctapp.predict`` on ``files``, run in this process (so that the
    mutation run sees which tests reach the CLI; one test runs the real module
    in a child process); ``max_file_bytes`` lowers the upload limit meanwhile."""
    from ctapp import imaging, predict

    args = [*map(str, files), "--model", str(model_dir)] + (["--json"] if json_lines else [])
    stdout, stderr = io.StringIO(), io.StringIO()
    limit = imaging.MAX_FILE_BYTES
    try:
        if max_file_bytes is not None:
            imaging.MAX_FILE_BYTES = max_file_bytes
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            returncode = predict.run(args)
    finally:
        imaging.MAX_FILE_BYTES = limit
    return subprocess.CompletedProcess(["ctapp.predict", *args], returncode, stdout.getvalue(), stderr.getvalue())


# -------------------------------------------------------------------- fuzzing


def seed_files() -> dict[str, bytes]:
    """Small valid files to mutate: PNG (8- and 16-bit), JPEG, TIFF, BMP, DICOM."""
    grey = Image.fromarray(np.round(ct_pattern(32) * 255).astype(np.uint8))
    return {
        "png": png_bytes(grey),
        "png16": png_bytes(Image.fromarray((ct_pattern(32) * 65535).astype(np.uint16))),
        "jpeg": jpeg_bytes(grey, quality=80),
        "tiff": _saved(grey, "TIFF"),
        "bmp": _saved(grey, "BMP"),
        "dicom": dicom_bytes(hu_slice(32)),
        "dicom3": dicom_bytes(np.stack([hu_slice(32, s) for s in range(3)]), frames=3),
    }


def _saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Flip, overwrite, insert, delete or truncate a few bytes; sometimes
    poke interesting values into header fields."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        pos = rng.randrange(max(len(data), 1))
        if op == 0 and data:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3 and data:
            del data[pos:pos + rng.randint(1, 32)]
        elif op == 4:
            del data[rng.randint(0, len(data)):]
        elif op == 5 and len(data) > 4:
            value = rng.choice((0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)))
            pos = min(pos, len(data) - 4)
            data[pos:pos + 4] = struct.pack(rng.choice(("<I", ">I")), value)
    return bytes(data)


def decode_outcome(data: bytes) -> str:
    """'ok' or 'refused' for a decode that behaved; raises AssertionError when
    anything but ImageDecodeError escaped or a success is malformed."""
    from ctapp.imaging import ImageDecodeError, decode

    try:
        image = decode(data)
    except ImageDecodeError as exc:
        assert str(exc), "empty error message"
        return "refused"
    except BaseException as exc:
        raise AssertionError(f"{type(exc).__name__} escaped decode: {exc}") from exc
    pixels = image.pixels
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.float32 and pixels.ndim == 2, \
        (type(pixels), getattr(pixels, "dtype", None), getattr(pixels, "shape", None))
    assert np.isfinite(pixels).all(), "non-finite pixels"
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0, (pixels.min(), pixels.max())
    return "ok"


def fuzz_decode(cases: int, seed: int = 0) -> dict[str, int]:
    """Random and mutated inputs through ``decode`` (no hypothesis, for the
    benchmark); returns outcome counts. Raises AssertionError on a failure."""
    rng = random.Random(seed)
    seeds = list(seed_files().values())
    counts = {"ok": 0, "refused": 0}
    for i in range(cases):
        if i % 10 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 600)))
        elif i % 10 == 1:  # a valid magic number followed by junk
            head = rng.choice(seeds)[: rng.randint(4, 160)]
            data = head + bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        else:
            data = mutate(rng.choice(seeds), rng)
        counts[decode_outcome(data)] += 1
    return counts
