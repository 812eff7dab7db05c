"""A model's result for a PACS series as DICOM: the viewer's SR
(``ctapp.structured_report``) and a key slice with its Grad-CAM as a secondary
capture, with UIDs derived from the model version and the source series (so
storing twice never duplicates) and the study's patient module (so the PACS
files them beside the images), marked as research-use output of the model."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .volumes import Series

RESULT_SERIES_NUMBER = 900

@dataclass(frozen=True)
class ResultUids:
    series: str
    sr: str
    capture: str
    capture_series: str


def result_uids(model_name: str, model_version: str, source_series_uid: str) -> ResultUids:
    """UIDs of a model version's result for a source series: the same inputs
    give the same UIDs, so storing twice cannot duplicate."""
    from pydicom.uid import generate_uid

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["ctapp pacs result", kind, model_name, model_version, source_series_uid])

    return ResultUids(uid("sr series"), uid("sr"), uid("capture"), uid("capture series"))


def _research_label(model) -> str:
    return f"AI research use only: {model.name} {model.version}".strip()[:64]


def _filed_in_study(dataset, study: Mapping[str, str]):
    """``dataset`` with the study's patient and study attributes: a PACS files
    an instance by them, and some (Orthanc) let the latest instance's values
    stand for the whole study."""
    for keyword, value in study.items():
        setattr(dataset, keyword, value)
    return dataset


def result_sr(model, series: Series, result, summary, uids: ResultUids, study: Mapping[str, str]):
    """The viewer's SR (``ctapp.structured_report``) with the result's UIDs
    and the study's attributes, marked as research output of the model."""
    from .structured_report import series_sr

    sr = series_sr(series.reference, summary, model_name=model.name, model_version=model.version,
                   display_names=dict(zip(result.class_names, result.display_names)))
    sr.SeriesInstanceUID, sr.SOPInstanceUID = uids.series, uids.sr
    sr.file_meta.MediaStorageSOPInstanceUID = uids.sr
    sr.SeriesNumber = RESULT_SERIES_NUMBER
    sr.SeriesDescription = _research_label(model)
    sr.ManufacturerModelName, sr.SoftwareVersions = model.name[:64], (model.version or "unknown")[:64]
    return _filed_in_study(sr, study)


def key_slice_capture(model, series: Series, index: int, uids: ResultUids, study: Mapping[str, str]):
    """A secondary capture of slice ``index`` with its Grad-CAM overlay (RGB)."""
    import highdicom as hd

    from .figures import cam_overlay
    from .structured_report import MANUFACTURER

    image = series.slice(index, model.preprocess.window)
    overlay = cam_overlay(image.pixels, model.analyse(image).cam, 0.4)
    capture = hd.sc.SCImage(
        pixel_array=overlay, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=series.reference.study_uid, series_instance_uid=uids.capture_series,
        series_number=RESULT_SERIES_NUMBER + 1, sop_instance_uid=uids.capture, instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "P"))
    capture.SeriesDescription = f"{_research_label(model)} Grad-CAM"[:64]
    capture.ImageComments = f"Key slice {index + 1} of {len(series)} with its Grad-CAM overlay (research use only)"
    return _filed_in_study(capture, study)
