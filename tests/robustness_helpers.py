"""Builders and checks shared by the robustness tests and ``benchmarks/robustness.py``.

Everything here is plain functions over temporary folders, so the tests and the
benchmark exercise exactly the same cases:

* :func:`bad_input_cases` writes one file per awkward input (empty, text, PDF,
  truncated, decompression bombs, 1x1, 16-bit, palette, CMYK, animated, DICOM
  without pixels, with a missing codec, multi-frame, too large) and says what
  must happen to each;
* :func:`fuzz_decode` feeds ``decode`` random and mutated bytes;
* :func:`tiny_model` builds an untrained baseline :class:`LoadedModel`;
  :func:`hammer_model` shares it between threads;
* :func:`audit_writer` / :func:`hammer_audit_log` write the audit log from many
  threads and processes;
* :func:`train_cmd`, :func:`kill_during_training` and :func:`compare_runs`
  interrupt ``training.fit`` with SIGKILL and check what survives.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
PYTHON = sys.executable

# -------------------------------------------------------------------- bad inputs

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


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **extra}
    env.pop("CTAPP_MODELS_DIR", None)
    return env


# -------------------------------------------------------------------- fork server

_SERVER = r"""
import json, os, runpy, sys, threading, time, traceback
for name in sys.argv[1:]:
    __import__(name)
lock = threading.Lock()

def say(message):
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

def reap():
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(0.02)
            continue
        say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

threading.Thread(target=reap, daemon=True).start()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid:
        say({"started": pid, "id": job["id"]})
        continue
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(job["cwd"])
        exec(job.get("setup", ""), {})
        sys.argv = [job["module"], *job["argv"]]
        try:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
