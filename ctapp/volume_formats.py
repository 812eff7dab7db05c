"""DICOM files and NIfTI volumes into :class:`ctapp.volumes.Series`: slices
grouped, ordered, decoded to Hounsfield units and turned to display
orientation."""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .imaging import MAX_SIDE, MIN_SIDE, dicom_colour_to_grey, dicom_pixels
from .volumes import Input, Limits, Series, SeriesError, SeriesReference, reorient, series_id_of, values_digest

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


def dicom_frames(item: Input, dataset) -> list[DicomFrame]:
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
        return [DicomFrame(item.name, dataset, None, series_uid, _floats(dataset.get("ImagePositionPatient") or [], 3),
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
        frames.append(DicomFrame(
            item.name, dataset, k if n_frames > 1 else None, series_uid, _floats(position or [], 3), _floats(orientation or [], 6),
            tuple(sp) if sp is not None else None,
            (float(slope), float(intercept)) if slope is not None and intercept is not None else None,
            instance * 100000 + k, (rows, cols)))
    return frames


def frame_count(data: bytes) -> int:
    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["NumberOfFrames"])
        return int(header.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - an unreadable header is reported when the file is read
        return 1


def build_dicom_series(series_id: str, frames: list[DicomFrame], limits: Limits) -> Series:
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
        volume, plane, reversed_, swapped = reorient(volume, lps_to_ras @ affine)
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
    series.digest = values_digest(volume)
    return series


def _decode_frames(frames: list[DicomFrame]) -> list[np.ndarray]:
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


def _rescale(frames: list[DicomFrame], decoded: list[np.ndarray], apply_modality_lut, Dataset) -> np.ndarray:
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


def read_nifti(name: str, stream: io.IOBase, limits: Limits) -> Series:
    """A NIfTI-1/-2 volume (nibabel) in display orientation; values are read as
    Hounsfield units. The header's size is checked before any voxel is read:
    a gzip bomb inflates no further than the volume the header declares."""
    import nibabel as nib

    header = stream.read(540)
    stream.seek(0)
    klass = nib.Nifti2Image if nifti_version(header) == 2 else nib.Nifti1Image
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
    volume, plane, _reversed, swapped = reorient(volume, affine)
    steps = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = (float(steps[2]), float(steps[1])) if swapped else (float(steps[1]), float(steps[2]))
    if volume.dtype.kind in "iu" or np.array_equal(volume, np.round(volume)):
        if volume.size and -32768 <= float(volume.min()) and float(volume.max()) <= 32767:
            volume = volume.astype(np.int16)
    if volume.dtype != np.int16:
        volume = volume.astype(np.float32)
    positions = [float(i * steps[0]) for i in range(volume.shape[0])]
    series = Series(series_id_of("nifti:" + hashlib.sha256(np.ascontiguousarray(volume).tobytes()).hexdigest()),
                    "NIfTI", volume, [name] * volume.shape[0], is_hu=True, positions=positions,
                    spacing=spacing, modality="CT", orientation=plane,
                    notes=["NIfTI values read as Hounsfield units"])
    series.digest = values_digest(volume)
    return series
