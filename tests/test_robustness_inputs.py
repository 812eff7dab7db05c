"""Issue 5, bad input: every awkward file behaves the same way in ``decode``,
``LoadedModel.predict`` and the ``python -m ctapp.predict`` CLI (a clear,
specific ImageDecodeError message, or a correct decode with a note), and
fuzzed bytes never make anything but ImageDecodeError escape ``decode``."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from bad_inputs import (
    BAD_INPUT_NAMES,
    SMALL_FILE_LIMIT,
    bad_input_cases,
    check_decoded,
    check_error,
    decode_outcome,
    mutate,
    png_bomb,
    png_bytes,
    run_predict_cli,
    seed_files,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_models import write_model_folder

import ctapp.imaging as imaging
from ctapp.imaging import MAX_PIXELS, ImageDecodeError, decode


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {c.name: c for c in bad_input_cases(tmp_path_factory.mktemp("bad_inputs"))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from ctapp.model_folders import load_model

    return load_model(model_dir)


def _limit(monkeypatch, case):
    if case.needs_small_limit:
        monkeypatch.setattr(imaging, "MAX_FILE_BYTES", SMALL_FILE_LIMIT)


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_decode(cases, name, as_bytes, monkeypatch):
    case = cases[name]
    _limit(monkeypatch, case)
    source = case.path.read_bytes() if as_bytes else case.path
    if case.error is None:
        image = decode(source)
        assert check_decoded(case, image) == []
    else:
        with pytest.raises(ImageDecodeError) as info:
            decode(source)
        assert check_error(case, str(info.value)) == []
        assert "\n" not in str(info.value), "an error message must be one line"


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_predict_api(cases, loaded, name, monkeypatch):
    """LoadedModel.predict gives the same error as decode, or a prediction
    carrying decode's notes."""
    case = cases[name]
    _limit(monkeypatch, case)
    if case.error is None:
        prediction = loaded.predict(case.path)
        assert set(prediction.probabilities) == {"class0", "class1"}
        assert abs(sum(prediction.probabilities.values()) - 1) < 1e-6
        assert prediction.notes == decode(case.path).notes
        for word in case.notes:
            assert word.lower() in " ".join(prediction.notes).lower()
    else:
        with pytest.raises(ImageDecodeError) as from_decode:
            decode(case.path)
        with pytest.raises(ImageDecodeError) as from_predict:
            loaded.predict(case.path)
        assert str(from_predict.value) == str(from_decode.value)


@pytest.mark.slow
def test_cli_json(cases, model_dir):
    """One JSON line per file: an error line with the specific message for each
    bad file, a prediction for each good one, exit status 1."""
    files = [cases[n].path for n in BAD_INPUT_NAMES]
    result = run_predict_cli(files, model_dir, max_file_bytes=SMALL_FILE_LIMIT)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    # A multi-frame file is a series: a line per frame and a summary line. Its first
    # frame's line stands for the file here.
    series = [line for line in lines if line.get("kind") == "series"]
    assert [s["slices"] for s in series] == [5] and series[0]["source"] == "DICOM"
    lines = [line for line in lines if line.get("kind") != "series" and line.get("slice_number") in (None, 1)]
    assert [line["file"] for line in lines] == [str(f) for f in files]
    for line, name in zip(lines, BAD_INPUT_NAMES):
        case = cases[name]
        if case.error is None:
            assert "error" not in line, (name, line)
            assert line["label"] in ("class0", "class1")
            if line["series"] is not None:
                assert name == "multi-frame DICOM" and line["slice_number"] == 1
                continue
            for word in case.notes:
                assert word.lower() in " ".join(line["notes"]).lower(), (name, line["notes"])
        else:
            assert check_error(case, line.get("error", "")) == [], (name, line)


