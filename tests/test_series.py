"""Whole series and volumes (``ctapp.series_inputs``, ``ctapp.series``) and the command line on them:
grouping, reading order, orientation, Hounsfield units, compressed syntaxes,
NIfTI, enhanced multi-frame DICOM, limits, batched classification and the
series verdict. Every series is generated here (pydicom, nibabel)."""
from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import PATIENT_ID, PATIENT_NAME
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless
from series_synthetic import (
    dicom_series,
    enhanced_ct,
    grey_volume,
    hu_of,
    nifti_bytes,
    palette_dicom,
    shuffled_names,
    write_files,
    zip_bytes,
)

from ctapp.imaging import LUNG_WINDOW, decode
from ctapp.inference import CONFIDENT, LOW_CONFIDENCE, NOT_CHEST_CT, UNLIKE_TRAINING, Prediction
from ctapp.model_folders import load_model
from ctapp.series import (
    MIN_FINDING_SLICES, NOT_VALIDATED, SeriesPredictions, SeriesValidation, classify_series, summarise,
)
from ctapp.series_inputs import images_series, inputs_from_paths, read_inputs
from ctapp.volumes import Input, Limits

IDENTIFIERS = (PATIENT_NAME, "Doe", "Jane", PATIENT_ID, "19510203", "Nowhere", "ACC-4455")


def hu_of_series(series) -> np.ndarray:
    """Every slice's Hounsfield units, as the viewer and the model get them."""
    return np.stack([series.slice(i, LUNG_WINDOW).hu for i in range(len(series))])


def grey_of(series) -> np.ndarray:
    """The series as the model sees it (lung window), back in 0..255."""
    return np.stack([series.slice(i, LUNG_WINDOW).pixels for i in range(len(series))]) * 255


def read(members: dict[str, bytes], **kwargs):
    return read_inputs([Input(name, data) for name, data in members.items()], **kwargs)


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("orientation", ["standard", "rows-flipped", "columns-flipped", "transposed"])
@pytest.mark.parametrize("signed", [False, True])
def test_slices_come_out_in_reading_order_and_the_right_way_up(orientation, signed):
    grey = grey_volume(5, 40, seed=1)
    files = dicom_series(grey, orientation=orientation, signed=signed, reverse_instances=True)
    result = read(shuffled_names(files, np.random.default_rng(2)))
    assert not result.errors
    (series,) = result.series
    assert series.orientation == "axial" and len(series) == 5
    np.testing.assert_allclose(grey_of(series), grey, atol=1e-3)  # slice 0 most superior, R on the left, A up
    assert series.positions == pytest.approx([0, 2.5, 5, 7.5, 10])
    hu = series.slice(0, LUNG_WINDOW).hu
    assert hu.min() == pytest.approx(-1350, abs=0.01)  # rescale applied: G=0 is -1350 HU whatever was stored


def test_two_series_mixed_in_one_folder_are_told_apart():
    a, b = grey_volume(4, 32, seed=3), grey_volume(3, 40, seed=4)
    rng = np.random.default_rng(5)
    mixed = {**shuffled_names(dicom_series(a), rng), **shuffled_names(dicom_series(b, orientation="transposed"), rng)}
    names = list(mixed)
    rng.shuffle(names)
    result = read({n: mixed[n] for n in names})
    assert not result.errors and sorted(len(s) for s in result.series) == [3, 4]
    for series in result.series:
        expected = a if len(series) == 4 else b
        np.testing.assert_allclose(grey_of(series), expected, atol=1e-3)
        assert series.id.startswith("S-") and len(series.id) == 10
        assert series.reference.series_uid not in series.id + series.description()


@pytest.mark.parametrize("orientation, spacing", [("standard", (0.5, 0.8)), ("transposed", (0.8, 0.5))])
def test_pixel_spacing_follows_rows_and_columns_when_a_series_is_turned_for_display(orientation, spacing):
    """Stored with rows 0.5 mm apart and columns 0.8 mm apart: a series whose
    rows and columns are swapped for display has its spacing swapped too."""
    import pydicom

    files = {}
    for i, data in enumerate(dicom_series(grey_volume(3, 32, seed=8), orientation=orientation)):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.PixelSpacing = [0.5, 0.8]
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files[f"IM{i}"] = buffer.getvalue()
    (series,) = read(files).series
    assert series.spacing == spacing


def test_a_zip_reads_as_its_files_do():
    grey = grey_volume(4, 32, seed=6)
    members = shuffled_names(dicom_series(grey), np.random.default_rng(7), prefix="export/DIR1/")
    folder = read(members)
    zipped = read({"study.zip": zip_bytes({**members, "export/.DS_Store": b"junk"})})
    assert not zipped.errors
    np.testing.assert_array_equal(zipped.series[0].values, folder.series[0].values)
    assert zipped.series[0].id == folder.series[0].id
    assert all(s.startswith("study.zip:export/DIR1/IM") for s in zipped.series[0].sources)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless],
                         ids=["RLE", "JPEG-Lossless", "JPEG-LS", "JPEG-2000"])
def test_compressed_series_decode_to_the_same_values(syntax):
    grey = grey_volume(3, 32, seed=8)
    plain = read({f"p{i}": f for i, f in enumerate(dicom_series(grey, signed=True))}).series[0]
    files = dicom_series(grey, signed=True, syntax=syntax)
    assert all(syntax in f[:600].decode("latin-1") for f in files)  # really compressed
    result = read({f"c{i}": f for i, f in enumerate(files)})
    assert not result.errors
    np.testing.assert_array_equal(result.series[0].values, plain.values)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless],
                         ids=["RLE", "JPEG-Lossless", "JPEG-LS", "JPEG-2000"])
def test_runtime_plugins_alone_decode_every_compressed_syntax(syntax):
    """pylibjpeg with its codecs (requirements.txt) decodes each syntax; the
    test-only encoders (pyjpegls, imagecodecs) are not needed to read."""
    import pydicom
    from pydicom.pixels import pixel_array

    grey = grey_volume(1, 32, seed=9)
    dataset = pydicom.dcmread(io.BytesIO(dicom_series(grey, syntax=syntax)[0]))
    np.testing.assert_array_equal(pixel_array(dataset, decoding_plugin="pylibjpeg"), grey[0])


def test_an_undecodable_syntax_is_named():
    import pydicom

    grey = grey_volume(2, 32, seed=10)
    files = dicom_series(grey, syntax=RLELossless)
    broken = []
    for f in files:  # RLE data labelled as High-Throughput JPEG 2000: no plugin can decode it
        ds = pydicom.dcmread(io.BytesIO(f))
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        broken.append(buffer.getvalue())
    result = read({f"h{i}": f for i, f in enumerate(broken)})
    assert not result.series and len(result.errors) == 1
    assert "could not be decoded (transfer syntax: High-Throughput JPEG 2000" in result.errors[0].message


def test_nifti_volume_comes_out_as_its_dicom_series():
    grey = grey_volume(5, 40, seed=11)
    from_dicom = read({f"d{i}": f for i, f in enumerate(dicom_series(grey, orientation="rows-flipped"))}).series[0]
    for data in (nifti_bytes(grey, gz=True), nifti_bytes(grey, gz=False)):
        result = read({"volume": data})  # no extension: the content decides
        assert not result.errors
        (volume,) = result.series
        assert volume.kind == "NIfTI" and volume.orientation == "axial"
        # A float NIfTI is kept as whole Hounsfield units (int16), the DICOM series as its stored integers.
        assert volume.values.dtype == np.int16 and "Hounsfield units rounded to whole numbers" in volume.notes
        np.testing.assert_allclose(hu_of_series(volume), hu_of_series(from_dicom), atol=0.5)
        assert volume.positions == pytest.approx(from_dicom.positions)
        assert volume.spacing == pytest.approx((0.8, 0.8)) and from_dicom.spacing == pytest.approx((0.8, 0.8))


def test_a_volume_cut_short_is_refused_and_the_reason_kept_in_the_server_log(caplog):
    data = nifti_bytes(grey_volume(3, 32, seed=14), gz=False)
    with caplog.at_level("INFO", logger="ctapp.volume_formats"):
        result = read({"volume.nii": data[:-100]})
    assert not result.series and [e.message for e in result.errors] == [
        "volume.nii: the NIfTI voxel data is truncated or damaged"]
    (record,) = [r for r in caplog.records if r.getMessage() == "NIfTI data unreadable"]
    assert record.exc_info is not None  # the library's own words, for whoever runs the server