"""


class ForkServer:
    """Runs ``python -m MODULE ARGS`` equivalents fast: a server process imports
    ``preload`` once (torch takes ~7 s to import here) and forks a child per
    job, which runs the module as ``__main__`` through runpy, exactly as
    ``python -m`` does. Children are real processes: they can be killed with
    SIGKILL and report their exit status."""

    # Everything training.fit and ctapp.predict import, but not those modules
    # themselves: runpy runs them fresh as __main__.
    PRELOAD = ("ctapp.audit", "ctapp.evaluation", "ctapp.inference", "ctapp.metrics", "training.engine",
               "sklearn.model_selection", "sklearn.decomposition", "sklearn.covariance", "pydicom")

    def __init__(self, preload: tuple[str, ...] = PRELOAD, **env: str):
        import queue

        self.proc = subprocess.Popen([PYTHON, "-c", _SERVER, *preload], cwd=REPO, env=child_env(**env),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._started: queue.Queue = queue.Queue()
        self._exits: dict[int, int] = {}
        self._cond = threading.Condition()
        self._ids = iter(range(1 << 30))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if "started" in message:
                self._started.put(message["started"])
            else:
                with self._cond:
                    self._exits[message["exit"]] = message["code"]
                    self._cond.notify_all()

    def start(self, module: str, argv: list[str], logs: Path, setup: str = "") -> "ServerJob":
        logs.mkdir(parents=True, exist_ok=True)
        n = next(self._ids)
        job = {"id": n, "module": module, "argv": [str(a) for a in argv], "cwd": str(REPO), "setup": setup,
               "stdout": str(logs / f"job{n}.out"), "stderr": str(logs / f"job{n}.err")}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = self._started.get(timeout=120)
        return ServerJob(self, pid, Path(job["stdout"]), Path(job["stderr"]))

    def run(self, module: str, argv: list[str], logs: Path, setup: str = "", timeout: float = 300) -> "ServerJob":
        job = self.start(module, argv, logs, setup)
        job.wait(timeout)
        return job

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ServerJob:
    server: ForkServer
    pid: int
    stdout_path: Path
    stderr_path: Path
    returncode: int | None = None

    def poll(self) -> int | None:
        with self.server._cond:
            self.returncode = self.server._exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float = 300) -> int:
        with self.server._cond:
            if not self.server._cond.wait_for(lambda: self.pid in self.server._exits, timeout):
                raise TimeoutError(f"job {self.pid} still running after {timeout} s")
            self.returncode = self.server._exits[self.pid]
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


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


# -------------------------------------------------------------------- models and threads


def tiny_network(num_classes: int = 2, img_size: int = 48, seed: int = 0):
    """An untrained baseline CNN (seeded weights) and checkpoint metadata."""
    import torch

    from ctapp.models import create_model
    from ctapp.preprocess import PreprocessConfig, normalize

    torch.manual_seed(seed)
    model = create_model("baseline", num_classes)
    # Batch-norm statistics from a few CT-like pictures (fresh ones are 0/1,
    # which makes every image score about the same): outputs then differ
    # from image to image, so a mix-up between requests shows.
    config = PreprocessConfig(img_size=img_size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            batch = torch.stack([torch.from_numpy(np.float32(
                ct_pattern(img_size, s)))[None] for s in range(seed, seed + 16)])
            model(normalize(batch, config))
        model.classifier[1].weight.mul_(20.0)
    model.eval()
    meta = {"arch": "baseline", "class_names": [f"class{i}" for i in range(num_classes)],
            "preprocess": PreprocessConfig(img_size=img_size).to_dict(), "name": "tiny"}
    return model, meta


def tiny_model(num_classes: int = 2, img_size: int = 48, seed: int = 0):
    """An untrained baseline CNN as a LoadedModel."""
    from ctapp.inference import LoadedModel

    return LoadedModel(*tiny_network(num_classes, img_size, seed))


def write_model_folder(folder: Path, num_classes: int = 2, seed: int = 0) -> Path:
    """A model folder as training writes it: model.pt plus a model card that
    records the weights' SHA-256."""
    from ctapp.checkpoint import save_model_file, sha256_file

    model, meta = tiny_network(num_classes, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_model_file(folder / "model.pt", model, meta)
    card = {"name": folder.name, "classes": meta["class_names"], "weights_sha256": sha256_file(folder / "model.pt")}
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def sample_images(count: int, size: int = 64) -> list[np.ndarray]:
    """Distinct grey uint8 pictures (passed to predict/explain as arrays)."""
    return [np.round(ct_pattern(size, seed) * 255).astype(np.uint8) for seed in range(count)]


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@dataclass
class HammerResult:
    requests: int = 0
    predicts: int = 0
    explains: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)

    def growth(self, since: float) -> int:
        """RSS growth from the first sample at or after ``since`` seconds to the end."""
        base = next(b for t, b in self.rss if t >= since)
        return self.rss[-1][1] - base


