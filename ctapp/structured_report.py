"""A DICOM Structured Report of a series' classification, written with highdicom:
a TID 1500 Measurement Report whose measurement group holds the series verdict
(a coded qualitative evaluation), the number of slices confidently assigned to
each class, the algorithm (model name and version) and the key slices as
source images. It references the source series (study, series and instance
UIDs in the evidence sequence) so a PACS can file it beside the images.

No header value that identifies a patient goes in: the evidence passed to
highdicom carries only the UIDs, so the report's patient module is empty
(name, ID, birth date, sex: present and empty, as type 2 attributes allow).
Codes of the app's own concepts use the private coding scheme ``99CTAPP``.
"""
from __future__ import annotations

import io

from .series import SeriesSummary
from .volumes import SeriesReference

SCHEME = "99CTAPP"
CT_CHEST = ("24627-2", "LN", "CT Chest")
MANUFACTURER = "CT slice classifier (research use only)"


def _stub(reference: SeriesReference, sop_class: str, sop_instance: str):
    """An instance of the source series as highdicom needs it for the
    evidence: its UIDs and an empty patient module."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = reference.study_uid, reference.series_uid
    ds.FrameOfReferenceUID = reference.frame_of_reference_uid
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber"):  # what highdicom copies from the evidence
        setattr(ds, keyword, "")
    return ds


def series_sr(reference: SeriesReference, summary: SeriesSummary, *, model_name: str, model_version: str,
              display_names: dict[str, str]):
    """The SR as a highdicom ``ComprehensiveSR`` dataset."""
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    evidence = []
    seen = set()
    for sop_class, sop_instance, _frame in reference.instances:
        if sop_instance not in seen:
            seen.add(sop_instance)
            evidence.append(_stub(reference, sop_class, sop_instance))
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=MANUFACTURER[:64]))
    if summary.label is not None:
        value = CodedConcept(summary.label.upper()[:16], SCHEME, f"{display_names.get(summary.label)}-like findings")
    elif summary.has_result:
        value = CodedConcept("NO_FINDING", SCHEME, "No finding class on enough confident slices")
    else:
        value = CodedConcept("NO_RESULT", SCHEME, "No result: too few slices answered confidently")
    measurements = [
        Measurement(name=CodedConcept(f"SLICES_{i}", SCHEME, f"Slices confidently classified as "
                                                              f"{display_names.get(key, key)}"[:64]),
                    value=count, unit=CodedConcept("{slices}", "UCUM", "slices"))
        for i, (key, count) in enumerate(summary.confident_counts.items())]
    measurements.append(Measurement(name=CodedConcept("SLICES_UNCERTAIN", SCHEME, "Slices without a confident answer"),
                                    value=summary.uncertain, unit=CodedConcept("{slices}", "UCUM", "slices")))
    sources = []
    for index in summary.key_slices:
        sop_class, sop_instance, frame = reference.instances[index]
        sources.append(SourceImageForMeasurementGroup(
            sop_class, sop_instance, referenced_frame_numbers=[frame + 1] if frame is not None else None))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"series {summary.series}"),
        algorithm_id=AlgorithmIdentification(name=model_name[:64], version=(model_version or "unknown")[:64]),
        qualitative_evaluations=[QualitativeEvaluation(CodedConcept("SERIES_CLASS", SCHEME, "Series classification"),
                                                       value)],
        measurements=measurements, source_images=sources)
    content = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                                procedure_reported=CodedConcept(*CT_CHEST), imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(evidence=evidence, content=content, series_instance_uid=hd.UID(), series_number=900,
                                 sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
                                 is_complete=True, is_final=False, is_verified=False,
                                 series_description="AI classification (research use only)")


def series_sr_bytes(reference: SeriesReference, summary: SeriesSummary, **kwargs) -> bytes:
    """The SR as a DICOM file (Part 10)."""
    dataset = series_sr(reference, summary, **kwargs)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