def test_a_volume_stored_with_rows_and_columns_exchanged_reads_as_the_same_volume():
    """Converters differ in which in-plane axis comes first; non-square pixels
    show that the spacing follows the axes it belongs to."""
    import nibabel as nib

    hu = hu_of(grey_volume(3, 32, seed=17))[:, :, :24]  # 32 rows, 24 columns
    row_mm, column_mm, step = 0.8, 0.6, 2.0
    columns_first = np.array([[-column_mm, 0, 0, 0], [0, -row_mm, 0, 0], [0, 0, step, 0], [0, 0, 0, 1]])
    rows_first = np.array([[0, -column_mm, 0, 0], [-row_mm, 0, 0, 0], [0, 0, step, 0], [0, 0, 0, 1]])
    volumes = {}
    for name, data, affine in (("i-left.nii", np.transpose(hu[::-1], (2, 1, 0)), columns_first),
                               ("i-posterior.nii", np.transpose(hu[::-1], (1, 2, 0)), rows_first)):
        (volumes[name],) = read({name: nib.Nifti1Image(data.astype(np.int16), affine).to_bytes()}).series
    a, b = volumes.values()
    np.testing.assert_array_equal(a.values, b.values)
    assert a.values.shape == (3, 32, 24) and a.spacing == b.spacing == pytest.approx((row_mm, column_mm))


@pytest.mark.parametrize("high, kept", [(3000, 3000), (40000, 32767)], ids=["int16 range", "beyond int16"])
def test_integral_nifti_voxels_are_kept_exactly_within_int16(high, kept):
    """Voxels are held as int16; beyond its range they are clipped (and the
    notes say so), never wrapped around."""
    import nibabel as nib

    data = np.zeros((16, 16, 3), np.int32)
    data[4:12, 4:12, :] = high
    data[0, 0, :] = -1000
    (volume,) = read({"volume.nii": nib.Nifti1Image(data, np.eye(4)).to_bytes()}).series
    assert volume.values.dtype == np.int16
    assert volume.values.max() == kept and volume.values.min() == -1000
    assert ("values beyond the int16 range (-32768 to 32767) clipped" in volume.notes) == (kept != high)


def test_enhanced_multi_frame_ct_uses_per_frame_positions_and_rescale():
    grey = grey_volume(6, 32, seed=12)
    result = read({"enhanced": enhanced_ct(grey, frame_order=[3, 1, 0, 5, 2, 4])})
    assert not result.errors
    np.testing.assert_allclose(grey_of(result.series[0]), grey, atol=1e-3)
    assert [f[2] for f in result.series[0].reference.instances] == [2, 1, 4, 0, 5, 3]
    # Without positions the frames keep the order they are stored in.
    unplaced = read({"enhanced": enhanced_ct(grey, positions=False)})
    np.testing.assert_allclose(grey_of(unplaced.series[0]), grey, atol=1e-3)
    assert [f[2] for f in unplaced.series[0].reference.instances] == list(range(6))
    assert unplaced.series[0].positions == [None] * 6
    assert result.series[0].spacing == pytest.approx((0.8, 0.8))  # from the shared pixel measures


def test_an_enhanced_ct_with_its_geometry_at_the_top_level_is_placed_all_the_same():
    """Some converters write orientation and pixel spacing once for the file
    instead of in the functional groups; a file without any pixel spacing is
    read too, without one."""
    import pydicom
    from synthetic import dicom_file_bytes

    grey = grey_volume(4, 32, seed=13)
    ds = pydicom.dcmread(io.BytesIO(enhanced_ct(grey, frame_order=[2, 0, 3, 1])))
    shared = ds.SharedFunctionalGroupsSequence[0]
    ds.ImageOrientationPatient = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    ds.PixelSpacing = [0.7, 0.7]
    del shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    (series,) = read({"enhanced": dicom_file_bytes(ds)}).series
    np.testing.assert_allclose(grey_of(series), grey, atol=1e-3)  # ordered by position: the orientation was read
    assert series.spacing == pytest.approx((0.7, 0.7)) and series.notes == []
    del ds.PixelSpacing
    result = read({"enhanced": dicom_file_bytes(ds)})
    assert not result.errors and result.series[0].spacing is None


def test_a_one_frame_enhanced_ct_with_only_per_frame_groups_is_read_as_enhanced():
    import pydicom
    from synthetic import dicom_file_bytes

    grey = grey_volume(1, 32, seed=16)
    ds = pydicom.dcmread(io.BytesIO(enhanced_ct(grey, z0=42.0)))
    per_frame = ds.PerFrameFunctionalGroupsSequence[0]
    for name, value in ds.SharedFunctionalGroupsSequence[0].items():
        per_frame[name] = value
    del ds.SharedFunctionalGroupsSequence
    (series,) = read({"enhanced": dicom_file_bytes(ds)}).series
    assert series.positions[0] is not None and series.spacing == pytest.approx((0.8, 0.8))  # placed
    np.testing.assert_allclose(grey_of(series), grey, atol=1e-3)  # its rescale, from the per-frame group


def test_an_enhanced_ct_frame_with_half_a_rescale_uses_the_files_own():
    import pydicom
    from synthetic import dicom_file_bytes

    grey = grey_volume(3, 32, seed=12)
    ds = pydicom.dcmread(io.BytesIO(enhanced_ct(grey)))
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    slope = float(transform.RescaleSlope)
    del transform.RescaleIntercept  # a slope without its intercept: not a usable pair
    ds.RescaleSlope, ds.RescaleIntercept = slope, -1000
    result = read({"enhanced": dicom_file_bytes(ds)})
    assert not result.errors
    stored = np.stack([ds.pixel_array[k] for k in range(3)]).astype(np.float64)
    np.testing.assert_allclose(hu_of_series(result.series[0]), stored * slope - 1000, atol=1e-3)


@pytest.mark.parametrize("brightest", [255, 100])  # a dim palette stays dim: its 16-bit entries are not stretched
def test_palette_colour_dicom_decodes_to_grey(brightest):
    data, expected = palette_dicom(brightest=brightest)
    image = decode(data)
    np.testing.assert_allclose(image.pixels * 255, expected, atol=1e-3)
    assert "palette-colour DICOM shown in grey" in image.notes
    assert image.mode == "DICOM" and image.source_format == "DICOM"  # one row of the audit's table of modes


def test_instance_numbers_order_a_series_without_positions():
    grey = grey_volume(4, 32, seed=13)
    result = read(shuffled_names(dicom_series(grey, positions=False), np.random.default_rng(1)))
    np.testing.assert_allclose(grey_of(result.series[0]), grey, atol=1e-3)
    assert any("ordered by instance number" in n for n in result.series[0].notes)
    assert result.series[0].positions == [None] * 4 and result.series[0].orientation == ""
    assert result.series[0].description() == "CT, 4 slices, 32x32 px"  # no orientation, no spacing to claim


def test_a_slice_without_an_instance_number_comes_first_when_nothing_else_orders_it():
    import pydicom
    from synthetic import dicom_file_bytes

    grey = grey_volume(4, 32, seed=13)
    files = dicom_series(grey, positions=False)  # instance numbers 1, 2, 3, 4
    third = pydicom.dcmread(io.BytesIO(files[2]))
    del third.InstanceNumber
    files[2] = dicom_file_bytes(third)
    (series,) = read({f"f{i}": data for i, data in enumerate(files)}).series
    np.testing.assert_allclose(grey_of(series), grey[[2, 0, 1, 3]], atol=1e-3)


# --------------------------------------------------------------------------- limits


def test_mixed_shapes_and_missing_positions_are_refused_and_nothing_else_is_lost():
    import pydicom

    grey = grey_volume(4, 32, seed=14)
    odd = dicom_series(grey_volume(1, 40, seed=15))[0]
    files = dicom_series(grey)
    ds = pydicom.dcmread(io.BytesIO(odd))
    ds.SeriesInstanceUID = pydicom.dcmread(io.BytesIO(files[0])).SeriesInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer)
    gapped = dicom_series(grey_volume(3, 32, seed=16))
    ds = pydicom.dcmread(io.BytesIO(gapped[1]))
    del ds.ImagePositionPatient
    buffer2 = io.BytesIO()
    ds.save_as(buffer2)
    good = dicom_series(grey_volume(3, 32, seed=17))
    members = {**{f"a{i}": f for i, f in enumerate(files)}, "a-odd": buffer.getvalue(),
               **{f"b{i}": f for i, f in enumerate([gapped[0], buffer2.getvalue(), gapped[2]])},
               **{f"c{i}": f for i, f in enumerate(good)}, "slice.png": _png(grey[0])}
    result = read(members)
    messages = [e.message for e in result.errors]
    assert len(messages) == 2
    assert any("slices of different sizes in one series: 32x32 (4 slices), 40x40 (1 slices)" in m for m in messages)
    assert any("1 of 3 slices have no position" in m for m in messages)
    assert [len(s) for s in result.series] == [3] and len(result.images) == 1
    assert [kind for kind, _ in result.order] == ["error", "error", "series", "image"]  # where each first appeared
    assert {e.name for e in result.errors} <= set(members)  # each error names a file of its series


