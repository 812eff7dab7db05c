"""Small generated CT-like slices for tests: a dark body ellipse on black with
a class-specific bright blob pattern, so tiny models can learn the task."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PATTERNS = ("disc", "ring", "bar", "dots")
PATIENT_NAME = "Doe^Jane"  # identifiers in every generated DICOM header, which the app must never show
PATIENT_ID = "PID-778899"


def make_slice(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    body = (((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.36) ** 2) < 1
    img = np.where(body, 0.25, 0.0) + rng.normal(0, 0.03, (size, size))
    cx, cy = rng.uniform(0.35, 0.65, 2)
    r = np.hypot(x - cx, y - cy)
    kind = PATTERNS[label % len(PATTERNS)]
    if kind == "disc":
        img += 0.6 * (r < 0.12)
    elif kind == "ring":
        img += 0.6 * ((r > 0.08) & (r < 0.14))
    elif kind == "bar":
        img += 0.6 * ((abs(x - cx) < 0.04) & (abs(y - cy) < 0.18))
    else:
        for dx, dy in ((-0.1, 0), (0.1, 0), (0, 0.1)):
            img += 0.6 * (np.hypot(x - cx - dx, y - cy - dy) < 0.04)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_classes(root: Path, classes: list[str], per_class: int, seed: int = 0, size: int = 48,
                  start: int = 0) -> list[Path]:
    """root/<class>/<n>.png for each class; returns the written paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{name.split('_')[0]} ({start + i}).png"
            Image.fromarray(make_slice(label, rng, size)).save(path)
            paths.append(path)
    return paths


def make_split_dataset(root: Path, classes: list[str], train: int = 12, valid: int = 4, seed: int = 0,
                       size: int = 48) -> Path:
    write_classes(root / "train", classes, train, seed, size)
    write_classes(root / "valid", classes, valid, seed + 1, size, start=1000)
    return root


def ct_dataset(rows: int, cols: int, *, signed: bool = True, sop_class: str | None = None, study_uid: str | None = None,
               series_uid: str | None = None, frame_uid: str | None = None):
    """A CT image's DICOM header without pixels: file meta (explicit VR little
    endian), patient identifiers, study / series / frame-of-reference UIDs (new
    ones unless given) and a 16-bit MONOCHROME2 pixel module. The caller sets
    rescale, geometry and ``PixelData``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = frame_uid or generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19510203"
    ds.InstitutionName = "Hospital of Nowhere"
    ds.AccessionNumber = "ACC-4455"
    ds.SeriesDescription = "Thorax Doe Jane"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(signed)
    return ds


def dicom_file_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def report_for(class_names, y_true, probs, display=None) -> dict:
    """An evaluation report of given probabilities, as training.evaluate writes it."""
    from ctapp.metrics import evaluation_report

    return evaluation_report(np.asarray(y_true), np.asarray(probs, dtype=float), class_names, display)


def prediction(**kw):
    """A two-class :class:`ctapp.inference.Prediction`, confident 'beta' unless changed."""
    from ctapp.inference import Prediction

    values = {"label": "beta", "display_label": "Beta", "probabilities": {"alpha": 0.2, "beta": 0.8}, "confidence": 0.8,
              "uncertain": False, "out_of_distribution": False, "ood_score": 1.0, "reasons": [], "notes": []}
    values.update(kw)
    return Prediction(**values)