@pytest.mark.slow
def test_cli_text_one_line_per_file(cases, model_dir):
    files = [cases[n].path for n in BAD_INPUT_NAMES]
    result = run_predict_cli(files, model_dir, max_file_bytes=SMALL_FILE_LIMIT, json_lines=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    # The multi-frame file is a series: printed as a block (header, column names,
    # a row per frame, verdict), which its header line stands for here.
    lines = result.stdout.splitlines()
    block = [i for i, line in enumerate(lines) if line.startswith("== series ")]
    assert len(block) == 2 and block[1] - block[0] == 7, result.stdout
    lines = lines[:block[0]] + [f"{files[BAD_INPUT_NAMES.index('multi-frame DICOM')]}\tSERIES"] + lines[block[1] + 1:]
    assert len(lines) == len(files), result.stdout
    for line, name in zip(lines, BAD_INPUT_NAMES):
        path, status = line.split("\t")[:2]
        assert path == str(cases[name].path)
        assert (status == "ERROR") == (cases[name].error is not None), line


def test_cli_all_good_exits_zero(cases, model_dir):
    result = run_predict_cli([cases["good PNG"].path, cases["good DICOM"].path], model_dir)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_cli_names_the_file_of_every_line_in_both_modes(cases, model_dir):
    """A line a user cannot match to its file is useless: each line, answer or
    error, JSON or text, starts from the path it was given."""
    files = [cases[n].path for n in ("good PNG", "truncated PNG", "good JPEG")]
    result = run_predict_cli(files, model_dir)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(f) for f in files]
    assert ["error" in line for line in lines] == [False, True, False]
    result = run_predict_cli(files, model_dir, json_lines=False)
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == [str(f) for f in files]
    assert [row[1] == "ERROR" for row in rows] == [False, True, False]


def test_cli_folders_skip_system_and_side_files_whatever_their_case(tmp_path):
    from ctapp.predict import expand

    (tmp_path / "sub").mkdir()
    for name in ("Thumbs.db", "DESKTOP.INI", ".DS_Store", "notes.TXT", "a.png", "sub/b.dcm"):
        (tmp_path / name).write_bytes(b"x")
    assert expand([str(tmp_path)]) == [tmp_path / "a.png", tmp_path / "sub" / "b.dcm"]


