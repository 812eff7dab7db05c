"""Whole CT series and volumes: reading, ordering, orienting, and classifying
them slice by slice in batches.

Inputs are named byte strings (an upload, a file of a folder, a member of a
zip): loose DICOM files of one or several series mixed (with or without
extensions, in any order), multi-frame and enhanced CT DICOM, ``.zip``
archives of any of these, NIfTI volumes (``.nii``, ``.nii.gz``; read by
nibabel) and single PNG/JPEG/TIFF/BMP slices. The content decides, never the
file name.

* DICOM files are grouped by SeriesInstanceUID. Slices are ordered by
  ImagePositionPatient projected on the slice normal (InstanceNumber only when
  no slice has a position): **slice 0 is the most superior**, then toward the
  feet (for coronal series the most anterior, for sagittal ones the patient's
  right).
* Every volume is turned, by axis permutations and flips only (nibabel's
  orientation tools on the DICOM- or NIfTI-derived affine), to radiological
  display: patient's right on the image's left, anterior up (axial), head up
  (coronal, sagittal). A NIfTI written from a DICOM series comes out as the
  DICOM does.
* Hounsfield units come from pydicom's modality LUT (rescale slope and
  intercept, signed or unsigned stored values; per frame for enhanced CT);
  the model sees them through its own window, exactly as a single DICOM
  slice (``ctapp.imaging``). Compressed syntaxes (JPEG Lossless, JPEG-LS,
  JPEG 2000, RLE) are decoded by pydicom's pixel-data plugins (pylibjpeg
  with its libjpeg, openjpeg and rle codecs).
* Limits (:class:`Limits`) bound slices, bytes, zip members and expanded size
  before anything large is held; a series with slices of several sizes or
  with positions on only some slices is refused with its reason, and the
  other inputs are still read.
* Nothing from the headers is kept for display but the modality, sizes and
  spacing; a series is named by an opaque short id (a hash of its UID), and
  the UIDs needed to reference it in a DICOM SR are kept apart
  (:class:`SeriesReference`), never shown.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
import time
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import torch

from . import imaging
from .imaging import (
    MAX_SIDE,
    MIN_SIDE,
    ImageDecodeError,
    Slice,
    Window,
    decode,
    dicom_colour_to_grey,
    dicom_pixels,
    is_dicom,
    read_dicom,
)
from .inference import CONFIDENT, LOW_CONFIDENCE, NOT_CHEST_CT, UNLIKE_TRAINING, EnsembleModel, Prediction, slice_notes
from .metrics import NEGATIVE_NAME
from .preprocess import to_square
from .report import csv_text

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class SeriesError(ValueError):
    """An input or a series that cannot be read (the message says why)."""


@dataclass(frozen=True)
class Limits:
    """What one read accepts. Everything is checked before the data it bounds
    is decompressed or decoded."""

    max_slices: int = 1000  # per series
    max_voxels: int = 1000 * 512 * 512  # per series: 1000 slices of 512x512 (int16: 0.5 GB)
    max_total_bytes: int = 1 << 30  # everything read, zip members expanded
    max_zip_members: int = 5000
    max_expanded_bytes: int = 1 << 30  # one zip's members, as inflated
    max_series: int = 20
    max_images: int = 200  # loose PNG/JPEG/... slices


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Input:
    """One named file: an upload, a file of a folder or a member of a zip."""

    name: str  # shown to the user: relative path (untrusted text)
    data: bytes = field(repr=False)
    error: str = ""  # why it could not even be read (too large, missing)


@dataclass(frozen=True)
class ReadError:
    name: str  # the input (for a series: its first file)
    message: str
    series: str | None = None  # the series id, for an error of a whole series


@dataclass(frozen=True)
class SeriesReference:
    """UIDs of a DICOM series and its instances, kept only to reference the
    source series in a DICOM Structured Report; never shown or logged."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    instances: tuple[tuple[str, str, int | None], ...]  # per slice in reading order: SOP class, SOP instance, frame