def expected_results(loaded, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Single-threaded probabilities and Grad-CAMs of every image."""
    probs = [np.array(list(loaded.predict(img).probabilities.values())) for img in images]
    cams = [loaded.explain(img) for img in images]
    return probs, cams


def hammer_model(loaded, images: list[np.ndarray], *, threads: int = 8, seconds: float = 10.0,
                 warmup: float = 3.0, explain_every: int = 3, rtol: float = 1e-5, atol: float = 1e-6,
                 expected: tuple | None = None) -> HammerResult:
    """``threads`` threads call ``predict`` and ``explain`` on one shared model
    for ``warmup`` + ``seconds``; every answer is compared with the
    single-threaded one for the same image. RSS is sampled every 0.5 s; the
    same threads run the warm-up, so their allocator arenas and torch
    thread-local caches exist before the measured part."""
    expected_probs, expected_cams = expected or expected_results(loaded, images)
    result = HammerResult()
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + warmup + seconds

    def worker(k: int) -> None:
        n = 0
        while time.monotonic() < stop:
            i = (k * 7 + n) % len(images)
            try:
                if (n + k) % explain_every == 0:
                    got = loaded.explain(images[i])
                    ok = got.shape == expected_cams[i].shape and np.allclose(got, expected_cams[i], rtol=rtol, atol=atol)
                    what = "explain"
                else:
                    probs = np.array(list(loaded.predict(images[i]).probabilities.values()))
                    ok = np.allclose(probs, expected_probs[i], rtol=rtol, atol=atol)
                    what = "predict"
            except Exception as exc:  # noqa: BLE001
                with lock:
                    result.errors.append(f"thread {k}: {type(exc).__name__}: {exc}")
                return
            with lock:
                result.requests += 1
                result.explains += what == "explain"
                result.predicts += what == "predict"
                if not ok:
                    result.mismatches.append(f"thread {k}: {what} of image {i} differs from single-threaded")
            n += 1

    workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in workers:
        t.start()
    while any(t.is_alive() for t in workers):
        result.rss.append((time.monotonic() - start, rss_bytes()))
        time.sleep(0.5)
    for t in workers:
        t.join()
    result.rss.append((time.monotonic() - start, rss_bytes()))
    return result


# -------------------------------------------------------------------- audit log


def audit_writer(path: str, writer: str, count: int) -> int:
    """Write ``count`` records tagged ``writer``; returns how many were written.
    Runs in threads and in child processes."""
    from ctapp.store import Store

    log = Store(path)
    try:
        for i in range(count):
            log.record(model=f"model-{writer}", model_version="v1", image_sha256=f"{writer}:{i:06d}",
                       prediction="class0", probabilities={"class0": 0.75, "class1": 0.25},
                       flags=["low confidence"] if i % 2 else [])
    finally:
        log.close()
    return count


def _thread_group(path: str, prefix: str, threads: int, count: int) -> int:
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda k: audit_writer(path, f"{prefix}t{k}", count), range(threads)))


def hammer_audit_log(path: Path, *, processes: int = 4, threads: int = 4, count: int = 50) -> dict:
    """``processes`` processes each running ``threads`` writer threads (plus as
    many threads here) write ``count`` records each; then every record is
    checked (present once, intact) in a fresh connection."""
    from ctapp.store import Store

    path = Path(path)
    Store(path).close()  # create the schema before the race
    # fork: the children start at once (a spawned child would spend ~5 s importing
    # torch through ctapp/__init__); each opens its own connection, as a
    # separate server process would.
    ctx = get_context("fork")
    with ctx.Pool(processes) as pool:
        pending = [pool.apply_async(_thread_group, (str(path), f"p{p}", threads, count)) for p in range(processes)]
        here = _thread_group(str(path), "main", threads, count)
        written = here + sum(job.get(timeout=300) for job in pending)
    return {"written": written, **verify_audit_log(path, processes, threads, count)}


def _endless_writer(path: str, fd: int) -> None:
    """Child process: write records forever, reporting each committed id on ``fd``."""
    from ctapp.store import Store

    log = Store(path)
    i = 0
    while True:
        row_id = log.record(model="model-crash", model_version="v1", image_sha256=f"crash:{i:06d}",
                            prediction="class0", probabilities={"class0": 0.75, "class1": 0.25})
        os.write(fd, f"{row_id} crash:{i:06d}\n".encode())
        i += 1


def kill_audit_writer(path: Path, after: int = 100, timeout: float = 60) -> dict:
    """SIGKILL a process that is writing the log after it reported ``after``
    commits; then reopen the log (a restart) and check every reported
    record is there and the database is intact."""
    import sqlite3

    from ctapp.store import Store

    Store(path).close()
    read_fd, write_fd = os.pipe()
    child = get_context("fork").Process(target=_endless_writer, args=(str(path), write_fd), daemon=True)
    child.start()
    os.close(write_fd)
    reported, buffer = [], b""
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while len(reported) < after and time.monotonic() < deadline:
            chunk = pipe.read(4096)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            reported += [line.decode().split()[1] for line in lines]
        os.kill(child.pid, signal.SIGKILL)  # mid-write: it never stops writing
        child.join(10)
    log = Store(path)  # the restart
    try:
        stored = {r["image_sha256"] for r in log.diagnoses(model="model-crash", limit=10**9)}
        after_restart = log.record(model="model-restart", model_version="v1", image_sha256="restart",
                                   prediction="class0", probabilities={"class0": 1.0})
    finally:
        log.close()
    with sqlite3.connect(path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    return {"reported": len(reported), "stored": len(stored), "lost": len(set(reported) - stored),
            "integrity": integrity, "writable_after_restart": after_restart > 0, "exitcode": child.exitcode}


def verify_audit_log(path: Path, processes: int, threads: int, count: int) -> dict:
    """Reopen the log (as after a restart) and check every expected record."""
    import sqlite3

    from ctapp.store import Store

    log = Store(path)
    try:
        stored = log.count()
        rows = [(r["image_sha256"], r["model"], r["probabilities"], r["flags"], r["confidence"])
                for r in log.diagnoses(limit=10**9)]
    finally:
        log.close()
    expected = {f"{prefix}t{k}:{i:06d}" for prefix in [f"p{p}" for p in range(processes)] + ["main"]
                for k in range(threads) for i in range(count)}
    seen = [r[0] for r in rows]
    corrupt = 0
    for sha, model, probs, flags, confidence in rows:
        try:
            ok = (model == f"model-{sha.split(':')[0]}" and json.loads(probs) == {"class0": 0.75, "class1": 0.25}
                  and isinstance(json.loads(flags), list) and confidence == 0.75)
        except (ValueError, IndexError):
            ok = False
        corrupt += not ok
    with sqlite3.connect(path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    return {"stored": stored, "lost": len(expected - set(seen)), "duplicated": len(seen) - len(set(seen)),
            "unexpected": len(set(seen) - expected), "corrupt": corrupt, "integrity": integrity}


# -------------------------------------------------------------------- interrupted training

# 32 px (the smallest size), one thread: an epoch of 24 images takes ~0.5 s;
# a process spends ~7 s importing torch before it trains.
# Batch size 4, seed 3: validation macro-F1 improves at epochs 1 and 5 of 6,
# so best.pt is rewritten mid-run and model.pt is not simply epoch 1.
TRAIN_ARGS = ["--arch", "baseline", "--img-size", "32", "--batch-size", "4", "--workers", "1",
              "--weight-storage", "fp32", "--seed", "3", "--quiet"]


def make_tiny_dataset(root: Path, classes: tuple[str, ...] = ("alpha", "beta"), train: int = 12,
                      valid: int = 4) -> Path:
    from tests.synthetic import make_split_dataset

    return make_split_dataset(root, list(classes), train=train, valid=valid)


def train_cmd(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [PYTHON, "-m", "training.fit", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            *TRAIN_ARGS, *extra]


def fit_argv(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--epochs", str(epochs), *TRAIN_ARGS, *extra]


def run_training(data: Path, out: Path, epochs: int, *extra: str, server: "ForkServer | None" = None,
                 timeout: float = 300):
    """``python -m training.fit`` to the end: a CompletedProcess, or with
    ``server`` a finished ServerJob (same returncode/stdout/stderr)."""
    if server is not None:
        return server.run("training.fit", fit_argv(data, out, epochs, *extra), out.parent / "logs", timeout=timeout)
    return subprocess.run(train_cmd(data, out, epochs, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env())


def temp_files(out: Path, names: tuple[str, ...] = ("last.pt", "best.pt", "model.pt")) -> list[Path]:
    """Temporary files of atomic writes in progress (or left by a killed writer)."""
    try:
        return [p for p in out.iterdir() if p.name.endswith(".tmp") and p.name.startswith(tuple(f".{n}." for n in names))]
    except FileNotFoundError:
        return []


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@dataclass
class KillReport:
    kills: int = 0
    kills_during_write: int = 0
    finished_early: int = 0
    checkpoints_checked: int = 0
    checkpoints_lost: int = 0
    leftover_temp_files: int = 0
    moments: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_checkpoints(out: Path, epochs: int) -> tuple[dict[str, int], list[str]]:
    """Load the checkpoints in ``out``: best.pt as a model, last.pt as training
    state. Returns ({name: epoch} of those that load, problems)."""
    from ctapp.checkpoint import CheckpointError, load_model_file, safe_load

    loaded, problems = {}, []
    if (out / "best.pt").exists():
        try:
            _, meta = load_model_file(out / "best.pt", arch="baseline", num_classes=2)
            loaded["best.pt"] = int(meta["epoch"])
        except CheckpointError as exc:
            problems.append(f"best.pt does not load: {exc}")
    if (out / "last.pt").exists():
        try:
            state = safe_load(out / "last.pt")
            done = int(state["state"]["epoch"])
            if not 1 <= done <= epochs or len(state["state"]["history"]) != done:
                problems.append(f"last.pt is inconsistent: epoch {done}, {len(state['state']['history'])} history rows")
            loaded["last.pt"] = done
        except (CheckpointError, KeyError, TypeError) as exc:
            problems.append(f"last.pt does not load: {exc}")
    return loaded, problems


KILL_MOMENTS = ("writing last.pt", "mid-epoch", "writing a checkpoint", "mid-epoch", "writing model.pt")


def kill_during_training(server: ForkServer, data: Path, out: Path, epochs: int, *,
                         moments: tuple[str, ...] = KILL_MOMENTS, seed: int = 0, timeout: float = 240) -> KillReport:
    """Start (or resume) training and SIGKILL it at each moment in turn;
    after every kill, the checkpoints present before must still be there and
    load, and never go back in epochs.

    Moments: 'writing last.pt' / 'writing a checkpoint' / 'writing model.pt':
    as soon as that atomic write's temporary file appears (the file is being
    written); 'mid-epoch': a random 0-0.6 s after this attempt's first
    last.pt, i.e. somewhere in the next epoch."""
    rng = random.Random(seed)
    report = KillReport()
    deadline = time.monotonic() + timeout
    targets = {"writing last.pt": ("last.pt",), "writing a checkpoint": ("last.pt", "best.pt"),
               "writing model.pt": ("model.pt",)}
    before: dict[str, int] = {}
    for moment in moments:
        if time.monotonic() > deadline:
            report.problems.append("ran out of time")
            break
        stale = set(temp_files(out))
        resume = ["--resume"] if (out / "last.pt").exists() else []
        proc = server.start("training.fit", fit_argv(data, out, epochs, *resume), out.parent / "logs")
        last_seen, kill_at, killed = _mtime(out / "last.pt"), None, False
        while proc.poll() is None and time.monotonic() < deadline:
            if moment in targets:
                if set(temp_files(out, targets[moment])) - stale:
                    proc.kill()
                    killed = True
                    break
                time.sleep(0.001)
            else:
                if kill_at is None and _mtime(out / "last.pt") != last_seen:
                    kill_at = time.monotonic() + rng.uniform(0.0, 0.6)
                if kill_at is not None and time.monotonic() >= kill_at:
                    proc.kill()
                    killed = True
                    break
                time.sleep(0.01)
        proc.wait(timeout=60)
        stderr = proc.stderr
        if killed and proc.returncode == -signal.SIGKILL:
            report.kills += 1
            during = bool(set(temp_files(out)) - stale)  # its temp file is left: killed mid-write
            report.kills_during_write += during
            report.moments.append(moment + (" (temp file left: mid-write)" if during else ""))
        elif proc.returncode == 0:
            report.finished_early += 1
            report.moments.append(f"{moment}: finished before the kill")
            break
        else:
            report.problems.append(f"training exited {proc.returncode}: {stderr[-2000:]}")
            break
        loaded, problems = check_checkpoints(out, epochs)
        report.checkpoints_checked += len(loaded)
        report.problems += problems
        for name, epoch in before.items():
            if name not in loaded:
                report.checkpoints_lost += 1
                report.problems.append(f"{name} (epoch {epoch}) was lost by the kill '{moment}'")
            elif loaded[name] < epoch:
                report.checkpoints_lost += 1
                report.problems.append(f"{name} went back from epoch {epoch} to {loaded[name]}")
        before = loaded
    report.leftover_temp_files = len(temp_files(out))
    return report


@dataclass
class BadDataset:
    name: str
    data: Path
    args: tuple[str, ...]
    words: tuple[str, ...]  # the error line must contain these (case insensitive)
    out: Path | None = None  # an output folder prepared beforehand


def bad_datasets(root: Path) -> list[BadDataset]:
    """Datasets and settings on which training must stop with a clear message."""
    import shutil

    good = make_tiny_dataset(root / "good")
    empty = root / "empty_class"
    shutil.copytree(good, empty)
    for split in ("train", "valid"):
        (empty / split / "gamma").mkdir()
    one = make_tiny_dataset(root / "one_class", classes=("alpha",))
    unreadable = root / "unreadable"
    for split in ("train", "valid"):
        for name in ("alpha", "beta"):
            folder = unreadable / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{name} ({i}).png").write_bytes(b"not an image " * (i + 1))
    few = root / "four_images"
    for name in ("alpha", "beta"):
        (few / name).mkdir(parents=True)
        for src in sorted((good / "train" / name).iterdir())[:2]:
            shutil.copy(src, few / name / src.name)
    other_run = root / "other_run"
    other_run.mkdir()
    import torch

    torch.save({"arch": "resnet50", "class_names": ["alpha", "beta"], "model": {}, "optimizer": {}, "state": {}},
               other_run / "last.pt")
    return [
        BadDataset("loss becomes NaN", good, ("--lr", "1e30"), ("loss became", "diverged", "--lr")),
        BadDataset("empty class folder", empty, (), ("gamma", "no")),
        BadDataset("one class", one, (), ("2 classes",)),
        BadDataset("no readable images", unreadable, (), ("readable images",)),
        BadDataset("no such data folder", root / "missing", (), ("no such folder",)),
        BadDataset("four images in all", few, (), ("4", "images")),
        BadDataset("resume another run", good, ("--resume",), ("resnet50", "cannot resume"), out=other_run),
    ]


def final_weights(out: Path) -> dict:
    from ctapp.checkpoint import load_model_file

    model, meta = load_model_file(out / "model.pt")
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "meta": meta}


def compare_runs(a: Path, b: Path, *, atol: float = 0.0) -> list[str]:
    """Differences between two finished runs: the final epoch's weights and
    optimizer state (last.pt), the stored model (model.pt: best epoch, after
    calibration), its metadata and the per-epoch history."""
    import torch

    from ctapp.checkpoint import safe_load

    problems = []

    def compare(name: str, x, y) -> None:
        if isinstance(x, dict):
            if set(x) != set(y):
                problems.append(f"{name}: keys differ")
                return
            for key in x:
                compare(f"{name}.{key}", x[key], y[key])
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y):
                problems.append(f"{name}: lengths differ")
                return
            for i, (u, v) in enumerate(zip(x, y)):
                compare(f"{name}[{i}]", u, v)
        elif isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                problems.append(f"{name}: shapes differ")
            elif x.is_floating_point():
                diff = float((x - y).abs().max()) if x.numel() else 0.0
                if diff > atol:
                    problems.append(f"{name} differs by {diff:.3g}")
            elif not torch.equal(x, y):
                problems.append(f"{name} differs")
        elif x != y and not (isinstance(x, float) and abs(x - y) <= atol):
            problems.append(f"{name}: {x!r} != {y!r}")

    la, lb = safe_load(a / "last.pt"), safe_load(b / "last.pt")
    compare("last.pt model", la["model"], lb["model"])
    compare("last.pt optimizer", la["optimizer"], lb["optimizer"])
    for key in ("epoch", "best_f1", "best_epoch", "stale"):
        compare(f"last.pt state.{key}", la["state"][key], lb["state"][key])
    wa, wb = final_weights(a), final_weights(b)
    compare("model.pt weights", wa["state"], wb["state"])
    for key in ("epoch", "metrics", "temperature", "ood"):
        compare(f"model.pt {key}", wa["meta"].get(key), wb["meta"].get(key))
    ha, hb = _history(a), _history(b)
    if ha != hb:
        problems.append(f"history differs:\n{ha}\nvs\n{hb}")
    return problems


def _history(out: Path) -> list[dict]:
    """history.csv without the timing columns (seconds, speed)."""
    lines = (out / "history.csv").read_text().strip().splitlines()
    names = lines[0].split(",")
    keep = [i for i, n in enumerate(names) if n not in ("seconds", "images_per_second")]
    return [{names[i]: row.split(",")[i] for i in keep} for row in lines[1:]]