def test_cli_bad_model_folder(tmp_path, cases):
    result = run_predict_cli([cases["good PNG"].path], tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


# ------------------------------------------------------------------ specific values


def test_sixteen_bit_values_scaled_from_their_range():
    pixels = np.full((16, 32), 1000, np.uint16)
    pixels[:, 16:] = 3000
    pixels[:, 8] = 2000
    image = decode(png_bytes(Image.fromarray(pixels)))
    assert image.mode.startswith("I;16")
    assert image.pixels[0, 0] == 0.0 and image.pixels[0, 20] == 1.0
    assert image.pixels[0, 8] == pytest.approx(0.5)


def test_sixteen_bit_full_range_is_not_clipped_to_eight_bits():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    image = decode(png_bytes(Image.fromarray(ramp)))
    assert len(np.unique(image.pixels)) == 64  # 8-bit truncation would merge nothing here but would saturate
    assert np.allclose(image.pixels[0], np.linspace(0, 1, 64), atol=1e-4)


def test_one_pixel_budget_for_pillow_and_the_project():
    """Pillow's own limit is the project's budget, so the 64-megapixel bomb (which
    Pillow's default limit of ~89 M would let through) is refused by both."""
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS < 8000 * 8000
    bomb = png_bomb(8000, 8000)
    assert len(bomb) < 100_000  # 64 megapixels in under 100 kB
    with pytest.warns(Image.DecompressionBombWarning), Image.open(io.BytesIO(bomb)) as opened:
        assert opened.size == (8000, 8000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageDecodeError, match="40 megapixels"):
        decode(bomb)


def test_upload_limit_message_never_reads_equal(monkeypatch):
    """A file just over the limit must not be reported as the limit's size."""
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", 200 * 1024 * 1024)
    with pytest.raises(ImageDecodeError) as info:
        imaging._read_bytes(memoryview(bytes(200 * 1024 * 1024 + 300_000)))
    message = str(info.value)
    size, limit = message.split("the file is ")[1].split("; the limit is ")
    assert size != limit, message
    assert (size, limit) == ("200.3 MB", "200 MB")


def test_an_upload_exactly_at_the_size_limit_is_read(monkeypatch, tmp_path):
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", 1000)
    (tmp_path / "at-limit.png").write_bytes(bytes(1000))
    for source in (bytes(1000), tmp_path / "at-limit.png"):
        with pytest.raises(ImageDecodeError, match="not an image file"):  # read, then found not to be an image
            decode(source)
    with pytest.raises(ImageDecodeError, match="^the file is 0.00 MB; the limit is 0.00 MB$"):
        decode(bytes(1001))


@pytest.mark.parametrize("size, text", [
    (200 * 2**20, "200 MB"), (10 * 2**20, "10 MB"), (int(10.5 * 2**20), "10.5 MB"), (2**20, "1.00 MB"),
    (2_000_000, "1.91 MB"), (int(9.999 * 2**20), "10.00 MB")])
def test_sizes_read_in_mb_with_whole_numbers_only_when_exact(size, text):
    assert imaging._megabytes(size) == text


def test_a_slice_hashes_by_its_8_bit_pixels_and_their_shape():
    pixels = np.array([[0.0, 0.5, 1.0, 0.2, 0.998]], np.float32)
    assert imaging.Slice(pixels, "array").to_uint8().tolist() == [[0, 128, 255, 51, 254]]  # rounded, not cut
    flat = imaging.Slice(np.zeros((16, 32), np.float32), "array")
    assert flat.content_hash() != imaging.Slice(np.zeros((32, 16), np.float32), "array").content_hash()
    assert flat.content_hash() == imaging.Slice(np.full((16, 32), 0.001, np.float32), "PNG").content_hash()


@pytest.mark.parametrize("data, kind", [
    (b"PK\x03\x04" + bytes(60), " (it is a ZIP archive)"),
    (bytes(range(128, 256)) * 4, ""),  # binary, neither text nor a known document
    (b"a" * 511 + "é".encode() * 10, " (it looks like text)"),  # byte 512 falls inside a character
    (b"a" * 512 + bytes(range(128, 256)), " (it looks like text)"),  # judged by its first 512 bytes
])
def test_not_an_image_says_what_it_looks_like(tmp_path, data, kind):
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError) as err:
        decode(path)
    assert str(err.value).startswith(f"upload.png: not an image file{kind}; upload a ")


SCALED = "array scaled from its own minimum and maximum"


@pytest.mark.parametrize("array, expected, note", [
    (np.array([[0, 128], [255, 64]], np.uint8), [[0, 128 / 255], [1, 64 / 255]], None),
    (np.array([[0.0, 0.25], [1.0, 0.5]], np.float32), [[0, 0.25], [1, 0.5]], None),
    (np.array([[True, False], [False, True]]), [[1, 0], [0, 1]], None),
    (np.array([[-1000, 0], [1000, 500]], np.int16), [[0, 0.5], [1, 0.75]], f"int16 {SCALED}"),
    (np.array([[2.0, 4.0], [6.0, 2.0]]), [[0, 0.5], [1, 0]], f"float64 {SCALED}"),
    (np.full((2, 2), 7, np.int32), [[0, 0], [0, 0]], f"int32 {SCALED}"),  # flat: black, not a division by 0
    (np.array([[[0], [255]], [[255], [0]]], np.uint8), [[0, 1], [1, 0]], None),  # (H, W, 1)
    (np.array([[[255, 255, 255], [0, 0, 0]], [[0, 0, 0], [255, 255, 255]]], np.uint8), [[1, 0], [0, 1]], None),
])
def test_arrays_decode_to_grey_in_zero_to_one(array, expected, note, monkeypatch):
    monkeypatch.setattr(imaging, "MIN_SIDE", 2)
    image = decode(array)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert image.pixels.dtype == np.float32 and image.source_format == "array"
    assert image.notes == ([] if note is None else [note])


def test_the_alpha_channel_of_a_colour_array_plays_no_part():
    rgb = np.random.default_rng(3).integers(0, 1000, (20, 20, 3)).astype(np.uint16)
    rgba = np.dstack([rgb, np.full((20, 20), 65535, np.uint16)])  # opaque, and far above every colour value
    np.testing.assert_array_equal(decode(rgba).pixels, decode(rgb).pixels)  # stretched by the colours' range