@dataclass
class Series:
    """Slices in reading order, right way up. ``values`` holds Hounsfield units
    (``is_hu``) or grey in [0, 1] (PNG/JPEG stacks, colour DICOM); a stack of
    loose images of several sizes is a list of 2-D arrays."""

    id: str  # opaque short id, e.g. "S-3fa9c2d1"
    kind: str  # "DICOM", "NIfTI" or "images"
    values: np.ndarray | list[np.ndarray] = field(repr=False)
    sources: list[str]  # per slice: the file (a zip member "a.zip:dir/IM1"; a volume "vol.nii.gz")
    is_hu: bool = True
    positions: list[float | None] = field(default_factory=list)  # mm along the reading direction
    spacing: tuple[float, float] | None = None  # in-plane pixel spacing (row, column), mm
    modality: str = ""
    orientation: str = ""  # "axial", "coronal", "sagittal" or ""
    notes: list[str] = field(default_factory=list)
    reference: SeriesReference | None = field(default=None, repr=False)
    slice_notes: list[list[str]] = field(default_factory=list)  # per slice (loose images: how each was read)
    digest: str = ""  # content hash of the values: a cache key

    def __len__(self) -> int:
        return len(self.values)

    @property
    def shape(self) -> tuple[int, int] | None:
        """(rows, columns) when every slice has the same size."""
        shapes = {tuple(v.shape) for v in self.values} if isinstance(self.values, list) else {self.values.shape[1:]}
        return next(iter(shapes)) if len(shapes) == 1 else None

    def slice_name(self, index: int) -> str:
        """How a slice is named on screen and in CSV: its relative path for a
        stack of loose images, series and slice number otherwise."""
        if self.kind == "images":
            return self.sources[index]
        return f"{self.id} / slice {index + 1} of {len(self)}"

    def description(self) -> str:
        """Modality, size and spacing: nothing that identifies a patient."""
        if self.kind == "images":
            parts = [f"{len(self)} loose slice{'s' if len(self) != 1 else ''}"]
        else:
            parts = [self.modality or self.kind, f"{len(self)} {self.orientation + ' ' if self.orientation else ''}slices"]
        shape = self.shape
        if shape:
            parts.append(f"{shape[1]}x{shape[0]} px")
        step = self.slice_step()
        if step:
            parts.append(f"{step:.2g} mm apart")
        return ", ".join(parts)

    def slice_step(self) -> float | None:
        known = [p for p in self.positions if p is not None]
        if len(known) < 2 or len(known) != len(self.positions):
            return None
        return float(np.median(np.abs(np.diff(known))))

    def slice(self, index: int, window: Window) -> Slice:
        """Slice ``index`` as the single-slice decoder gives it: grey in [0, 1]
        through ``window`` (Hounsfield units kept for re-windowing)."""
        values = self.values[index]
        notes = list(self.slice_notes[index]) if self.slice_notes else []
        if not self.is_hu:
            return Slice(np.asarray(values, np.float32), self.kind, notes, mode=self.kind)
        hu = np.asarray(values, np.float32)
        return Slice(window.apply(hu), self.kind, notes, hu=hu, mode=self.kind)


@dataclass
class ReadResult:
    """Everything one read found: series (DICOM series, volumes, and a stack of
    the loose images) and per-input or per-series errors."""

    series: list[Series] = field(default_factory=list)
    errors: list[ReadError] = field(default_factory=list)
    # The loose images in input order, as (input name, decoded slice): the
    # command line and the diagnosis page classify them one by one.
    images: list[tuple[str, Slice]] = field(default_factory=list)
    order: list[tuple[str, str]] = field(default_factory=list)  # ("series"|"image"|"error", key) by first input
    origin: dict[tuple[str, str], int] = field(default_factory=dict)  # order entry -> index of its (first) input


# --------------------------------------------------------------------------- reading inputs


def _series_id(text: str) -> str:
    return "S-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def _is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def _is_gzip(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b"


def _nifti_version(header: bytes) -> int | None:
    """1 or 2 for a single-file NIfTI-1/-2 header (either byte order), else None."""
    def sized(n: int) -> bool:
        return n in (int.from_bytes(header[:4], "little"), int.from_bytes(header[:4], "big"))

    if len(header) >= 348 and header[344:348] == b"n+1\0" and sized(348):
        return 1
    if len(header) >= 540 and header[4:8] == b"n+2\0" and sized(540):
        return 2
    return None


class _Budget:
    """Bytes read so far against ``Limits.max_total_bytes``."""

    def __init__(self, limits: Limits):
        self.limits, self.used = limits, 0

    def take(self, size: int, what: str) -> None:
        self.used += size
        if self.used > self.limits.max_total_bytes:
            raise SeriesError(f"{what}: the inputs add up to more than {_mb(self.limits.max_total_bytes)}, "
                              "more than one read accepts; upload fewer series at a time")


