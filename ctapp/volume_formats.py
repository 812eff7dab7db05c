"""DICOM files and NIfTI volumes into :class:`ctapp.volumes.Series`: slices
grouped, ordered, decoded to Hounsfield units and turned to display
orientation.

Memory stays near what the series holds (int16 Hounsfield units, uint8 grey
for colour DICOM): DICOM files are grouped by their headers alone and their
pixels decoded one file at a time straight into the volume's final place; a
NIfTI volume is read in slabs of slices. Every size a header claims is checked
against the limits before any work per slice."""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .imaging import MAX_SIDE, MIN_SIDE, dicom_colour_to_grey, dicom_pixels, read_dicom
from .volumes import (
    DisplayPlan,
    Input,
    Limits,
    ReadBudget,
    Series,
    SeriesError,
    SeriesReference,
    display_plan,
    series_id_of,
    values_digest,
)

log = logging.getLogger(__name__)


def is_gzip(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b"


def nifti_version(header: bytes) -> int | None:
    """1 or 2 for a single-file NIfTI-1/-2 header (either byte order), else None."""
    def sized(n: int) -> bool:
        return n in (int.from_bytes(header[:4], "little"), int.from_bytes(header[:4], "big"))

    if len(header) >= 348 and header[344:348] == b"n+1\0" and sized(348):
        return 1
    if len(header) >= 540 and header[4:8] == b"n+2\0" and sized(540):
        return 2
    return None


# --------------------------------------------------------------------------- DICOM


@dataclass
class DicomFrame:
    """One slice of a DICOM file before grouping: where it is and how to decode it."""

    source: str
    dataset: object = field(repr=False)  # the file's header (pixel data not read)
    frame: int | None  # None: a single-frame file
    series_uid: str
    position: np.ndarray | None  # ImagePositionPatient (mm, LPS)
    orientation: np.ndarray | None  # ImageOrientationPatient: row then column direction cosines
    spacing: tuple[float, float] | None
    rescale: tuple[float, float] | None  # enhanced CT per-frame slope/intercept; None: the dataset's own
    instance: int
    shape: tuple[int, int]
    file_bytes: Callable[[], bytes] = field(repr=False, default=bytes)  # the whole file again, to decode its pixels


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


def read_dicom_header(data: bytes):
    """The header of a DICOM file, its pixel data left unread. A file without
    pixel data, a damaged one and a deflated one (whose header is inside the
    deflated stream) go through ``imaging.read_dicom``, which says why it
    cannot be read or gives the whole dataset."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)
    try:
        header = pydicom.dcmread(stream, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - read_dicom logs and names the fault
        return read_dicom(data)
    at_pixels = stream.tell() < len(data)  # parsing stops at the pixel data, or reads to the end
    if not at_pixels or header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return read_dicom(data)
    header.buffer = None  # pydicom keeps the stream it read: the whole file, pixels and all
    return header


def _frame_total(name: str, dataset, rows: int, cols: int, limits: Limits) -> int:
    """The number of frames a file claims, refused before any work per frame
    when it is more than one series may hold."""
    try:
        n_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise SeriesError(f"{name}: the number of frames (NumberOfFrames) is not a number") from None
    if n_frames < 1:
        raise SeriesError(f"{name}: the header claims {n_frames} frames")
    if n_frames > limits.max_slices or n_frames * rows * cols > limits.max_voxels:
        raise SeriesError(f"{name}: the header claims {n_frames} frames of {cols}x{rows} pixels; at most "
                          f"{limits.max_slices} slices and {limits.max_voxels / 1e6:.0f} megavoxels are read "
                          "from one series")
    return n_frames


def dicom_frames(item: Input, dataset, limits: Limits, file_bytes: Callable[[], bytes]) -> list[DicomFrame]:
    """The slices of one DICOM file (``dataset``: its header), each with its
    geometry; ``file_bytes`` gives the file again when its pixels are decoded."""
    rows, cols = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if min(rows, cols) < MIN_SIDE or max(rows, cols) > MAX_SIDE:
        raise SeriesError(f"{item.name}: slices of {cols}x{rows} pixels are outside what this app reads "
                          f"({MIN_SIDE} to {MAX_SIDE} pixels a side)")
    series_uid = str(dataset.get("SeriesInstanceUID", "") or "")
    instance = int(dataset.get("InstanceNumber", 0) or 0)
    n_frames = _frame_total(item.name, dataset, rows, cols, limits)
    spacing = _floats(dataset.get("PixelSpacing") or [], 2)
    enhanced = "PerFrameFunctionalGroupsSequence" in dataset or "SharedFunctionalGroupsSequence" in dataset
    if n_frames == 1 and not enhanced:
        return [DicomFrame(item.name, dataset, None, series_uid, _floats(dataset.get("ImagePositionPatient") or [], 3),
                           _floats(dataset.get("ImageOrientationPatient") or [], 6),
                           tuple(spacing) if spacing is not None else None, None, instance, (rows, cols), file_bytes)]
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
        frames.append(DicomFrame(
            item.name, dataset, k if n_frames > 1 else None, series_uid, _floats(position or [], 3),
            _floats(orientation or [], 6), tuple(sp) if sp is not None else None,
            (float(slope), float(intercept)) if slope is not None and intercept is not None else None,
            instance * 100000 + k, (rows, cols), file_bytes))
    return frames


def frame_count(data: bytes) -> int:
    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["NumberOfFrames"])
        return int(header.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - an unreadable header is reported when the file is read
        return 1


def _is_colour(dataset) -> bool:
    return str(dataset.get("PhotometricInterpretation", "")) == "PALETTE COLOR" or \
        int(dataset.get("SamplesPerPixel", 1) or 1) > 1


def _shared_rescale(frames: list[DicomFrame]) -> tuple[float, float] | None:
    """The one linear rescale (slope, intercept) of every slice's stored 8- or
    16-bit integers, all signed or all unsigned; None when slices differ, the
    modality LUT is a table or the values are not such integers."""
    seen = set()
    for f in frames:
        ds = f.dataset
        if "ModalityLUTSequence" in ds or int(ds.get("BitsAllocated", 0) or 0) not in (8, 16):
            return None
        try:
            if f.rescale is not None:
                pair = f.rescale
            elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
                pair = (float(ds.RescaleSlope), float(ds.RescaleIntercept))
            else:
                pair = (1.0, 0.0)
        except (TypeError, ValueError):
            return None
        seen.add((*pair, int(ds.get("PixelRepresentation", 0) or 0), int(ds.BitsAllocated)))
        if len(seen) > 1:
            return None
    return seen.pop()[:2] if seen else None


def _stored_type(dataset) -> np.dtype:
    """The type that holds a file's stored integers exactly: int16 for signed
    or 8-bit ones, uint16 for unsigned 16-bit ones."""
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    return np.dtype(np.int16 if signed or int(dataset.BitsAllocated) == 8 else np.uint16)


class _Compact:
    """Values made compact for keeping: Hounsfield units as int16 (rounded to
    whole units, clipped to the int16 range) or grey in [0, 1] as uint8; what
    was rounded or clipped is remembered for the series' notes. (A series
    whose slices share one rescale keeps its stored integers instead.)"""

    def __init__(self):
        self.rounded = self.clipped = False

    def hu(self, values: np.ndarray) -> np.ndarray:
        if values.dtype.kind == "f":
            whole = np.round(values)
            self.rounded |= not np.array_equal(whole, values)
            values = whole
        if values.size and (values.min() < -32768 or values.max() > 32767):
            self.clipped = True
            values = np.clip(values, -32768, 32767)
        return values.astype(np.int16)

    @staticmethod
    def grey(values: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(values, np.float32) * 255).astype(np.uint8)

    def notes(self) -> list[str]:
        return ((["Hounsfield units rounded to whole numbers"] if self.rounded else []) +
                (["values beyond the int16 range (-32768 to 32767) clipped"] if self.clipped else []))


def build_dicom_series(series_id: str, frames: list[DicomFrame], limits: Limits, budget: ReadBudget) -> Series:
    """Order, decode, rescale and orient the slices of one series."""
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

    first = frames[0].dataset
    is_hu = not _is_colour(first)
    spacing = frames[0].spacing
    plan = None
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
        plan = display_plan(lps_to_ras @ affine)
    shared = _shared_rescale(frames) if is_hu else None
    dtype = np.dtype(np.uint8) if not is_hu else _stored_type(first) if shared else np.dtype(np.int16)
    # Stored values that are Hounsfield units already need no rescale.
    rescale = None if shared == (1.0, 0.0) and dtype == np.int16 else shared
    budget.hold(n * rows * cols * dtype.itemsize, f"{n} slices of {cols}x{rows} pixels")
    volume = np.empty((n, *(plan.slice_shape(rows, cols) if plan else (rows, cols))), dtype)
    compact = _Compact()
    _decode_into(volume, frames, plan, compact, stored=shared is not None)
    if is_hu:
        notes += compact.notes()
    else:
        notes.append("colour DICOM shown in grey" if str(first.get("PhotometricInterpretation", "")) != "PALETTE COLOR"
                     else "palette-colour DICOM shown in grey")
    modality = str(first.get("Modality", "") or "")[:16]
    if is_hu and modality and modality != "CT":
        notes.append(f"DICOM modality is {modality}, not CT: values are read as Hounsfield units all the same")
    plane = ""
    positions: list[float | None] = [None] * n
    if plan is not None:
        plane = plan.plane
        if plan.reversed:
            frames = frames[::-1]
            distance = distance[::-1]
        positions = [float(abs(d - distance[0])) for d in distance]
        if spacing is not None and plan.swapped:
            spacing = (spacing[1], spacing[0])
    reference = SeriesReference(
        str(first.get("StudyInstanceUID", "") or ""), frames[0].series_uid,
        str(first.get("FrameOfReferenceUID", "") or ""),
        tuple((str(f.dataset.get("SOPClassUID", "")), str(f.dataset.get("SOPInstanceUID", "")), f.frame)
              for f in frames))
    series = Series(series_id, "DICOM", volume, [f.source for f in frames], is_hu=is_hu, positions=positions,
                    spacing=spacing, modality=modality, orientation=plane, notes=notes, reference=reference,
                    rescale=rescale)
    series.digest = values_digest(volume, *([rescale] if rescale else []))
    return series


def _decode_into(volume: np.ndarray, frames: list[DicomFrame], plan: DisplayPlan | None, compact: _Compact, *,
                 stored: bool) -> None:
    """Decode every slice into its place in ``volume``: each file read and
    decoded once, its frames one at a time, two files at a time (the codecs
    release the GIL), so only the files being decoded are held. ``stored``:
    the stored integers are kept as they are; otherwise Hounsfield units
    through pydicom's modality LUT (enhanced CT: the frame's own slope and
    intercept)."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    slots: dict[int, list[tuple[int, DicomFrame]]] = {}
    for i, f in enumerate(frames):
        slots.setdefault(id(f.dataset), []).append((i, f))

    def decode_file(members: list[tuple[int, DicomFrame]]) -> None:
        dataset = read_dicom(members[0][1].file_bytes())
        for i, f in members:
            array = dicom_pixels(dataset, f.frame)
            if volume.dtype == np.uint8:
                values = compact.grey(dicom_colour_to_grey(array, dataset))
            elif stored:
                values = array.astype(volume.dtype, copy=False)
            else:
                carrier = dataset
                if f.rescale is not None:
                    carrier = Dataset()
                    carrier.RescaleSlope, carrier.RescaleIntercept = f.rescale
                values = compact.hu(apply_modality_lut(array, carrier))
            if plan is None:
                volume[i] = values
            else:
                plan.place(volume, i, values[None])

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(decode_file, slots.values()))