def test_a_series_of_slices_too_small_to_read_is_refused_by_their_size():
    result = read({f"IM{i}": f for i, f in enumerate(dicom_series(grey_volume(2, 12, seed=3)))})
    assert not result.series
    assert [e.message.split(": ", 1)[1] for e in result.errors] == [
        "slices of 12x12 pixels are outside what this app reads (16 to 2048 pixels a side)"] * 2


FLAT = [1, 0, 0, 1, 0, 0]  # an orientation with rows and columns along the same axis: not one volume


def test_a_series_keeps_its_study_uid_and_refuses_a_degenerate_orientation():
    import pydicom

    files = dicom_series(grey_volume(3, 32, seed=5))
    (series,) = read({f"IM{i}": f for i, f in enumerate(files)}).series
    assert series.reference.study_uid == pydicom.dcmread(io.BytesIO(files[0])).StudyInstanceUID != ""
    (series,) = read(_edited(files, StudyInstanceUID=None)).series
    assert series.reference.study_uid == ""
    # A missing UID is left empty in the reference a structured report cites, never a made-up value.
    (series,) = read(_edited(files, SOPClassUID=None)).series
    assert [(sop_class, frame) for sop_class, _, frame in series.reference.instances] == [("", None)] * 3
    (error,) = read(_edited(files, ImageOrientationPatient=FLAT)).errors
    assert error.message.endswith(": the slice orientation (ImageOrientationPatient) is not a valid pair of "
                                  "directions")