def _mb(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def expand_zip(item: Input, limits: Limits, budget: _Budget) -> list[Input]:
    """The members of a zip archive, counted and size-checked as they are
    inflated (the sizes its directory claims are not trusted); folders,
    hidden files and archives inside archives are skipped."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(item.data))
    except (zipfile.BadZipFile, OSError, ValueError):
        raise SeriesError(f"{item.name}: the zip archive is damaged or incomplete") from None
    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > limits.max_zip_members:
        raise SeriesError(f"{item.name}: the archive holds {len(members)} files; at most {limits.max_zip_members} "
                          "are read from one archive")
    out, expanded = [], 0
    for member in members:
        name = member.filename
        parts = PurePosixPath(name).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts) or PurePosixPath(name).name.upper() == "DICOMDIR":
            continue
        if member.flag_bits & 0x1:
            raise SeriesError(f"{item.name}: the archive is encrypted; export it without a password")
        chunks = []
        try:
            with archive.open(member) as stream:
                while chunk := stream.read(1 << 20):
                    expanded += len(chunk)
                    if expanded > limits.max_expanded_bytes:
                        raise SeriesError(
                            f"{item.name}: the archive expands to more than {_mb(limits.max_expanded_bytes)} "
                            "(a possible zip bomb); nothing of it was read")
                    if sum(map(len, chunks)) + len(chunk) > imaging.MAX_FILE_BYTES:
                        raise SeriesError(f"{item.name}: member {name} is larger than "
                                          f"{_mb(imaging.MAX_FILE_BYTES)}")
                    chunks.append(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError):
            log.info("zip member unreadable", exc_info=True)
            raise SeriesError(f"{item.name}: the archive is damaged or uses an unsupported compression") from None
        data = b"".join(chunks)
        budget.take(len(data), item.name)
        out.append(Input(f"{item.name}:{name}", data))
    return out


@dataclass
class _Frame:
    """One slice of a DICOM file before grouping: where it is and how to decode it."""

    source: str
    dataset: object = field(repr=False)
    frame: int | None  # None: a single-frame file
    series_uid: str
    position: np.ndarray | None  # ImagePositionPatient (mm, LPS)
    orientation: np.ndarray | None  # ImageOrientationPatient: row then column direction cosines
    spacing: tuple[float, float] | None
    rescale: tuple[float, float] | None  # enhanced CT per-frame slope/intercept; None: the dataset's own
    instance: int
    shape: tuple[int, int]


def _floats(value, n: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (n,) and np.isfinite(array).all() else None


def _group_value(dataset, frame: int, sequence: str, attribute: str):
    """An attribute of an enhanced multi-frame file: per-frame functional
    group first, then the shared one."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = dataset.get(groups)
        if items is None or len(items) <= index:
            continue
        inner = items[index].get(sequence)
        if inner and attribute in inner[0]:
            return inner[0].get(attribute)
    return None


def dicom_frames(item: Input, dataset) -> list[_Frame]:
    """The slices of one DICOM file, each with its geometry."""
    rows, cols = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if min(rows, cols) < MIN_SIDE or max(rows, cols) > MAX_SIDE:
        raise SeriesError(f"{item.name}: slices of {cols}x{rows} pixels are outside what this app reads "
                          f"({MIN_SIDE} to {MAX_SIDE} pixels a side)")
    series_uid = str(dataset.get("SeriesInstanceUID", "") or "")
    instance = int(dataset.get("InstanceNumber", 0) or 0)
    n_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    spacing = _floats(dataset.get("PixelSpacing") or [], 2)
    enhanced = "PerFrameFunctionalGroupsSequence" in dataset or "SharedFunctionalGroupsSequence" in dataset
    if n_frames == 1 and not enhanced:
        return [_Frame(item.name, dataset, None, series_uid, _floats(dataset.get("ImagePositionPatient") or [], 3),
                       _floats(dataset.get("ImageOrientationPatient") or [], 6),
                       tuple(spacing) if spacing is not None else None, None, instance, (rows, cols))]
    frames = []
    for k in range(n_frames):
        position = _group_value(dataset, k, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _group_value(dataset, k, "PlaneOrientationSequence", "ImageOrientationPatient")
        if orientation is None:
            orientation = dataset.get("ImageOrientationPatient")
        frame_spacing = _group_value(dataset, k, "PixelMeasuresSequence", "PixelSpacing") or dataset.get("PixelSpacing")
        slope = _group_value(dataset, k, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(dataset, k, "PixelValueTransformationSequence", "RescaleIntercept")
        sp = _floats(frame_spacing or [], 2)
        frames.append(_Frame(
            item.name, dataset, k if n_frames > 1 else None, series_uid, _floats(position or [], 3), _floats(orientation or [], 6),
            tuple(sp) if sp is not None else None,
            (float(slope), float(intercept)) if slope is not None and intercept is not None else None,
            instance * 100000 + k, (rows, cols)))
    return frames


def read_inputs(inputs: Iterable[Input], *, limits: Limits = DEFAULT_LIMITS, window: Window | None = None,
                ) -> ReadResult:
    """Sort named files into series, volumes and loose images and read them.

    A file or series that cannot be read is an entry of ``errors``; the rest
    are still read. ``window`` only decodes the loose images (as the model
    will see them); series keep Hounsfield units.
    """
    result = ReadResult()
    budget = _Budget(limits)
    frames_by_series: dict[str, list[_Frame]] = {}
    window = window or Window()
    queue: list[tuple[Input, bool, int]] = [(item, False, i) for i, item in enumerate(inputs)]
    top = 0

    def add(kind: str, key: str) -> None:
        result.order.append((kind, key))
        result.origin.setdefault((kind, key), top)

    def fail(name: str, message: str, series: str | None = None) -> None:
        message = re.sub(r"^upload: ", "", message)
        if not message.startswith(series or name):
            message = f"{series or name}: {message}"
        result.errors.append(ReadError(name, message, series))
        add("error", series or name)

    series_origin: dict[str, int] = {}
    while queue:
        item, from_zip, top = queue.pop(0)
        try:
            if item.error:
                raise SeriesError(item.error)
            if not from_zip:
                budget.take(len(item.data), item.name)
            if not item.data:
                raise SeriesError(f"{item.name}: the file is empty")
            if _is_zip(item.data):
                if from_zip:
                    raise SeriesError("an archive inside an archive is not opened; unpack it first")
                members = expand_zip(item, limits, budget)
                if not members:
                    raise SeriesError(f"{item.name}: the archive holds no files")
                queue[0:0] = [(m, True, top) for m in members]
                continue
            if len(item.data) > imaging.MAX_FILE_BYTES:
                raise SeriesError(f"{item.name}: the file is {_mb(len(item.data))}; the limit is "
                                  f"{_mb(imaging.MAX_FILE_BYTES)}")
            nifti = _nifti_bytes(item)
            if nifti is not None:
                series = read_nifti(item.name, nifti, limits)
                result.series.append(series)
                add("series", series.id)
                continue
            if is_dicom(item.data):
                try:
                    dataset = read_dicom(item.data)
                except ImageDecodeError as exc:
                    raise SeriesError(f"{item.name}: {exc}") from None
                frames = dicom_frames(item, dataset)
                uid = frames[0].series_uid or f"file:{item.name}"
                if uid not in frames_by_series:
                    if len(frames_by_series) >= limits.max_series:
                        raise SeriesError(f"more than {limits.max_series} series in one read; this file's series "
                                          "was not read")
                    add("series", _series_id(uid))
                    series_origin[uid] = top
                frames_by_series.setdefault(uid, []).extend(frames)
                continue
            if len(result.images) >= limits.max_images:
                raise SeriesError(f"more than {limits.max_images} loose images; this one was not read")
            result.images.append((item.name, decode(item.data, window=window)))
            add("image", item.name)
        except (SeriesError, ImageDecodeError) as exc:
            fail(item.name, str(exc))
    for uid, frames in frames_by_series.items():
        sid = _series_id(uid)
        try:
            result.series.append(build_dicom_series(sid, frames, limits))
        except (SeriesError, ImageDecodeError) as exc:
            place = result.order.index(("series", sid))
            top = series_origin[uid]
            fail(frames[0].source, str(exc), sid)
            result.order[place] = result.order.pop()
    return result


def inputs_from_paths(paths: Iterable, limits: Limits = DEFAULT_LIMITS) -> list[Input]:
    """Files as :class:`Input` (named by their path), sizes checked before
    anything is read; a file that cannot be read carries its error."""
    out, total = [], 0
    for path in paths:
        name = str(path)
        try:
            if not path.is_file():
                out.append(Input(name, b"", f"{name}: {'not a file' if path.exists() else 'no such file'}"))
                continue
            size = path.stat().st_size
            total += size
            if total > limits.max_total_bytes:
                out.append(Input(name, b"", f"{name}: the inputs add up to more than "
                                            f"{_mb(limits.max_total_bytes)}; this file was not read"))
                continue
            if size > max(imaging.MAX_FILE_BYTES, limits.max_expanded_bytes):
                out.append(Input(name, b"", f"{name}: the file is {_mb(size)}, larger than this app reads"))
                continue
            out.append(Input(name, path.read_bytes()))
        except OSError as exc:
            out.append(Input(name, b"", f"{name}: the file could not be read ({type(exc).__name__})"))
    return out


def holds_series(items: Iterable[tuple[str, bytes]]) -> bool:
    """Whether named uploads hold a series or volume (a zip, a NIfTI volume, a
    multi-frame DICOM, or two DICOM files or more), from their first bytes."""
    dicom = 0
    for _name, data in items:
        if _is_zip(data) or _nifti_version(data[:540]) is not None:
            return True
        if _is_gzip(data) and _nifti_bytes(Input("", data)) is not None:
            return True
        if is_dicom(data):
            dicom += 1
            if dicom > 1 or _frame_count(data) > 1:
                return True
    return False


def _frame_count(data: bytes) -> int:
    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["NumberOfFrames"])
        return int(header.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - an unreadable header is reported when the file is read
        return 1


# --------------------------------------------------------------------------- DICOM series


# Display orientation per acquisition plane, as nibabel axis codes of the
# array axes (slice, row, column) in RAS+ patient space: slice 0 most
# superior (axial), most anterior (coronal) or the patient's right
# (sagittal); rows run to the patient's back or feet; columns run to the
# patient's left (axial, coronal) or back (sagittal).
DISPLAY_CODES = {"axial": ("I", "P", "L"), "coronal": ("P", "I", "L"), "sagittal": ("L", "I", "P")}
_PLANE_OF_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}


def _reorient(volume: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, str, bool, bool]:
    """``volume`` (slice, row, column) with its RAS+ affine turned to the
    display orientation of its plane by permutations and flips (nibabel).
    Returns the volume, the plane, whether the slice order was reversed and
    whether rows and columns were swapped."""
    import nibabel.orientations as nio

    current = nio.io_orientation(affine_ras)
    plane = _PLANE_OF_AXIS[int(current[0, 0])]
    target = nio.axcodes2ornt(DISPLAY_CODES[plane])
    transform = nio.ornt_transform(current, target)
    if int(transform[0, 0]) != 0:  # the target is chosen from axis 0's own direction
        raise SeriesError("the slice geometry is inconsistent: the slices cannot be put in reading order")
    volume = np.ascontiguousarray(nio.apply_orientation(volume, transform))
    return volume, plane, bool(transform[0, 1] < 0), int(transform[1, 0]) == 2


def build_dicom_series(series_id: str, frames: list[_Frame], limits: Limits) -> Series:
    """Order, decode, rescale and orient the slices of one series."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    n = len(frames)
    if n > limits.max_slices:
        raise SeriesError(f"{n} slices; at most {limits.max_slices} are read from one series")
    shapes: dict[tuple[int, int], int] = {}
    for f in frames:
        shapes[f.shape] = shapes.get(f.shape, 0) + 1
    if len(shapes) > 1:
        listed = ", ".join(f"{c}x{r} ({k} slices)" for (r, c), k in sorted(shapes.items(), key=lambda s: -s[1]))
        raise SeriesError(f"slices of different sizes in one series: {listed}; it cannot be read as a volume")
    rows, cols = frames[0].shape
    if n * rows * cols > limits.max_voxels:
        raise SeriesError(f"{n} slices of {cols}x{rows} pixels ({n * rows * cols / 1e6:.0f} megavoxels); at most "
                          f"{limits.max_voxels / 1e6:.0f} megavoxels are read from one series")
    notes: list[str] = []
    located = [f for f in frames if f.position is not None and f.orientation is not None]
    if located and len(located) < n:
        raise SeriesError(f"{n - len(located)} of {n} slices have no position (ImagePositionPatient / "
                          "ImageOrientationPatient): the reading order cannot be established")
    if located:
        row_dir, col_dir = located[0].orientation[:3], located[0].orientation[3:]
        normal = np.cross(row_dir, col_dir)
        if not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
            raise SeriesError("the slice orientation (ImageOrientationPatient) is not a valid pair of directions")
        normal /= np.linalg.norm(normal)
        if any(np.abs(f.orientation - located[0].orientation).max() > 1e-3 for f in frames):
            raise SeriesError("the slices do not all have the same orientation: not one volume")
        distance = np.array([float(f.position @ normal) for f in frames])
        order = np.lexsort((np.array([f.instance for f in frames]), distance))
        frames = [frames[i] for i in order]
        distance = distance[order]
        if len(np.unique(np.round(distance, 3))) < n:
            notes.append(f"{n - len(np.unique(np.round(distance, 3)))} slices share a position with another slice")
    else:
        frames = sorted(frames, key=lambda f: f.instance)
        distance = None
        notes.append("no slice positions in the headers: slices ordered by instance number, orientation as stored")

    decoded = _decode_frames(frames)
    first = frames[0].dataset
    grey = dicom_colour_to_grey(decoded[0], first) if first is not None else None
    is_hu = grey is None
    if is_hu:
        volume = _rescale(frames, decoded, apply_modality_lut, Dataset)
    else:
        volume = np.stack([dicom_colour_to_grey(a, f.dataset) for a, f in zip(decoded, frames)]).astype(np.float32)
        notes.append("colour DICOM shown in grey" if str(first.get("PhotometricInterpretation", "")) != "PALETTE COLOR"
                     else "palette-colour DICOM shown in grey")
    modality = str(first.get("Modality", "") or "")[:16]
    if is_hu and modality and modality != "CT":
        notes.append(f"DICOM modality is {modality}, not CT: values are read as Hounsfield units all the same")
    spacing = frames[0].spacing
    plane = ""
    positions: list[float | None] = [None] * n
    if distance is not None:
        step = (frames[-1].position - frames[0].position) / (n - 1) if n > 1 else normal * 1.0
        if np.linalg.norm(step) < 1e-6:
            step = normal * 1.0
        row_spacing, col_spacing = spacing if spacing is not None else (1.0, 1.0)
        affine = np.eye(4)
        affine[:3, 0] = step
        affine[:3, 1] = col_dir * row_spacing
        affine[:3, 2] = row_dir * col_spacing
        affine[:3, 3] = frames[0].position
        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        volume, plane, reversed_, swapped = _reorient(volume, lps_to_ras @ affine)
        if reversed_:
            frames = frames[::-1]
            distance = distance[::-1]
        positions = [float(abs(d - distance[0])) for d in distance]
        if spacing is not None and swapped:
            spacing = (spacing[1], spacing[0])
    reference = SeriesReference(
        str(first.get("StudyInstanceUID", "") or ""), frames[0].series_uid,
        str(first.get("FrameOfReferenceUID", "") or ""),
        tuple((str(f.dataset.get("SOPClassUID", "")), str(f.dataset.get("SOPInstanceUID", "")), f.frame)
              for f in frames))
    series = Series(series_id, "DICOM", volume, [f.source for f in frames], is_hu=is_hu, positions=positions,
                    spacing=spacing, modality=modality, orientation=plane, notes=notes, reference=reference)
    series.digest = _digest(volume)
    return series


def _decode_frames(frames: list[_Frame]) -> list[np.ndarray]:
    """Stored values of every slice, each file decoded once (all frames of a
    multi-frame file at once); files are decoded on two threads (the codecs
    release the GIL)."""
    datasets: dict[int, object] = {}
    for f in frames:
        datasets.setdefault(id(f.dataset), f.dataset)

    def decode_one(dataset):
        return dicom_pixels(dataset)

    with ThreadPoolExecutor(max_workers=2) as pool:
        arrays = dict(zip(datasets, pool.map(decode_one, datasets.values())))
    return [arrays[id(f.dataset)] if f.frame is None else arrays[id(f.dataset)][f.frame] for f in frames]


def _rescale(frames: list[_Frame], decoded: list[np.ndarray], apply_modality_lut, Dataset) -> np.ndarray:
    """Hounsfield units of every slice (pydicom's modality LUT; enhanced CT:
    the frame's own slope and intercept), as int16 where that is exact."""
    volume = np.empty((len(frames), *decoded[0].shape[:2]), np.float32)
    integral = True
    for i, (f, array) in enumerate(zip(frames, decoded)):
        carrier = f.dataset
        if f.rescale is not None:
            carrier = Dataset()
            carrier.RescaleSlope, carrier.RescaleIntercept = f.rescale
        hu = apply_modality_lut(array, carrier)
        volume[i] = hu
        if integral and hu.dtype.kind == "f" and not np.array_equal(hu, np.round(hu)):
            integral = False
    if integral and volume.size and -32768 <= float(volume.min()) and float(volume.max()) <= 32767:
        return volume.astype(np.int16)
    return volume


def _digest(values) -> str:
    digest = hashlib.sha256()
    for v in (values if isinstance(values, list) else [values]):
        digest.update(str(v.shape).encode())
        digest.update(np.ascontiguousarray(v).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- NIfTI


def _nifti_bytes(item: Input) -> io.IOBase | None:
    """A readable stream of the NIfTI file in ``item`` (gzip or not), or None
    when it is not one. Nothing is inflated beyond the header here."""
    if _is_gzip(item.data):
        stream = gzip.GzipFile(fileobj=io.BytesIO(item.data))
        try:
            header = stream.read(540)
        except (OSError, EOFError):
            return None
        if _nifti_version(header) is None:
            return None
        return gzip.GzipFile(fileobj=io.BytesIO(item.data))
    if _nifti_version(item.data[:540]) is not None:
        return io.BytesIO(item.data)
    return None


def read_nifti(name: str, stream: io.IOBase, limits: Limits) -> Series:
    """A NIfTI-1/-2 volume (nibabel) in display orientation; values are read as
    Hounsfield units. The header's size is checked before any voxel is read:
    a gzip bomb inflates no further than the volume the header declares."""
    import nibabel as nib

    header = stream.read(540)
    stream.seek(0)
    klass = nib.Nifti2Image if _nifti_version(header) == 2 else nib.Nifti1Image
    try:
        image = klass.from_stream(stream)
    except Exception:
        log.info("NIfTI header unreadable", exc_info=True)
        raise SeriesError(f"{name}: the NIfTI header is damaged or incomplete") from None
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise SeriesError(f"{name}: a NIfTI image of {len(shape)} dimensions {shape}; one 3-D volume is expected")
    nx, ny, nz = shape
    if min(nx, ny) < MIN_SIDE or max(nx, ny) > MAX_SIDE:
        raise SeriesError(f"{name}: slices of {nx}x{ny} voxels are outside what this app reads "
                          f"({MIN_SIDE} to {MAX_SIDE} a side)")
    if nz > limits.max_slices or nx * ny * nz > limits.max_voxels:
        raise SeriesError(f"{name}: a volume of {nx}x{ny}x{nz} voxels; at most {limits.max_slices} slices and "
                          f"{limits.max_voxels / 1e6:.0f} megavoxels are read")
    try:
        data = np.asanyarray(image.dataobj, order="C").reshape(shape)
    except Exception:
        log.info("NIfTI data unreadable", exc_info=True)
        raise SeriesError(f"{name}: the NIfTI voxel data is truncated or damaged") from None
    if not np.isfinite(data).all():
        raise SeriesError(f"{name}: the volume contains NaN or infinite values")
    # nibabel arrays are (i, j, k) with k the slice axis: as (slice, j, i) the
    # axes match the DICOM convention (slice, row, column) before reorienting.
    volume = np.transpose(data, (2, 1, 0))
    affine = image.affine @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    volume, plane, _reversed, swapped = _reorient(volume, affine)
    steps = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = (float(steps[2]), float(steps[1])) if swapped else (float(steps[1]), float(steps[2]))
    if volume.dtype.kind in "iu" or np.array_equal(volume, np.round(volume)):
        if volume.size and -32768 <= float(volume.min()) and float(volume.max()) <= 32767:
            volume = volume.astype(np.int16)
    if volume.dtype != np.int16:
        volume = volume.astype(np.float32)
    positions = [float(i * steps[0]) for i in range(volume.shape[0])]
    series = Series(_series_id("nifti:" + hashlib.sha256(np.ascontiguousarray(volume).tobytes()).hexdigest()),
                    "NIfTI", volume, [name] * volume.shape[0], is_hu=True, positions=positions,
                    spacing=spacing, modality="CT", orientation=plane,
                    notes=["NIfTI values read as Hounsfield units"])
    series.digest = _digest(volume)
    return series


def images_series(images: list[tuple[str, Slice]]) -> Series | None:
    """The loose images of a read as one stack in input order (grey in [0, 1],
    each at its own size), for the same viewer as a series."""
    if not images:
        return None
    values = [s.pixels for _, s in images]
    series = Series("images-" + _digest(values)[:8], "images", values, [name for name, _ in images], is_hu=False,
                    positions=[None] * len(values), modality="", slice_notes=[list(s.notes) for _, s in images])
    series.digest = _digest(values)
    return series


# --------------------------------------------------------------------------- classifying a series


@dataclass
class SeriesPredictions:
    """Per-slice predictions of one series by one model, in reading order."""

    predictions: list[Prediction]
    class_names: list[str]
    display_names: list[str]
    seconds: float = 0.0

    @property
    def probabilities(self) -> np.ndarray:
        """(N, C) calibrated probabilities."""
        return np.array([[p.probabilities[c] for c in self.class_names] for p in self.predictions]).reshape(
            len(self.predictions), len(self.class_names))


def _squares(series: Series, window: Window, config, workers: int = 2) -> tuple[torch.Tensor, list[bool]]:
    """The model's (N, 1, S, S) input squares of every slice (``to_square``, as
    for one slice) and whether a body was found in each."""
    size = config.img_size
    images = torch.zeros(len(series), 1, size, size)
    body = [True] * len(series)

    def one(i: int) -> None:
        pixels = series.slice(i, window).pixels
        square, geometry = to_square(pixels, config)
        images[i, 0] = torch.from_numpy(square)
        body[i] = geometry.body_found

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, range(len(series))))
    return images, body


def classify_series(model, series: Series, *, batch_size: int = 32,
                    on_progress: Callable[[int, int], None] | None = None) -> SeriesPredictions:
    """Every slice of ``series`` through ``model`` in batches, with calibrated
    probabilities, the out-of-distribution check and the answer state:
    the same answers as ``model.predict`` on each slice, without Grad-CAM.
    The model's lock is taken per batch, so other users go on between batches."""
    started = time.perf_counter()
    n = len(series)
    members = model.members if isinstance(model, EnsembleModel) else [model]
    parts, body = [], [True] * n
    for k, member in enumerate(members):
        images, body = _squares(series, member.preprocess.window, member.preprocess)

        def progress(done: int, total: int, k: int = k) -> None:
            if on_progress:
                on_progress(k * n + done, len(members) * n)

        parts.append(member.score_squares(images, body, batch_size, on_progress=progress))
    scores = model.combine(parts) if len(members) > 1 else parts[0]
    predictions = []
    for i in range(n):
        notes = slice_notes(series.slice_notes[i] if series.slice_notes else [], body[i])
        predictions.append(scores.prediction(i, model.class_names, model.display_names, notes))
    return SeriesPredictions(predictions, list(model.class_names), list(model.display_names),
                             time.perf_counter() - started)


# --------------------------------------------------------------------------- the series verdict

MIN_FINDING_SLICES = 3  # confident slices of a finding class before the series reports it
KEY_SLICES = 5
VERDICT_RULE = (
    f"Only confidently answered slices count: uncertain ones (low confidence, unlike the training images, not a "
    f"chest CT) never do. A finding class is reported when at least {MIN_FINDING_SLICES} slices are confidently "
    f"predicted as it; the series shows the finding class with the most such slices (the others are listed). "
    f"Classes named normal, non-... or negative are not findings. With fewer than {MIN_FINDING_SLICES} confident "
    f"slices in all, the series has no result.")


@dataclass
class SeriesSummary:
    series: str  # the series id
    slices: int
    label: str | None  # the reported finding class (None: no finding, or no result)
    verdict: str  # in plain words, e.g. "COVID-like findings on 37 of 120 slices"
    rule: str
    confident_counts: dict[str, int]  # class -> slices confidently predicted as it
    uncertain: int  # slices in any state but confident
    uncertain_by_state: dict[str, int]
    key_slices: list[int]  # reading-order indices of the slices that drive the verdict
    has_result: bool
    other_findings: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def finding_classes(class_names: list[str]) -> list[str]:
    """Classes that are findings: all but normal / non-... / negative ones."""
    return [c for c in class_names if not NEGATIVE_NAME.match(c.replace("-", " ").replace("_", " "))]


def summarise(series_id: str, result: SeriesPredictions) -> SeriesSummary:
    """The study-level summary of one series under :data:`VERDICT_RULE`."""
    preds = result.predictions
    n = len(preds)
    names = dict(zip(result.class_names, result.display_names))
    counts = {c: sum(1 for p in preds if p.state == CONFIDENT and p.label == c) for c in result.class_names}
    by_state = {s: sum(1 for p in preds if p.state == s) for s in (LOW_CONFIDENCE, UNLIKE_TRAINING, NOT_CHEST_CT)}
    uncertain = sum(by_state.values())
    confident = n - uncertain
    findings = finding_classes(result.class_names)
    reached = {c: counts[c] for c in findings if counts[c] >= MIN_FINDING_SLICES}
    probs = result.probabilities
    if confident < MIN_FINDING_SLICES:
        label, has_result = None, False
        verdict = (f"No result: only {confident} of {n} slices were answered confidently "
                   f"({uncertain} uncertain)")
        pool = list(range(n))
        key_class = findings[0] if findings else result.class_names[0]
    elif reached:
        label = max(reached, key=lambda c: (reached[c], -result.class_names.index(c)))
        has_result = True
        verdict = f"{names[label]}-like findings on {counts[label]} of {n} slices"
        pool = [i for i, p in enumerate(preds) if p.state == CONFIDENT and p.label == label]
        key_class = label
    else:
        label, has_result = None, True
        negatives = [c for c in result.class_names if c not in findings]
        verdict = f"No finding class on {MIN_FINDING_SLICES} or more confident slices"
        if negatives:
            verdict += " (" + ", ".join(f"{names[c]} on {counts[c]}" for c in negatives) + f" of {n} slices)"
        pool = list(range(n))
        key_class = max(findings, key=lambda c: probs[:, result.class_names.index(c)].max()) if findings else \
            result.class_names[0]
    column = probs[:, result.class_names.index(key_class)]
    key = sorted(pool, key=lambda i: -column[i])[:KEY_SLICES]
    # Most slices first, ties in class order (sorted is stable); a second finding is never hidden behind the first.
    others = dict(sorted(((c, k) for c, k in reached.items() if c != label), key=lambda item: -item[1]))
    if others:
        verdict += "; also " + ", ".join(f"{names[c]}-like on {k}" for c, k in others.items())
    return SeriesSummary(series_id, n, label, verdict, VERDICT_RULE, counts, uncertain, by_state, key, has_result,
                         others)


# --------------------------------------------------------------------------- tables


def slice_rows(series: Series, result: SeriesPredictions) -> list[dict]:
    """One row per slice (the series CSV and the viewer's table)."""
    names = dict(zip(result.class_names, result.display_names))
    rows = []
    for i, p in enumerate(result.predictions):
        row = {"series": series.id, "slice": i + 1, "name": series.slice_name(i),
               "position_mm": None if not series.positions or series.positions[i] is None
               else round(series.positions[i], 2),
               "result": names[p.label] if not p.uncertain else f"Uncertain (leans {names[p.label]})",
               "state": p.state, "confidence": round(p.confidence, 4)}
        row.update({f"p_{c}": round(p.probabilities[c], 4) for c in result.class_names})
        rows.append(row)
    return rows


def series_csv(series: Series, result: SeriesPredictions) -> str:
    """The series CSV: :func:`slice_rows`, formula-like cells written as text."""
    return csv_text(slice_rows(series, result))
