"""Whole CT series and volumes: what one is, what one read may hold, and how a
volume is turned to display orientation. ``ctapp.series_inputs`` reads named
files into series (``ctapp.volume_formats`` decodes DICOM and NIfTI);
``ctapp.series`` classifies them.

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

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .imaging import Slice, Window


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
    # Values held by one read, every series and loose image together (int16
    # Hounsfield units: 2 bytes a voxel): one and a half of the largest series.
    max_held_bytes: int = 3 * 1000 * 512 * 512
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
    """Slices in reading order, right way up. ``values`` holds, compactly,
    Hounsfield units (``is_hu``; int16, or a DICOM series' stored values with
    its ``rescale``), grey as uint8 (colour DICOM) or grey in [0, 1] (PNG/JPEG
    stacks: a list of 2-D arrays, as they may differ in size). Floats are
    made per slice, when one is asked for."""

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
    rescale: tuple[float, float] | None = None  # Hounsfield units = values * slope + intercept; None: values are HU

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
            grey = values.astype(np.float32) / 255 if values.dtype == np.uint8 else np.asarray(values, np.float32)
            return Slice(grey, self.kind, notes, mode=self.kind)
        if self.rescale is None:
            hu = np.asarray(values, np.float32)
        else:
            hu = (values * self.rescale[0] + self.rescale[1]).astype(np.float32)
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


def series_id_of(text: str) -> str:
    return "S-" + hashlib.sha256(text.encode()).hexdigest()[:8]


class ReadBudget:
    """One read's budget: bytes read (``Limits.max_total_bytes``) and bytes of
    values held (``Limits.max_held_bytes``), every file of the read counted."""

    def __init__(self, limits: Limits):
        self.limits, self.used, self.held = limits, 0, 0

    def take(self, size: int, what: str) -> None:
        self.used += size
        if self.used > self.limits.max_total_bytes:
            raise SeriesError(f"{what}: the inputs add up to more than {megabytes(self.limits.max_total_bytes)}, "
                              "more than one read accepts; upload fewer series at a time")

    def hold(self, size: int, what: str) -> None:
        """Count ``size`` bytes of values before they are decoded; refused when
        the read would hold more than the limit (nothing is counted then)."""
        if self.held + size > self.limits.max_held_bytes:
            raise SeriesError(f"{what} would take the values held by this read to "
                              f"{megabytes(self.held + size)}; at most {megabytes(self.limits.max_held_bytes)} are "
                              "read at once; upload fewer series at a time")
        self.held += size


def megabytes(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def values_digest(values, *meaning: object) -> str:
    """A content hash of ``values`` (an array or a list of them) and of what
    gives them their meaning (a rescale)."""
    digest = hashlib.sha256(repr(meaning).encode() if meaning else b"")
    for v in (values if isinstance(values, list) else [values]):
        digest.update(str(v.shape).encode())
        digest.update(np.ascontiguousarray(v).data)  # the buffer itself: no copy of a large volume
    return digest.hexdigest()


# Display orientation per acquisition plane, as nibabel axis codes of the
# array axes (slice, row, column) in RAS+ patient space: slice 0 most
# superior (axial), most anterior (coronal) or the patient's right
# (sagittal); rows run to the patient's back or feet; columns run to the
# patient's left (axial, coronal) or back (sagittal).
DISPLAY_CODES = {"axial": ("I", "P", "L"), "coronal": ("P", "I", "L"), "sagittal": ("L", "I", "P")}
_PLANE_OF_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}


@dataclass(frozen=True)
class DisplayPlan:
    """How a volume of ``n`` slices (slice, row, column) with a given RAS+
    affine is turned to the display orientation of its plane, by permutations
    and flips only (nibabel), applied slab by slab so the volume is written
    once in its final place."""

    plane: str
    transform: np.ndarray = field(repr=False)

    @property
    def reversed(self) -> bool:
        """Whether the slice order is reversed."""
        return bool(self.transform[0, 1] < 0)

    @property
    def swapped(self) -> bool:
        """Whether rows and columns are exchanged."""
        return int(self.transform[1, 0]) == 2

    def slice_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return (cols, rows) if self.swapped else (rows, cols)

    def place(self, volume: np.ndarray, start: int, slab: np.ndarray) -> None:
        """Write ``slab`` (slices ``start`` onward in stored order, already of
        ``volume``'s type) into ``volume`` (display order)."""
        import nibabel.orientations as nio

        n, stop = len(volume), start + len(slab)
        at = slice(n - stop, n - start) if self.reversed else slice(start, stop)
        volume[at] = nio.apply_orientation(slab, self.transform)


def display_plan(affine_ras: np.ndarray) -> DisplayPlan:
    """The :class:`DisplayPlan` of a volume whose array axes (slice, row,
    column) map to RAS+ space by ``affine_ras``."""
    import nibabel.orientations as nio

    current = nio.io_orientation(affine_ras)
    plane = _PLANE_OF_AXIS[int(current[0, 0])]
    target = nio.axcodes2ornt(DISPLAY_CODES[plane])
    transform = nio.ornt_transform(current, target)
    if int(transform[0, 0]) != 0:  # the target is chosen from axis 0's own direction
        raise SeriesError("the slice geometry is inconsistent: the slices cannot be put in reading order")
    return DisplayPlan(plane, transform)