@pytest.mark.parametrize("array, words", [
    (np.zeros((4, 4, 2)), "expected a 2-D grey or (H, W, 3) colour array, got shape (4, 4, 2)"),
    (np.array([["a", "b"], ["c", "d"]]), "unsupported array type <U1"),
    (np.array([[np.nan, 0.5], [0.5, 0.5]]), "array: the image contains NaN or infinite values")])
def test_arrays_that_are_not_slices_are_refused(array, words, monkeypatch):
    monkeypatch.setattr(imaging, "MIN_SIDE", 2)
    with pytest.raises(ImageDecodeError) as err:
        decode(array)
    assert str(err.value) == words


def test_the_smallest_slice_is_16_pixels_a_side_and_the_message_names_the_input():
    assert decode(Image.new("L", (16, 16))).size == (16, 16)
    for source, name in ((Image.new("L", (15, 16)), "image"), (np.zeros((16, 15), np.uint8), "array")):
        with pytest.raises(ImageDecodeError) as err:
            decode(source)
        assert str(err.value) == f"{name}: the image is 15x16 pixels; a CT slice needs at least 16x16"


def test_a_folder_or_a_missing_path_is_not_a_slice(tmp_path):
    (tmp_path / "scans").mkdir()
    with pytest.raises(ImageDecodeError, match="^scans: not a file$"):
        decode(tmp_path / "scans")
    with pytest.raises(ImageDecodeError, match="^gone.png: no such file$"):
        decode(tmp_path / "gone.png")


def test_a_window_needs_a_positive_width():
    from ctapp.imaging import Window

    np.testing.assert_allclose(Window(0, 200).apply(np.array([-100.0, 0.0, 50.0, 500.0])), [0, 0.5, 0.75, 1])
    with pytest.raises(ImageDecodeError, match="window width must be positive, got 0"):
        Window(0, 0).apply(np.zeros(3))


LUNG_NOTE = "lung window: center -600 HU, width 1500 HU"


@pytest.mark.parametrize("modality, rescale, expected_notes", [
    ("MR", False, ["DICOM modality is MR, not CT",
                   "no rescale slope/intercept: pixel values scaled from their own range"]),
    ("MR", True, ["DICOM modality is MR, not CT", LUNG_NOTE]), ("CT", False, [LUNG_NOTE])])
def test_dicom_of_another_modality_is_noted_and_scaled_without_hounsfield_units(modality, rescale, expected_notes):
    from synthetic import ct_dataset, dicom_file_bytes

    ds = ct_dataset(32, 32, signed=False)
    ds.Modality = modality
    stored = np.tile(np.arange(32, dtype=np.uint16) * 10, (32, 1))
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.tobytes()
    image = decode(dicom_file_bytes(ds))
    assert image.notes == expected_notes
    assert image.mode == "DICOM" and image.source_format == "DICOM"  # as the audit's table of modes counts it
    if expected_notes[-1].startswith("no rescale"):
        np.testing.assert_allclose(image.pixels[0], np.arange(32) / 31, atol=1e-6)
        assert image.hu is None
    else:
        assert image.hu is not None