# --------------------------------------------------------------------------- NIfTI


def nifti_stream(item: Input) -> io.IOBase | None:
    """A readable stream of the NIfTI file in ``item`` (gzip or not), or None
    when it is not one. Nothing is inflated beyond the header here."""
    if is_gzip(item.data):
        stream = gzip.GzipFile(fileobj=io.BytesIO(item.data))
        try:
            header = stream.read(540)
        except (OSError, EOFError):
            return None
        if nifti_version(header) is None:
            return None
        return gzip.GzipFile(fileobj=io.BytesIO(item.data))
    if nifti_version(item.data[:540]) is not None:
        return io.BytesIO(item.data)
    return None


NIFTI_SLAB_BYTES = 32 << 20  # voxels read at once, as the file stores them


def read_nifti(name: str, stream: io.IOBase, limits: Limits, budget: ReadBudget) -> Series:
    """A NIfTI-1/-2 volume (nibabel) in display orientation; values are read as
    Hounsfield units (int16, whole units). The header's size is checked before
    any voxel is read, then the voxels are read in slabs of slices: a gzip
    bomb inflates no further than the volume the header declares, and a file
    cut short is refused at its first missing slab."""
    import nibabel as nib

    header = stream.read(540)
    stream.seek(0)
    klass = nib.Nifti2Image if nifti_version(header) == 2 else nib.Nifti1Image
    try:
        image = klass.from_stream(stream)
    except Exception:
        log.info("NIfTI header unreadable", exc_info=True)
        raise SeriesError(f"{name}: the NIfTI header is damaged or incomplete") from None
    stored = tuple(int(s) for s in image.shape)
    shape = stored[:3] if len(stored) == 4 and stored[3] == 1 else stored
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
    # nibabel arrays are (i, j, k) with k the slice axis: as (slice, j, i) the
    # axes match the DICOM convention (slice, row, column) before reorienting.
    affine = image.affine @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    plan = display_plan(affine)
    budget.hold(nx * ny * nz * 2, f"{name}: a volume of {nx}x{ny}x{nz} voxels")
    volume = np.empty((nz, *plan.slice_shape(ny, nx)), np.int16)
    compact = _Compact()
    step = max(1, NIFTI_SLAB_BYTES // (nx * ny * max(1, image.get_data_dtype().itemsize)))
    for start in range(0, nz, step):
        stop = min(nz, start + step)
        try:
            slab = np.asarray(image.dataobj[..., start:stop] if len(stored) == 3 else
                              image.dataobj[:, :, start:stop, 0] if len(stored) == 4 else image.dataobj[...]
                              ).reshape(nx, ny, stop - start)
        except Exception:
            log.info("NIfTI data unreadable", exc_info=True)
            raise SeriesError(f"{name}: the NIfTI voxel data is truncated or damaged") from None
        if not np.isfinite(slab).all():
            raise SeriesError(f"{name}: the volume contains NaN or infinite values")
        plan.place(volume, start, compact.hu(np.transpose(slab, (2, 1, 0))))
    steps = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = (float(steps[2]), float(steps[1])) if plan.swapped else (float(steps[1]), float(steps[2]))
    positions = [float(i * steps[0]) for i in range(nz)]
    series = Series(series_id_of("nifti:" + hashlib.sha256(volume.data).hexdigest()),
                    "NIfTI", volume, [name] * nz, is_hu=True, positions=positions,
                    spacing=spacing, modality="CT", orientation=plan.plane,
                    notes=["NIfTI values read as Hounsfield units", *compact.notes()])
    series.digest = values_digest(volume)
    return series