def _png(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_zip_bomb_is_refused_before_it_is_expanded():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(3):
            archive.writestr(f"IM{i}", b"\0" * (8 << 20))  # 24 MB of zeros in ~25 kB
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000
    result = read({"bomb.zip": bomb}, limits=Limits(max_expanded_bytes=10 << 20))
    assert not result.series and not result.images
    assert "expands to more than 10 MB (a possible zip bomb)" in result.errors[0].message


def test_limits_on_members_slices_and_total_bytes():
    grey = grey_volume(6, 32, seed=18)
    members = {f"IM{i}": f for i, f in enumerate(dicom_series(grey))}
    too_many = read({"many.zip": zip_bytes(members)}, limits=Limits(max_zip_members=5))
    assert too_many.errors[0].message == "many.zip: the archive holds 6 files; at most 5 are read from one archive"
    too_large = read(members, limits=Limits(max_voxels=6 * 32 * 32 - 1))
    assert "6 slices of 32x32 pixels (0 megavoxels); at most 0 megavoxels" in too_large.errors[0].message
    assert not read(members, limits=Limits(max_voxels=6 * 32 * 32)).errors
    volume = {"volume.nii": nifti_bytes(grey_volume(3, 32, seed=15), gz=False)}
    assert not read(volume, limits=Limits(max_voxels=3 * 32 * 32)).errors
    assert [e.message for e in read(volume, limits=Limits(max_voxels=3 * 32 * 32 - 1)).errors] == [
        "volume.nii: a volume of 32x32x3 voxels; at most 1000 slices and 0 megavoxels are read"]
    assert len(read({"six.zip": zip_bytes(members)}, limits=Limits(max_zip_members=6)).series[0]) == 6
    too_long = read(members, limits=Limits(max_slices=5))
    assert "6 slices; at most 5 are read from one series" in too_long.errors[0].message
    too_big = read(members, limits=Limits(max_total_bytes=3 * len(members["IM0"])))
    assert len(too_big.errors) == 3 and "add up to more than" in too_big.errors[0].message
    assert not read(members, limits=Limits(max_total_bytes=sum(map(len, members.values())))).errors  # exactly enough
    # Inflated members count too, and the error names the archive they came from.
    archive = zip_bytes(members)
    budget = Limits(max_total_bytes=len(archive) + 2 * len(members["IM0"]))
    (inflated,) = read({"big.zip": archive}, limits=budget).errors
    assert inflated.message == ("big.zip: the inputs add up to more than 0 MB, more than one read accepts; upload "
                                "fewer series at a time")
    nested = read({"outer.zip": zip_bytes({"inner.zip": zip_bytes(members)})})
    assert "an archive inside an archive is not opened" in nested.errors[0].message


def _encrypted_zip(member: bytes) -> bytes:
    """A zip whose one member is flagged as encrypted (the flag is what a reader checks before asking for a password)."""
    data = bytearray(zip_bytes({"IM0": member}))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local header and central directory
        at = data.find(signature)
        data[at + offset] |= 0x1
    return bytes(data)


@pytest.mark.parametrize("name, data, words", [
    ("cut.zip", b"PK\x03\x04" + bytes(40), "cut.zip: the zip archive is damaged or incomplete"),
    ("locked.zip", None, "locked.zip: the archive is encrypted; export it without a password"),
    ("hidden.zip", {".DS_Store": b"x", "__MACOSX/IM0": b"x", "DICOMDIR": b"x"}, "hidden.zip: the archive holds no files"),
    ("empty.dcm", b"", "empty.dcm: the file is empty"),
])
def test_archives_and_files_that_hold_no_slice_say_why(name, data, words):
    if data is None:
        data = _encrypted_zip(dicom_series(grey_volume(1, 32, seed=41))[0])
    elif isinstance(data, dict):
        data = zip_bytes(data)
    result = read({name: data})
    assert not result.series and not result.images
    assert [e.message for e in result.errors] == [words]


def test_what_counts_as_a_series_upload_is_told_from_its_bytes():
    from ctapp.series_inputs import holds_series

    grey = grey_volume(3, 32, seed=42)
    one, two = dicom_series(grey)[:2]
    assert not holds_series([("a.dcm", one), ("b.png", _png(grey[0]))])  # one single-frame slice: a slice
    assert holds_series([("a.dcm", one), ("b.dcm", two)])
    assert holds_series([("enhanced", enhanced_ct(grey))])  # one file, three frames
    assert holds_series([("vol.nii.gz", nifti_bytes(grey))])
    assert holds_series([("vol.nii", nifti_bytes(grey, gz=False))])
    assert holds_series([("export.zip", zip_bytes({"IM0": one}))])


def test_a_zip_member_whose_bytes_are_damaged_is_reported_not_raised(caplog):
    member = dicom_series(grey_volume(1, 32, seed=41))[0]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("IM0", member)
    data = bytearray(buffer.getvalue())
    data[data.find(member) + len(member) // 2] ^= 0xFF  # the directory is intact, the CRC-32 no longer matches
    with caplog.at_level("INFO", logger="ctapp.series_inputs"):
        result = read({"crc.zip": bytes(data)})
    assert [e.message for e in result.errors] == [
        "crc.zip: the archive is damaged or uses an unsupported compression"]
    assert "zip member unreadable" in caplog.text and "Bad CRC-32" in caplog.text


def test_loose_images_stack_in_input_order_under_a_short_name_of_their_pixels():
    """The viewer's stack of loose images is named, like a DICOM series, by the
    first 8 hex digits of its pixels' digest: the same images, the same name."""
    import hashlib

    grey = grey_volume(2, 32, seed=60)
    stack = images_series(read({"b.png": _png(grey[0]), "a.png": _png(grey[1])}).images)
    assert stack.sources == ["b.png", "a.png"] and not stack.is_hu
    np.testing.assert_allclose(np.stack(stack.values) * 255, grey, atol=1e-3)
    digest = hashlib.sha256()
    for values in stack.values:
        digest.update(str(values.shape).encode() + values.tobytes())
    assert stack.digest == digest.hexdigest() and stack.id == "images-" + digest.hexdigest()[:8]
    again = images_series(read({"c.png": _png(grey[0]), "d.png": _png(grey[1])}).images)
    assert again.id == stack.id
    assert images_series([]) is None


def test_limits_on_loose_images_series_and_member_size(monkeypatch):
    from ctapp import imaging

    pngs = {f"s{i}.png": _png(grey_volume(1, 32, seed=50 + i)[0]) for i in range(3)}
    result = read(pngs, limits=Limits(max_images=2))
    assert [name for name, _ in result.images] == ["s0.png", "s1.png"]
    assert [e.message for e in result.errors] == ["s2.png: more than 2 loose images; this one was not read"]
    two_series = {**{f"a{i}": f for i, f in enumerate(dicom_series(grey_volume(2, 32, seed=52)))},
                  **{f"b{i}": f for i, f in enumerate(dicom_series(grey_volume(2, 32, seed=53)))}}
    one_series_bytes = 2 * 32 * 32 * 2  # two slices of 32x32 stored integers
    result = read(two_series, limits=Limits(max_held_bytes=one_series_bytes))
    assert len(result.series) == 1
    (refused,) = result.errors
    assert refused.series is not None and refused.name == "b0"
    assert "2 slices of 32x32 pixels would take the values held by this read to 0 MB; at most 0 MB are read at " \
           "once; upload fewer series at a time" in refused.message
    assert len(read(two_series, limits=Limits(max_held_bytes=2 * one_series_bytes)).series) == 2
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", 1000)
    result = read({"big.zip": zip_bytes({"IM0": two_series["a0"]})})
    assert [e.message for e in result.errors] == ["big.zip: member IM0 is larger than 0 MB"]
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", len(two_series["a0"]))  # a file exactly at the limit is read
    assert len(read({"a0": two_series["a0"]}).series) == 1
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", len(two_series["a0"]) - 1)
    (error,) = read({"a0": two_series["a0"]}).errors
    assert error.message.startswith("a0: the file is ") and "; the limit is " in error.message


def test_paths_that_cannot_be_read_carry_their_reason(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a.dcm").write_bytes(b"x" * 100)
    (tmp_path / "b.dcm").write_bytes(b"y" * 100)
    inputs = inputs_from_paths([tmp_path / "folder", tmp_path / "gone.dcm", tmp_path / "a.dcm", tmp_path / "b.dcm"],
                               Limits(max_total_bytes=150))
    assert [(Path(i.name).name, i.error) for i in inputs] == [
        ("folder", f"{tmp_path / 'folder'}: not a file"), ("gone.dcm", f"{tmp_path / 'gone.dcm'}: no such file"),
        ("a.dcm", ""), ("b.dcm", f"{tmp_path / 'b.dcm'}: the inputs add up to more than 0 MB; this file was not read")]
    assert inputs[2].data == b"x" * 100 and inputs[0].data == inputs[1].data == inputs[3].data == b""
    assert [e.message for e in read_inputs(inputs[:2]).errors] == [inputs[0].error, inputs[1].error]
    # Files adding up to exactly the limit are all read.
    both = inputs_from_paths([tmp_path / "a.dcm", tmp_path / "b.dcm"], Limits(max_total_bytes=200))
    assert [(i.error, len(i.data)) for i in both] == [("", 100), ("", 100)]


@pytest.mark.parametrize("positions, step", [([0.0, 2.5, 5.0, 7.5], 2.5), ([0.0, 2.5, None, 7.5], None),
                                             ([4.0], None), ([None, None], None)])
def test_a_slice_step_needs_two_positions_or_more_and_every_slice_placed(positions, step):
    from ctapp.volumes import Series

    series = Series("S-1", "DICOM", np.zeros((len(positions), 8, 8), np.int16), ["IM"] * len(positions),
                    positions=positions)
    assert series.slice_step() == step


def test_a_path_that_fails_to_read_carries_its_reason_and_no_bytes(tmp_path, monkeypatch):
    (tmp_path / "a.dcm").write_bytes(b"x" * 100)

    def refuse(_path):
        raise PermissionError("denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    (item,) = inputs_from_paths([tmp_path / "a.dcm"])
    assert (item.data, item.error) == (b"", f"{tmp_path / 'a.dcm'}: the file could not be read (PermissionError)")


def test_a_gzip_bomb_is_looked_at_without_being_inflated():
    """To tell whether a .gz upload is a NIfTI volume only its header is
    inflated: 256 MB of packed zeros never reach memory."""
    import tracemalloc
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    zeros = bytes(1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(256)) + packer.flush()
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        result = read({"scan.nii.gz": bomb})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result.series and len(result.errors) == 1
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MB"


def test_a_nifti_larger_than_the_limits_is_refused_from_its_header():
    import gzip

    import nibabel as nib

    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), np.eye(4)).header
    header.set_data_shape((512, 512, 4000))
    raw = header.binaryblock + b"\0" * 4  # a header that promises 2 GB of voxels and holds none
    result = read({"huge.nii.gz": gzip.compress(bytes(raw))})
    assert "512x512x4000 voxels; at most 1000 slices" in result.errors[0].message


def _nifti_header_only(shape: tuple[int, ...], dtype, voxel_bytes: bytes = b"") -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4 + voxel_bytes


def test_a_nifti_whose_voxels_stop_after_its_header_is_refused_at_its_first_slab():
    """A 1.4 kB file whose header promises 2 GB of float64 voxels: refused
    when the first slab is read, nothing of the promised size allocated."""
    import tracemalloc

    data = _nifti_header_only((512, 512, 1000), np.float64, bytes(1024))
    tracemalloc.start()
    try:
        result = read({"cut.nii": data}, limits=Limits(max_held_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (error,) = result.errors
    assert "cut.nii: a volume of 512x512x1000 voxels would take the values held by this read to 500 MB" in error.message
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MB"
    assert [e.message for e in read({"cut.nii": data}).errors] == [
        "cut.nii: the NIfTI voxel data is truncated or damaged"]


def test_a_nifti_read_slab_by_slab_is_the_volume_read_at_once(monkeypatch):
    from ctapp import volume_formats

    grey = grey_volume(7, 32, seed=23)
    data = nifti_bytes(grey)
    (whole,) = read({"v.nii.gz": data}).series
    monkeypatch.setattr(volume_formats, "NIFTI_SLAB_BYTES", 32 * 32 * 4 * 2)  # two float32 slices a slab
    (slabs,) = read({"v.nii.gz": data}).series
    np.testing.assert_array_equal(slabs.values, whole.values)
    assert slabs.values.dtype == np.int16 and slabs.digest == whole.digest


def test_a_dicom_frame_count_beyond_the_limits_is_refused_before_any_work_per_frame(monkeypatch):
    import pydicom
    from synthetic import dicom_file_bytes

    from ctapp import volume_formats

    def no_work_per_frame(*_args):
        raise AssertionError("a frame was looked at")

    monkeypatch.setattr(volume_formats, "_group_value", no_work_per_frame)
    ds = pydicom.dcmread(io.BytesIO(enhanced_ct(grey_volume(3, 32, seed=24))))
    for frames in (1001, 2_000_000_000):
        ds.NumberOfFrames = frames
        (error,) = read({"lying.dcm": dicom_file_bytes(ds)}).errors
        assert error.message == (f"lying.dcm: the header claims {frames} frames of 32x32 pixels; at most 1000 "
                                 "slices and 262 megavoxels are read from one series")
    ds.NumberOfFrames = 3
    (error,) = read({"three.dcm": dicom_file_bytes(ds)}, limits=Limits(max_slices=2)).errors
    assert "the header claims 3 frames" in error.message


def test_one_budget_counts_the_values_of_every_file_of_a_read():
    """Series, volumes and loose images of one read share one budget; a
    series over it is refused before it is decoded, the rest is read."""
    grey = grey_volume(2, 32, seed=25)
    png = _png(grey[0])
    volume = nifti_bytes(grey_volume(2, 32, seed=26))
    members = {"images.zip": zip_bytes({"a.png": png, "b.png": png}), "v.nii.gz": volume,
               **{f"IM{i}": f for i, f in enumerate(dicom_series(grey))}}
    everything = read(members)
    assert not everything.errors and len(everything.images) == 2 and len(everything.series) == 2
    image_bytes = 2 * 32 * 32 * 4  # float32 grey
    volume_bytes = 2 * 32 * 32 * 2  # int16
    short = read(members, limits=Limits(max_held_bytes=image_bytes + volume_bytes))
    assert len(short.images) == 2 and [s.kind for s in short.series] == ["NIfTI"]
    (refused,) = short.errors
    assert refused.series is not None and "would take the values held by this read to" in refused.message
    one_image = read(members, limits=Limits(max_held_bytes=image_bytes // 2))
    assert len(one_image.images) == 1 and not one_image.series
    assert "images.zip:b.png would take the values held" in one_image.errors[0].message


def test_many_single_slice_series_of_many_patients_are_all_read():
    """Each slice its own series (62 slices of 10 patients once met a limit of 20 series)."""
    files = {}
    for k in range(62):
        (one,) = dicom_series(grey_volume(1, 32, seed=k % 10), z0=float(k))
        files[f"patient{k % 10}/IM{k}"] = one
    result = read(files)
    assert not result.errors and len(result.series) == 62
    assert all(s.values.dtype.itemsize == 2 for s in result.series)  # stored integers, not floats


def test_an_animated_image_with_more_frames_than_the_limit_is_refused_before_any_is_decoded(monkeypatch):
    from ctapp import imaging

    frames = [Image.fromarray(g) for g in grey_volume(5, 32, seed=27)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    monkeypatch.setattr(imaging, "MAX_FRAMES", 4)
    monkeypatch.setattr(Image.Image, "seek", lambda *_: pytest.fail("a frame was decoded"))
    (error,) = read({"frames.png": buffer.getvalue()}).errors
    assert error.message == "frames.png: the image has 5 frames; at most 4 are read; export the slice as a single image"


def test_no_header_value_that_identifies_the_patient_is_kept_for_display():
    grey = grey_volume(3, 32, seed=19)
    result = read({f"x{i}": f for i, f in enumerate(dicom_series(grey))})
    (series,) = result.series
    shown = " ".join([series.id, series.description(), *series.notes, *(series.slice_name(i) for i in range(3))])
    for identifier in IDENTIFIERS:
        assert identifier not in shown


# --------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model)


def test_series_slices_give_the_probabilities_of_the_same_pixels_as_png(model, tmp_path):
    grey = grey_volume(5, 48, seed=20, labels=(0, 1, 0, 1, 1))
    files = dicom_series(grey, orientation="columns-flipped", signed=True, reverse_instances=True)
    (series,) = read(shuffled_names(files, np.random.default_rng(3))).series
    seen = []
    result = classify_series(model, series, batch_size=2, on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (5, 5) and len(seen) == 3  # one report per batch
    for k in range(5):
        path = tmp_path / f"{k}.png"
        Image.fromarray(grey[k]).save(path)
        single = model.predict(path)
        batched = result.predictions[k]
        assert batched.label == single.label and batched.state == single.state
        for name in model.class_names:
            assert batched.probabilities[name] == pytest.approx(single.probabilities[name], abs=1e-4)
        assert batched.ood_score == pytest.approx(single.ood_score, rel=1e-3)


def test_the_apps_series_cache_answers_with_a_retrained_model_once_it_is_replaced(tmp_path):
    """A model retrained into the same folder must not keep answering with the
    old weights' cached series result."""
    import os
    import shutil

    from tiny_models import write_model_folder

    from ctapp import ui_cache
    from ctapp.series_inputs import images_series

    folder = write_model_folder(tmp_path / "m", seed=0)
    grey = grey_volume(3, 32, seed=40)
    series = images_series(read({f"{i}.png": _png(g) for i, g in enumerate(grey)}).images)

    def probabilities(result) -> list[dict]:
        return [p.probabilities for p in result.predictions]

    progress = []
    first = ui_cache.classify_series(folder, series, on_progress=lambda done, total: progress.append((done, total)))
    assert progress[-1] == (3, 3)  # the page's progress bar is fed while the series is classified
    assert ui_cache.classify_series(folder, series) is first  # then kept, not computed again
    png = _png(grey[0])
    before = ui_cache.analyse(folder, "sha-of-slice-0", png)
    predicted = ui_cache.predict(folder, "sha-of-slice-0", png)
    write_model_folder(tmp_path / "retrained", seed=7)
    for name in ("model.pt", "model_card.json"):
        shutil.copy(tmp_path / "retrained" / name, folder / name)
    stamp = (folder / "model.pt").stat().st_mtime + 5  # a later file time, whatever the clock's resolution
    os.utime(folder / "model.pt", (stamp, stamp))
    expected = classify_series(load_model(folder), series)
    assert probabilities(ui_cache.classify_series(folder, series)) == probabilities(expected)
    assert probabilities(expected) != probabilities(first)
    # The same holds for one uploaded slice's cached analysis.
    after = ui_cache.analyse(folder, "sha-of-slice-0", png)
    assert after.prediction.probabilities == load_model(folder).predict(png).probabilities
    assert after.prediction.probabilities != before.prediction.probabilities
    assert ui_cache.predict(folder, "sha-of-slice-0", png).probabilities == after.prediction.probabilities \
        != predicted.probabilities  # and its cached prediction


def test_the_viewers_cached_map_of_a_slice_is_the_models_own_for_the_method_asked(tmp_path):
    from tiny_models import write_model_folder

    from ctapp import ui_cache
    from ctapp.series_inputs import images_series

    folder = write_model_folder(tmp_path / "m", seed=0)
    model = load_model(folder)
    series = images_series(read({f"{i}.png": _png(g) for i, g in enumerate(grey_volume(3, 32, seed=43))}).images)
    image = series.slice(1, model.preprocess.window)
    maps = {}
    for method in ("Grad-CAM", "Grad-CAM++"):
        maps[method] = ui_cache.analyse_series_slice(folder, series, 1, image, method=method).cam
        np.testing.assert_allclose(maps[method], model.analyse(image, method=method).cam, atol=1e-6)
    assert not np.allclose(maps["Grad-CAM"], maps["Grad-CAM++"])  # the method is part of the cache key
    np.testing.assert_array_equal(ui_cache.analyse_series_slice(folder, series, 1, image).cam, maps["Grad-CAM"])
    other = images_series(read({f"{i}.png": _png(g) for i, g in enumerate(grey_volume(3, 32, seed=44))}).images)
    other_image = other.slice(1, model.preprocess.window)  # the same slice number of another series
    np.testing.assert_allclose(ui_cache.analyse_series_slice(folder, other, 1, other_image).cam,
                               model.analyse(other_image).cam, atol=1e-6)


def test_the_apps_upload_cache_reads_names_that_are_not_valid_text():
    """A browser can send a file name that does not encode (a lone surrogate
    from a mangled name): the upload is read all the same, once per content."""
    from ctapp import ui_cache

    grey = grey_volume(1, 32, seed=41)
    odd = [Input("scan\udcff.png", _png(grey[0]))]
    result = ui_cache.read_series(odd)
    assert [name for name, _ in result.images] == ["scan\udcff.png"] and not result.errors
    assert ui_cache.read_series(list(odd)) is result


def test_an_ensemble_classifies_a_series_as_it_predicts_each_slice(tmp_path):
    from tiny_models import write_model_folder

    from ctapp.inference import EnsembleModel
    from ctapp.model_folders import ENSEMBLE_FILE
    write_model_folder(tmp_path / "a", seed=0)
    write_model_folder(tmp_path / "b", seed=7)
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../a", "../b"],
                                                            "confidence_threshold": 0.6}))
    ensemble = load_model(tmp_path / "ab")
    assert isinstance(ensemble, EnsembleModel)
    grey = grey_volume(4, 48, seed=21, labels=(0, 1, 1, 0))
    (series,) = read(shuffled_names(dicom_series(grey), np.random.default_rng(4))).series
    seen = []
    result = classify_series(ensemble, series, on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (4, 4) and [done for done, _ in seen] == sorted(done for done, _ in seen)  # in slices
    for k in range(4):
        path = tmp_path / f"{k}.png"
        Image.fromarray(grey[k]).save(path)
        single, batched = ensemble.predict(path), result.predictions[k]
        assert batched.state == single.state and batched.reasons == single.reasons
        for name in ensemble.class_names:
            assert batched.probabilities[name] == pytest.approx(single.probabilities[name], abs=1e-4)
    assert result.probabilities.shape == (4, len(ensemble.class_names))


def _predictions(states_labels: list[tuple[str, str]], classes=("covid", "non-covid"),
                 display_names=("COVID", "Non-COVID")) -> SeriesPredictions:
    preds = []
    for state, label in states_labels:
        p = 0.9 if state == CONFIDENT else 0.55
        probs = {c: (p if c == label else (1 - p) / (len(classes) - 1)) for c in classes}
        preds.append(Prediction(label, label.title(), probs, p, state != CONFIDENT, state == NOT_CHEST_CT, None,
                                [], [], state))
    return SeriesPredictions(preds, list(classes), list(display_names)[:len(classes)])


def test_the_verdict_counts_confident_slices_of_a_finding_class_only():
    c, u, n = CONFIDENT, LOW_CONFIDENCE, NOT_CHEST_CT
    finding = _predictions([(c, "covid")] * 4 + [(c, "non-covid")] * 5 + [(u, "covid")] * 6 + [(n, "covid")])
    summary = summarise("S-1", finding)
    assert summary.label == "covid" and summary.verdict == "COVID-like findings on 4 of 16 slices"
    assert summary.confident_counts == {"covid": 4, "non-covid": 5}
    assert summary.uncertain == 7 and summary.uncertain_by_state[LOW_CONFIDENCE] == 6
    assert set(summary.key_slices) == {0, 1, 2, 3}
    # Uncertain slices never make a finding, however many lean to it.
    leaning = summarise("S-2", _predictions([(c, "covid")] * (MIN_FINDING_SLICES - 1) + [(u, "covid")] * 10
                                            + [(c, "non-covid")] * 10))
    assert leaning.label is None and leaning.has_result and leaning.outcome == "no finding"
    assert leaning.verdict == (f"No finding class reached: 12 of 22 slices answered confidently, no finding class on "
                               f"{MIN_FINDING_SLICES} or more of them (Non-COVID on 10); not a negative result; "
                               f"{NOT_VALIDATED}")
    nothing = summarise("S-3", _predictions([(u, "covid")] * 10 + [(c, "covid")]))
    assert not nothing.has_result and nothing.label is None and nothing.verdict.startswith("No result: only 1 of 11")


def _card(covid_no_finding: int, *, written_before_the_gate: bool = False) -> dict:
    """A card's out-of-fold series check: the rule alone's counts, and the
    app's (the gate already applied: no COVID series reassured)."""
    rule_alone = {"covid": {"finding": 24, "no finding": covid_no_finding, "no result": 23},
                  "non-covid": {"finding": 1, "no finding": 28, "no result": 20}}
    as_answered = {"covid": {"finding": 24, "no finding": 0, "no result": 23 + covid_no_finding},
                   "non-covid": {"finding": 1, "no finding": 0, "no result": 48}}
    held_out = {"counts": rule_alone} if written_before_the_gate else \
        {"counts": as_answered, "rule_alone": {"counts": rule_alone}}
    return {"series_validation": {"out_of_fold": held_out}}


def _as_loaded(result: SeriesPredictions, card: dict) -> SeriesPredictions:
    model = type("Model", (), {"class_names": result.class_names, "display_names": result.display_names,
                               "card": card})
    return SeriesPredictions.of_model(model, result.predictions)


NO_FINDING_SERIES = [(CONFIDENT, "non-covid")] * 17 + [(LOW_CONFIDENCE, "covid")] * 3


@pytest.mark.parametrize("before", [False, True], ids=["rule alone apart", "card written before the gate"])
def test_no_finding_from_a_model_that_reassured_covid_series_out_of_fold_is_no_result_with_the_figures(before):
    result = _as_loaded(_predictions(NO_FINDING_SERIES), _card(3, written_before_the_gate=before))
    assert result.validation == SeriesValidation("COVID", reassured=3, judged=27)
    summary = summarise("S-1", result)
    assert summary.outcome == "no result" and not summary.has_result and summary.label is None
    assert summary.verdict == ("No result: no finding class reached (17 of 20 slices answered confidently; Non-COVID "
                               "on 17), but out of fold this model gave that answer to 3 of 27 COVID series it judged, "
                               "so it does not rule COVID out")
    assert summary.confident_counts == {"covid": 0, "non-covid": 17} and summary.uncertain == 3
    # What series_check validates: the rule alone, whatever the card says.
    assert summarise("S-1", result, rule_only=True).outcome == "no finding"


def test_no_finding_from_a_model_that_reassured_no_covid_series_stays_neutral():
    result = _as_loaded(_predictions(NO_FINDING_SERIES), _card(0))
    assert result.validation == SeriesValidation("COVID", reassured=0, judged=24)
    summary = summarise("S-1", result)
    assert summary.outcome == "no finding" and summary.has_result
    assert summary.verdict == (f"No finding class reached: 17 of 20 slices answered confidently, no finding class on "
                               f"{MIN_FINDING_SLICES} or more of them (Non-COVID on 17); not a negative result")


@pytest.mark.parametrize("card", [{}, {"series_validation": {"foreign": {"counts": {"COVID": {"no finding": 3}}}}},
                                  {"series_validation": {"out_of_fold": {"rule_alone": {"counts": {
                                      "covid": {"finding": 0, "no finding": 0, "no result": 9}}}}}}],
                         ids=["no check", "only another task's series", "no COVID series judged"])
def test_no_finding_from_a_model_without_a_series_check_says_it_is_not_validated(card):
    result = _as_loaded(_predictions(NO_FINDING_SERIES), card)
    assert result.validation is None
    summary = summarise("S-1", result)
    assert summary.outcome == "no finding" and summary.verdict.endswith("; not a negative result; " + NOT_VALIDATED)


@pytest.mark.parametrize("card", [_card(3), _card(0), {}], ids=["reassured", "validated", "unvalidated"])
def test_a_series_with_a_finding_is_reported_alike_whatever_the_card(card):
    plain = _predictions([(CONFIDENT, "covid")] * 4 + [(CONFIDENT, "non-covid")] * 6)
    summary = summarise("S-1", _as_loaded(plain, card))
    assert summary.outcome == "finding" and summary.verdict == "COVID-like findings on 4 of 10 slices"
    assert summary.to_dict() == summarise("S-1", plain).to_dict()


@pytest.mark.parametrize("answered, total, finding", [(83, 255, "non-covid"), (9, 99, "covid"), (49, 100, "covid")],
                         ids=["confident negatives", "a few confident findings", "just under half"])
def test_a_series_mostly_unanswered_gets_no_result_for_the_whole_series(answered, total, finding):
    """Most slices uncertain, unlike the training images or not a chest CT: the
    series is not judged, whatever the answered slices say (a COVID series
    answered non-COVID on a third of its slices once read as reassurance)."""
    c, u, unlike, n = CONFIDENT, LOW_CONFIDENCE, UNLIKE_TRAINING, NOT_CHEST_CT
    rest = total - answered
    summary = summarise("S-5", _predictions([(c, finding)] * answered + [(u, "covid")] * (rest - rest // 3 - 1)
                                            + [(unlike, "non-covid")] * (rest // 3) + [(n, "covid")]))
    assert summary.outcome == "no result" and not summary.has_result and summary.label is None
    assert summary.other_findings == {} and summary.answered == answered
    assert summary.verdict == (
        f"No result: only {answered} of {total} slices were answered confidently ({rest} uncertain: low confidence "
        f"{rest - rest // 3 - 1}, unlike the training images {rest // 3}, not a chest CT 1); the series is not judged")
    half = summarise("S-6", _predictions([(c, "covid")] * 50 + [(u, "covid")] * 50))
    assert half.outcome == "finding" and half.label == "covid"  # half answered: judged


def test_a_state_the_verdict_does_not_know_counts_as_unanswered():
    """A newer answer state (e.g. a finding the model was not trained for) is
    never counted as a confident slice."""
    other = "another lung finding"
    summary = summarise("S-7", _predictions([(CONFIDENT, "covid")] * 3 + [(other, "covid")] * 4))
    assert summary.outcome == "no result" and summary.uncertain_by_state[other] == 4
    assert "another lung finding 4" in summary.verdict


def test_a_second_finding_class_is_named_in_the_verdict_never_hidden_behind_the_first():
    c, u = CONFIDENT, LOW_CONFIDENCE
    classes = ("adenocarcinoma", "squamous", "large-cell", "normal")
    names = ("Adenocarcinoma", "Squamous", "Large cell", "Normal")
    result = _predictions([(c, "adenocarcinoma")] * 6 + [(c, "squamous")] * 4 + [(c, "large-cell")] * 5
                          + [(c, "normal")] * 9 + [(u, "squamous")] * 5, classes, names)
    summary = summarise("S-4", result)
    assert summary.label == "adenocarcinoma"
    assert summary.other_findings == {"large-cell": 5, "squamous": 4}
    # Listed by their number of slices; a class below MIN_FINDING_SLICES is not a finding.
    assert summary.verdict == "Adenocarcinoma-like findings on 6 of 29 slices; also Large cell-like on 5, " \
                              "Squamous-like on 4"
    below = summarise("S-5", _predictions([(c, "adenocarcinoma")] * 5 + [(c, "squamous")] * (MIN_FINDING_SLICES - 1),
                                          classes, names))
    assert below.other_findings == {} and "also" not in below.verdict


def test_a_series_record_is_the_summary_of_its_series_with_the_time_it_took():
    from dataclasses import replace

    from ctapp.predict import series_record

    (series,) = read({f"IM{i}": f for i, f in enumerate(dicom_series(grey_volume(4, 32, seed=9)))}).series
    result = replace(_predictions([(CONFIDENT, "covid")] * 3 + [(LOW_CONFIDENCE, "non-covid")]), seconds=1.23456)
    record = series_record(series, result)
    summary = summarise(series.id, result)
    assert record["kind"] == "series" and record["series"] == series.id and record["slices"] == 4
    assert record["verdict"] == summary.verdict == "COVID-like findings on 3 of 4 slices"
    assert record["source"] == "DICOM" and record["seconds"] == 1.235 and record["other_findings"] == {}


def test_slice_rows_give_each_slices_answer_and_probabilities():
    from ctapp.series import slice_rows

    (series,) = read({f"IM{i}": f for i, f in enumerate(dicom_series(grey_volume(2, 32, seed=9)))}).series
    rows = slice_rows(series, _predictions([(CONFIDENT, "covid"), (LOW_CONFIDENCE, "non-covid")]))
    common = [{"series": series.id, "slice": i + 1, "name": series.slice_name(i),
               "position_mm": round(series.positions[i], 2)} for i in range(2)]
    assert rows == [
        {**common[0], "result": "COVID", "state": CONFIDENT, "confidence": 0.9, "p_covid": 0.9, "p_non-covid": 0.1},
        {**common[1], "result": "Uncertain (leans Non-COVID)", "state": LOW_CONFIDENCE, "confidence": 0.55,
         "p_covid": 0.45, "p_non-covid": 0.55}]
    assert all(isinstance(row["position_mm"], float) for row in rows)


# --------------------------------------------------------------------------- command line


def _cli(*args) -> tuple[int, list[str], str]:
    from ctapp.predict import get_args_parser, main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(get_args_parser().parse_args([str(a) for a in args]))
    return code, out.getvalue().splitlines(), err.getvalue()


@pytest.mark.parametrize("version, byte_order", [(1, "<"), (2, "<"), (1, ">"), (2, ">")])
def test_cli_reads_an_uncompressed_nifti_of_either_version_as_a_volume(tiny_model, tmp_path, version, byte_order):
    """The CLI recognises a volume by its content (NIfTI-1's magic at byte 344,
    NIfTI-2's at byte 4, the header's size in either byte order), not by its
    name: one series line, a line per slice."""
    volume = tmp_path / "volume.bin"
    volume.write_bytes(nifti_bytes(grey_volume(3, 32, seed=31), gz=False, version=version, byte_order=byte_order))
    code, lines, err = _cli(volume, "--model", tiny_model, "--json", "--batch-size", 2)  # two passes
    assert code == 0, err
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records] == ["slice"] * 3 + ["series"]
    assert records[-1]["source"] == "NIfTI" and records[-1]["slices"] == 3


def test_cli_json_lines_for_series_volumes_single_images_and_errors(tiny_model, tmp_path):
    rng = np.random.default_rng(21)
    a, b = grey_volume(4, 32, seed=22), grey_volume(3, 32, seed=23)
    folder = tmp_path / "export"
    write_files(folder, {**shuffled_names(dicom_series(a), rng), **shuffled_names(dicom_series(b), rng)})
    volume = tmp_path / "b.nii.gz"
    volume.write_bytes(nifti_bytes(b))
    single = tmp_path / "single.png"
    single.write_bytes(_png(a[0]))
    cut = tmp_path / "cut.zip"
    cut.write_bytes(b"PK\x03\x04" + bytes(40))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    code, lines, err = _cli(single, folder, volume, cut, bad, "--model", tiny_model, "--json")
    assert code == 1
    records = [json.loads(line) for line in lines]
    assert records[0]["kind"] == "slice" and records[0]["file"] == str(single) and records[0]["series"] is None
    series_lines = [r for r in records if r.get("kind") == "series"]
    assert sorted(r["slices"] for r in series_lines) == [3, 3, 4] and series_lines[-1]["source"] == "NIfTI"
    for summary in series_lines:
        slices = [r for r in records if r.get("kind") == "slice" and r["series"] == summary["series"]]
        assert [r["slice_number"] for r in slices] == list(range(1, summary["slices"] + 1))
        assert set(slices[0]) >= {"label", "probabilities", "uncertain", "state", "file"}
        assert summary["verdict"] and summary["rule"] and "confident_counts" in summary
        assert f"{summary['slices']} axial slices, 32x32 px" in summary["description"]
    nifti = [r for r in records if r.get("kind") == "slice" and r["file"] == str(volume)]
    from_dicom = [r for r in records if r.get("kind") == "slice" and r["file"].startswith(str(folder))
                  and r["series"] == next(s["series"] for s in series_lines if s["slices"] == 3 and
                                          s["source"] == "DICOM")]
    for x, y in zip(nifti, from_dicom):  # the volume gives the same answers as its DICOM series
        assert x["probabilities"] == pytest.approx(y["probabilities"], abs=1e-5)
    assert records[-2] == {"file": str(cut), "error": f"{cut}: the zip archive is damaged or incomplete"}
    assert records[-1] == {"file": str(bad), "error": records[-1]["error"]} and "not an image" in records[-1]["error"]
    assert "slices classified in" in err
    text = "\n".join(lines) + err
    for identifier in IDENTIFIERS:
        assert identifier not in text


def test_cli_text_prints_series_in_columns(tiny_model, tmp_path):
    grey = grey_volume(3, 32, seed=24)
    archive = tmp_path / "study.zip"
    archive.write_bytes(zip_bytes(shuffled_names(dicom_series(grey), np.random.default_rng(4))))
    code, lines, _ = _cli(archive, "--model", tiny_model)
    assert code == 0
    assert lines[0].startswith("== series S-") and "3 axial slices, 32x32 px" in lines[0]
    assert lines[1].split() == ["slice", "file", "result", "confidence", "probabilities", "flags"]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "3"]  # numbered from 1, as the app does
    assert lines[5].startswith("== series S-") and "slices" in lines[5]
    starts = [lines[1].index(heading) for heading in ("file", "result", "confidence", "probabilities")]
    for row in lines[2:5]:  # each column starts where its heading does
        assert [row[start - 2:start] == "  " and row[start] != " " for start in starts] == [True] * 4, row


def test_cli_text_names_a_volumes_slices_by_their_number(tiny_model, tmp_path):
    volume = tmp_path / "chest.nii.gz"
    volume.write_bytes(nifti_bytes(grey_volume(3, 32, seed=25)))
    code, lines, _ = _cli(volume, "--model", tiny_model)
    assert code == 0
    assert [line.split()[:2] for line in lines[2:5]] == [[str(i), f"{volume}#{i}"] for i in range(1, 4)]


def test_cli_exit_code_says_a_series_could_not_be_read(tiny_model, tmp_path):
    cut = tmp_path / "cut.zip"
    cut.write_bytes(b"PK\x03\x04" + bytes(40))
    code, lines, _ = _cli(cut, "--model", tiny_model)
    assert code == 1 and lines == [f"{cut}\tERROR\t{cut}: the zip archive is damaged or incomplete"]


def test_cli_json_names_the_series_an_error_belongs_to(tiny_model, tmp_path):
    write_files(tmp_path / "export", _edited(dicom_series(grey_volume(3, 32, seed=5)), ImageOrientationPatient=FLAT))
    code, lines, _ = _cli(tmp_path / "export", "--model", tiny_model, "--json")
    (record,) = [json.loads(line) for line in lines]
    assert code == 1 and set(record) == {"file", "error", "series"} and record["series"].startswith("S-")
    assert record["error"] == f"{record['series']}: the slice orientation (ImageOrientationPatient) is not a " \
                              "valid pair of directions"


def test_cli_classifies_loose_images_inside_an_archive(tiny_model, tmp_path):
    """PNG slices in a zip are read from the archive (they were looked for on
    disk by their archive name, and every one failed as "no such file")."""
    grey = grey_volume(2, 32, seed=29)
    archive = tmp_path / "slices.zip"
    archive.write_bytes(zip_bytes({"a.png": _png(grey[0]), "b.png": _png(grey[1])}))
    code, lines, err = _cli(archive, "--model", tiny_model, "--json")
    assert code == 0, lines
    records = [json.loads(line) for line in lines]
    assert [r["file"] for r in records] == [f"{archive}:a.png", f"{archive}:b.png"]
    model = load_model(tiny_model)
    for record, image in zip(records, grey):
        assert record["probabilities"] == model.predict(decode(_png(image))).to_dict()["probabilities"]


def test_cli_goes_on_after_a_single_dicom_that_fails_to_classify(tiny_model, tmp_path, monkeypatch):
    """One DICOM file is classified as a slice; when that fails (here the file
    changes under the reader) the error is printed and the next inputs still are."""
    import ctapp.predict as predict

    first, second = (tmp_path / "a.dcm", tmp_path / "b.dcm")
    first.write_bytes(dicom_series(grey_volume(1, 32, seed=26))[0])
    second.write_bytes(dicom_series(grey_volume(1, 32, seed=27))[0])
    model = load_model(tiny_model)
    real_predict = model.predict

    def predict_or_fail(path, *args, **kwargs):
        if Path(path) == first:
            raise predict.ImageDecodeError(f"{path}: the file is truncated or corrupt")
        return real_predict(path, *args, **kwargs)

    monkeypatch.setattr(model, "predict", predict_or_fail)
    monkeypatch.setattr(predict, "load_model", lambda _folder: model)
    code, lines, _ = _cli(first, second, "--model", tiny_model)
    assert code == 1
    assert lines[0] == f"{first}\tERROR\t{first}: the file is truncated or corrupt"
    assert len(lines) == 2 and lines[1].startswith(f"{second}\t")


# --------------------------------------------------------------------------- DICOM structured report


def _content_items(items):
    for item in items:
        yield item
        yield from _content_items(item.get("ContentSequence", []))


def _three_slices_summarised(label: str | None, has_result: bool):
    """A three-slice DICOM series and a summary of it (1 alpha, 2 beta, slice 3 the key one)."""
    from ctapp.series import SeriesSummary

    (series,) = read({f"IM{i}": f for i, f in enumerate(dicom_series(grey_volume(3, 32, seed=40)))}).series
    return series, SeriesSummary(series=series.id, slices=3, label=label, verdict="", rule="", has_result=has_result,
                                 confident_counts={"alpha": 1, "beta": 2}, uncertain=0, uncertain_by_state={},
                                 key_slices=[2])


@pytest.mark.parametrize("label, has_result, code, meaning", [
    ("beta", True, "BETA", "Beta-like findings"),
    # A DICOM code value holds at most 16 characters.
    ("large_cell_carcinoma", True, "LARGE_CELL_CARCI", "Large cell carcinoma-like findings"),
    (None, True, "NO_FINDING", "No finding class on enough confident slices"),
    (None, False, "NO_RESULT", "No result: too few slices answered confidently")])
def test_structured_report_reads_back_as_the_summary(label, has_result, code, meaning):
    import highdicom as hd
    import pydicom

    from ctapp.structured_report import SCHEME, series_sr_bytes

    series, summary = _three_slices_summarised(label, has_result)
    data = series_sr_bytes(series.reference, summary, model_name="lung-vgg19_bn", model_version="",
                           display_names={"alpha": "Alpha", "beta": "Beta",
                                          "large_cell_carcinoma": "Large cell carcinoma"})
    assert data[128:132] == b"DICM"  # a DICOM file with its preamble and file meta, as PACS expect
    group = hd.sr.srread(io.BytesIO(data)).content.get_image_measurement_groups()[0]
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.name.meaning) == ("SERIES_CLASS", "Series classification")
    assert (evaluation.value.value, evaluation.value.meaning) == (code, meaning)
    assert evaluation.name.scheme_designator == evaluation.value.scheme_designator == SCHEME  # the project's codes
    assert {(m.unit.value, m.unit.scheme_designator, m.unit.meaning) for m in group.get_measurements()} == {
        ("{slices}", "UCUM", "slices")}
    # The codes are what a receiving system queries by; the meanings what a PACS shows.
    assert [(m.name.value, m.name.meaning, m.value) for m in group.get_measurements()] == [
        ("SLICES_0", "Slices confidently classified as Alpha", 1),
        ("SLICES_1", "Slices confidently classified as Beta", 2),
        ("SLICES_UNCERTAIN", "Slices without a confident answer", 0)]
    (source,) = group.source_images
    assert source.referenced_sop_instance_uid == series.reference.instances[2][1]
    algorithm = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
                 for item in _content_items(group) if item.get("ValueType") == "TEXT"}
    assert (algorithm["Algorithm Name"], algorithm["Algorithm Version"]) == ("lung-vgg19_bn", "unknown")
    dataset = pydicom.dcmread(io.BytesIO(data))
    assert dataset.PatientName == "" and dataset.PatientID == "" and dataset.StudyInstanceUID == \
        series.reference.study_uid
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
                    "StudyID", "AccessionNumber"):  # type 2: present, and empty (nothing identifies the patient)
        assert keyword in dataset and not dataset[keyword].value, keyword
    assert (dataset.SeriesDescription, dataset.Manufacturer) == ("AI classification (research use only)",
                                                                 "CT slice classifier (research use only)")


def test_structured_report_names_its_device_and_cuts_long_names_to_what_dicom_holds():
    import pydicom

    from ctapp.structured_report import MANUFACTURER, series_sr_bytes

    series, summary = _three_slices_summarised("beta", True)
    name, version = "lung-" + "n" * 70, "2026-11-29 " + "v" * 70  # an LO value holds 64 characters
    data = series_sr_bytes(series.reference, summary, model_name=name, model_version=version,
                           display_names={"alpha": "Alpha", "beta": "Beta"})
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
             for item in _content_items(pydicom.dcmread(io.BytesIO(data)).ContentSequence)
             if item.get("ValueType") == "TEXT"}
    assert texts["Algorithm Name"] == name[:64] and texts["Algorithm Version"] == version[:64]
    assert texts["Device Observer Name"] == MANUFACTURER


def test_structured_report_names_the_frame_of_a_multi_frame_image():
    import highdicom as hd

    from ctapp.series import SeriesSummary
    from ctapp.structured_report import series_sr_bytes

    (series,) = read({"enhanced": enhanced_ct(grey_volume(4, 32, seed=42), frame_order=[2, 0, 3, 1])}).series
    summary = SeriesSummary(series=series.id, slices=4, label=None, verdict="", rule="", has_result=False,
                            confident_counts={"alpha": 0}, uncertain=4, uncertain_by_state={}, key_slices=[0, 3])
    data = series_sr_bytes(series.reference, summary, model_name="m", model_version="1", display_names={})
    group = hd.sr.srread(io.BytesIO(data)).content.get_image_measurement_groups()[0]
    frames = [series.reference.instances[i][2] for i in (0, 3)]
    assert [s.referenced_frame_numbers for s in group.source_images] == [[frames[0] + 1], [frames[1] + 1]]


def _edited(files: list[bytes], **changes) -> dict[str, bytes]:
    import pydicom

    out = {}
    for i, data in enumerate(files):
        ds = pydicom.dcmread(io.BytesIO(data))
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer)
        out[f"IM{i}"] = buffer.getvalue()
    return out


def test_a_series_of_another_modality_or_without_a_frame_of_reference_says_so():
    files = dicom_series(grey_volume(3, 32, seed=43))
    (mr,) = read(_edited(files, Modality="MR")).series
    assert mr.modality == "MR" and mr.is_hu
    assert "DICOM modality is MR, not CT: values are read as Hounsfield units all the same" in mr.notes
    (ct,) = read(_edited(files)).series
    assert ct.modality == "CT" and not any("modality" in n for n in ct.notes)
    (bare,) = read(_edited(files, FrameOfReferenceUID=None)).series
    assert bare.reference.frame_of_reference_uid == "" and ct.reference.frame_of_reference_uid != ""


def test_a_colour_dicom_series_is_read_as_grey():
    import pydicom
    from pydicom.uid import generate_uid

    data, expected = palette_dicom(32)
    series_uid = generate_uid()
    members = {}
    for i in range(2):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, generate_uid(), i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer)
        members[f"P{i}"] = buffer.getvalue()
    (palette,) = read(members).series
    assert not palette.is_hu and "palette-colour DICOM shown in grey" in palette.notes
    np.testing.assert_allclose(palette.slice(0, LUNG_WINDOW).pixels * 255, expected, atol=1)
    assert palette.values.dtype == np.uint8  # grey held as 8 bits, made float per slice
    rgb = pydicom.dcmread(io.BytesIO(members["P0"]))
    colour = np.stack([expected, expected // 2, 255 - expected], axis=-1).astype(np.uint8)
    rgb.PhotometricInterpretation, rgb.SamplesPerPixel, rgb.PlanarConfiguration = "RGB", 3, 0
    for keyword in ("RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
                    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
                    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData"):
        delattr(rgb, keyword)
    rgb.PixelData = colour.tobytes()
    buffer = io.BytesIO()
    rgb.save_as(buffer)
    (shown,) = read({"rgb": buffer.getvalue()}).series
    assert not shown.is_hu and "colour DICOM shown in grey" in shown.notes
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    np.testing.assert_allclose(shown.slice(0, LUNG_WINDOW).pixels * 255, luma, atol=1)