def test_animated_frame_choice():
    frames = [Image.new("L", (32, 32), v) for v in (10, 60, 110, 160, 210)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    middle = decode(data)
    assert middle.pixels.mean() == pytest.approx(110 / 255) and middle.notes == ["multi-frame image: used frame 3 of 5"]
    assert decode(data, frame=0).pixels.mean() == pytest.approx(10 / 255)
    with pytest.raises(ImageDecodeError, match="^frame 9 requested but the image has 5 frames$"):
        decode(data, frame=9)


def test_multiframe_dicom_frame_choice():
    from bad_inputs import dicom_bytes

    stack = np.stack([np.full((32, 32), 1024 + 100 * k, np.int16) for k in range(5)])  # HU 0, 100, ... 400
    data = dicom_bytes(stack, frames=5)
    middle = decode(data)
    assert np.allclose(middle.hu, 200) and middle.notes == ["multi-frame DICOM: used frame 3 of 5", LUNG_NOTE]
    assert np.allclose(decode(data, frame=4).hu, 400)
    with pytest.raises(ImageDecodeError, match="^frame 5 requested but the DICOM file has 5 frames$"):
        decode(data, frame=5)


# ------------------------------------------------------------------ fuzzing

SEEDS = seed_files()
FUZZ = settings(max_examples=300, deadline=5000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.slow
@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    decode_outcome(data)


@pytest.mark.slow
@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.integers(0, 2**32 - 1))
def test_fuzz_mutated_files(kind, seed):
    decode_outcome(mutate(SEEDS[kind], random.Random(seed)))


@pytest.mark.slow
@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.integers(4, 400), st.binary(max_size=512))
def test_fuzz_valid_header_then_junk(kind, keep, junk):
    decode_outcome(SEEDS[kind][:keep] + junk)


def test_fuzz_seeds_decode():
    """The seeds themselves decode, so mutations start from valid files."""
    for kind, data in SEEDS.items():
        assert decode_outcome(data) == "ok", kind


@pytest.mark.parametrize("tty", [False, True], ids=["log", "terminal"])
def test_series_progress_on_a_terminal_redraws_one_line(tty, monkeypatch, capsys):
    from ctapp import predict

    monkeypatch.setattr(predict.sys.stderr, "isatty", lambda: tty, raising=False)
    show = predict._progress("S-1")
    show(1, 2)
    show(2, 2)
    err = capsys.readouterr().err
    if tty:
        assert err.startswith("\rseries S-1: 1/2 slices classified\rseries S-1: 2/2 slices classified")
        assert "\rseries S-1: 2 slices classified in " in err
    else:  # a log file gets the last line only, without carriage returns
        assert err.startswith("series S-1: 2 slices classified in ") and "\r" not in err


def test_series_progress_on_a_terminal_is_flushed_as_it_goes(monkeypatch):
    """A redrawn line has no newline, so a line-buffered terminal shows it only when flushed."""
    from ctapp import predict

    class Terminal(io.StringIO):
        def isatty(self):
            return True

        def flush(self):
            shown.append(self.getvalue())

    shown = []
    monkeypatch.setattr(predict.sys, "stderr", Terminal())
    show = predict._progress("S-1")
    show(1, 3)
    assert shown[-1] == "\rseries S-1: 1/3 slices classified"
    show(3, 3)
    assert shown[-1].startswith("\rseries S-1: 1/3 slices classified\rseries S-1: 3/3 slices classified\r")


def test_a_dicom_header_declaring_a_strip_is_refused_before_its_pixels_are_read():
    """Rows and Columns are checked from the header: 16 x 3200 is no CT slice,
    whatever (or however little) pixel data follows."""
    from synthetic import ct_dataset, dicom_file_bytes

    ds = ct_dataset(16, 3200)
    ds.PixelData = b"\0\0" * 16  # far less than declared: never read
    with pytest.raises(ImageDecodeError, match="3200x16 pixels, its long side 200 times its short side"):
        decode(dicom_file_bytes(ds))


@pytest.mark.parametrize("keyword, bits, dtype", [("FloatPixelData", 32, np.float32),
                                                   ("DoubleFloatPixelData", 64, np.float64)])
def test_a_dicom_with_float_pixel_data_is_read(keyword, bits, dtype):
    from synthetic import ct_dataset, dicom_file_bytes

    ds = ct_dataset(32, 32)
    for attribute in ("BitsStored", "HighBit", "PixelRepresentation"):  # not used by float pixel data
        delattr(ds, attribute)
    ds.BitsAllocated = bits
    values = np.linspace(-1000, 400, 32 * 32, dtype=dtype)
    setattr(ds, keyword, values.tobytes())
    image = decode(dicom_file_bytes(ds))
    np.testing.assert_allclose(image.hu, values.reshape(32, 32), atol=1e-3)
    assert image.notes == [LUNG_NOTE]
