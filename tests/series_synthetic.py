"""Generated CT series for the series tests: a display-orientation grey volume
(slice 0 most superior, patient's right on the image's left, anterior up),
written as DICOM files (any stored orientation, signed or unsigned, any
compression, shuffled extension-less names), as one enhanced multi-frame
file, as a zip, or as NIfTI the way a DICOM-to-NIfTI converter writes it.

:func:`ct_slice` is the one builder of a CT DICOM slice for tests and
benchmarks (the app fixtures and ``benchmarks/series.py`` use it too).

Stored values are the grey levels G (0..255) with a rescale that maps them to
Hounsfield units whose lung window (centre -600, width 1500) is G / 255: a
series slice then shows the model the same pixels as G saved as a PNG.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from synthetic import ct_dataset, dicom_file_bytes, make_slice

SLOPE = 1500 / 255  # G -> HU: window (-600, 1500) gives back G / 255
INTERCEPT = -1350.0
PIXEL_SPACING = 0.8
SLICE_STEP = 2.5


def grey_volume(n: int = 6, size: int = 48, seed: int = 0, labels=(0, 1)) -> np.ndarray:
    """(n, size, size) uint8 slices in display orientation; each one differs
    and none is symmetric, so a flip or a wrong order shows."""
    rng = np.random.default_rng(seed)
    volume = np.stack([make_slice(labels[k % len(labels)], rng, size) for k in range(n)])
    volume[:, 1:4, 1:4] = 255  # a marker at the patient's right-anterior corner
    return volume


def hu_of(grey: np.ndarray) -> np.ndarray:
    return grey.astype(np.float64) * SLOPE + INTERCEPT


def _stored(grey: np.ndarray, signed: bool) -> tuple[np.ndarray, float]:
    """Stored values and the intercept that maps them to the same HU."""
    if signed:
        return (grey.astype(np.int16) - 1000), INTERCEPT + 1000 * SLOPE
    return grey.astype(np.uint16), INTERCEPT


# The stored layout of a display slice G for each ImageOrientationPatient
# (LPS): the stored array, the direction cosines, and the stored first pixel's
# (x, y) position in pixels of the display grid.
def _layout(grey: np.ndarray, orientation: str):
    h, w = grey.shape
    if orientation == "standard":
        return grey, [1, 0, 0, 0, 1, 0], (0, 0)
    if orientation == "rows-flipped":
        return grey[::-1], [1, 0, 0, 0, -1, 0], (0, h - 1)
    if orientation == "columns-flipped":
        return grey[:, ::-1], [-1, 0, 0, 0, 1, 0], (w - 1, 0)
    if orientation == "transposed":
        return grey.T, [0, 1, 0, 1, 0, 0], (0, 0)
    raise ValueError(orientation)


def _new_uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


@dataclass(frozen=True)
class SeriesUids:
    """The UIDs that make slices one series (new ones unless given)."""

    study: str = field(default_factory=_new_uid)
    series: str = field(default_factory=_new_uid)
    frame: str = field(default_factory=_new_uid)


def stored_from_hu(hu: np.ndarray) -> np.ndarray:
    """int16 stored values of Hounsfield units under rescale slope 1, intercept -1024."""
    return np.clip(np.round(hu + 1024), -32768, 32767).astype(np.int16)


def ct_slice(stored: np.ndarray, *, slope: float = 1.0, intercept: float = -1024.0, uids: SeriesUids | None = None,
             instance: int = 1, position=None, orientation=(1, 0, 0, 0, 1, 0), spacing: float = PIXEL_SPACING,
             thickness: float | None = None, syntax: str | None = None) -> bytes:
    """One CT DICOM slice: ``stored`` values (int16: signed, uint16:
    unsigned) with a rescale to Hounsfield units, patient identifiers in its
    header (which the app must never show), and geometry (``position=None``:
    no ImagePositionPatient / ImageOrientationPatient), compressed with
    ``syntax`` if given."""
    from pydicom.uid import CTImageStorage

    uids = uids or SeriesUids()
    ds = ct_dataset(*stored.shape, study_uid=uids.study, series_uid=uids.series, frame_uid=uids.frame,
                    sop_class=CTImageStorage, signed=stored.dtype.kind == "i")
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = list(position)
    ds.PixelSpacing = [spacing, spacing]
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.RescaleSlope = f"{slope:.14f}"[:16]  # a decimal string holds at most 16 characters
    ds.RescaleIntercept = f"{intercept:.14f}"[:16]
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return _save(ds, syntax)


def dicom_series(grey: np.ndarray, *, orientation: str = "standard", signed: bool = False, syntax: str | None = None,
                 reverse_instances: bool = False, series_uid: str | None = None, z0: float = 100.0,
                 positions: bool = True) -> list[bytes]:
    """One DICOM file per slice of the display volume ``grey`` (uint8)."""
    uids = SeriesUids(series=series_uid) if series_uid else SeriesUids()
    files = []
    n = len(grey)
    for k in range(n):
        stored, iop, (x0, y0) = _layout(grey[k], orientation)
        values, intercept = _stored(np.ascontiguousarray(stored), signed)
        position = [x0 * PIXEL_SPACING, y0 * PIXEL_SPACING, z0 - k * SLICE_STEP] if positions else None
        files.append(ct_slice(values, slope=SLOPE, intercept=intercept, uids=uids,
                              instance=(n - k) if reverse_instances else (k + 1), position=position,
                              orientation=iop, thickness=SLICE_STEP, syntax=syntax))
    return files


def _save(ds, syntax: str | None) -> bytes:
    if syntax is not None:
        compress(ds, syntax)
    return dicom_file_bytes(ds)


def compress(ds, syntax: str) -> None:
    """Compress ``ds`` in place: RLE, JPEG-LS and JPEG 2000 with pydicom's
    encoders; JPEG Lossless (process 14, SV1), which pydicom cannot encode,
    with libjpeg-turbo through imagecodecs."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    if syntax != JPEGLosslessSV1:
        ds.compress(syntax)
        return
    import imagecodecs

    array = ds.pixel_array
    if array.dtype.kind == "i":  # lossless JPEG codes the bit pattern
        array = array.view(np.uint16)
    ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(array, lossless=True, predictor=1, bitspersample=16)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


def enhanced_ct(grey: np.ndarray, *, frame_order=None, z0: float = 100.0, positions: bool = True) -> bytes:
    """One Enhanced CT file with every slice as a frame (stored in
    ``frame_order``), positions (unless ``positions=False``) and rescale in the
    functional groups only."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage, generate_uid

    n = len(grey)
    order = list(range(n)) if frame_order is None else list(frame_order)
    ds = ct_dataset(*grey.shape[1:], study_uid=generate_uid(), series_uid=generate_uid(), frame_uid=generate_uid(),
                       sop_class=EnhancedCTImageStorage, signed=False)
    ds.NumberOfFrames = n
    ds.InstanceNumber = 1

    def item(**values):
        d = Dataset()
        for key, value in values.items():
            setattr(d, key, value)
        return d

    shared = item(PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
                  PixelMeasuresSequence=Sequence([item(PixelSpacing=[PIXEL_SPACING, PIXEL_SPACING],
                                                       SliceThickness=SLICE_STEP)]),
                  PixelValueTransformationSequence=Sequence([item(RescaleSlope=f"{SLOPE:.14f}"[:16],
                                                                  RescaleIntercept=INTERCEPT, RescaleType="HU")]))
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[0, 0, z0 - k * SLICE_STEP])]))
        if positions else item() for k in order])
    ds.PixelData = np.stack([grey[k] for k in order]).astype(np.uint16).tobytes()
    return _save(ds, None)


def palette_dicom(size: int = 48, brightest: int = 255) -> tuple[bytes, np.ndarray]:
    """A PALETTE COLOR slice and the grey (ITU-R 601 luma, 0..255) it should
    decode to; no palette entry is brighter than ``brightest`` (0..255)."""
    from PIL import Image
    from pydicom.uid import CTImageStorage, generate_uid

    rng = np.random.default_rng(4)
    indices = rng.integers(0, 256, (size, size)).astype(np.uint8)
    red = np.arange(256, dtype=np.uint16)
    green = (255 - np.arange(256)).astype(np.uint16)
    blue = ((np.arange(256) * 7) % 256).astype(np.uint16)
    red, green, blue = (channel * brightest // 255 for channel in (red, green, blue))
    ds = ct_dataset(size, size, study_uid=generate_uid(), series_uid=generate_uid(), frame_uid=generate_uid(),
                       sop_class=CTImageStorage, signed=False)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    for name, channel in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", (channel * 257).astype("<u2").tobytes())
    ds.PixelData = indices.tobytes()
    rgb = np.stack([red[indices], green[indices], blue[indices]], axis=-1).astype(np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    return _save(ds, None), expected


def nifti_bytes(grey: np.ndarray, *, gz: bool = True, z0: float = 100.0, version: int = 1,
                byte_order: str = "<") -> bytes:
    """The volume as a DICOM-to-NIfTI converter writes it: i along the
    patient's left, j posterior, k from the feet up, with the RAS+ affine of
    the same patient positions as :func:`dicom_series` (NIfTI-1, or NIfTI-2
    with ``version=2``), little-endian unless ``byte_order=">"``."""
    import nibabel as nib

    n = len(grey)
    hu = hu_of(grey)
    data = np.transpose(hu[::-1], (2, 1, 0)).astype(np.int16 if np.allclose(hu, np.round(hu)) else np.float32)
    affine = np.array([[-PIXEL_SPACING, 0, 0, 0], [0, -PIXEL_SPACING, 0, 0],
                       [0, 0, SLICE_STEP, z0 - (n - 1) * SLICE_STEP], [0, 0, 0, 1]], dtype=float)
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = klass(data.astype(data.dtype.newbyteorder(byte_order)), affine,
                  header=klass.header_class(endianness=byte_order))
    raw = image.to_bytes()
    if not gz:
        return raw
    import gzip

    return gzip.compress(raw, mtime=0)


def shuffled_names(files: list[bytes], rng: np.random.Generator, prefix: str = "") -> dict[str, bytes]:
    """Extension-less, shuffled file names (as a PACS export names them)."""
    names = [f"{prefix}IM{rng.integers(10**6, 10**7)}" for _ in files]
    order = rng.permutation(len(files))
    return {names[i]: files[i] for i in order}


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def write_files(folder: Path, members: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in members.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths
