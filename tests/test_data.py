"""Decoding every kind of slice, and reading datasets in both layouts."""
import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from synthetic import write_classes

from ctapp.data import DatasetError, assign_splits, class_key, display_name, group_ids, scan_dataset
from ctapp.imaging import LUNG_WINDOW, ImageDecodeError, Window, decode


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_dicom(pixels: np.ndarray, slope: float = 1.0, intercept: float = -1024.0, **extra) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- decoding ------------------------------------------------------------------


def test_grey_rgb_rgba_give_the_same_pixels():
    grey = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    rgb = Image.fromarray(np.stack([grey] * 3, axis=-1))
    rgba = Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    results = [decode(png_bytes(im)) for im in (Image.fromarray(grey), rgb, rgba)]
    for result in results:
        assert result.pixels.shape == (40, 50) and result.pixels.dtype == np.float32
        np.testing.assert_allclose(result.pixels, grey / 255.0, atol=1 / 255)
    assert len({r.content_hash() for r in results}) == 1
    assert [r.mode for r in results] == ["L", "RGB", "RGBA"]


def test_transparent_pixels_become_black():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:10, :, 3] = 255  # top half opaque, bottom half transparent
    result = decode(png_bytes(Image.fromarray(rgba)))
    assert result.pixels[:10].mean() == pytest.approx(200 / 255, abs=1e-3)
    assert result.pixels[10:].max() == 0.0
    assert result.notes == ["transparent pixels shown as black"]
    # Fully opaque images with an alpha channel say nothing about transparency.
    for mode in ("RGBA", "LA"):
        opaque = Image.fromarray(np.dstack([rgba[..., :3], np.full((20, 20), 255, np.uint8)])).convert(mode)
        assert decode(png_bytes(opaque)).notes == [], mode
    grey_alpha = Image.fromarray(rgba).convert("LA")
    assert decode(png_bytes(grey_alpha)).notes == ["transparent pixels shown as black"]
    # A palette image whose transparency is a palette entry: that entry is black too, whatever its colour.
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([200, 200, 200] * 2)
    palette.paste(0, (0, 0, 20, 10))
    palette.info["transparency"] = 1
    keyed = decode(png_bytes(palette))
    assert keyed.pixels[:10].mean() == pytest.approx(200 / 255, abs=1e-3) and keyed.pixels[10:].max() == 0.0
    assert keyed.notes == ["transparent pixels shown as black"]


@pytest.mark.parametrize("fmt, name, lies", [
    ("JPEG", "slice.png", True), ("PNG", "slice.jpg", True), ("TIFF", "slice.bmp", True), ("BMP", "slice.tif", True),
    *[(fmt, f"slice{suffix}", False) for fmt, suffix in (("PNG", ".PNG"), ("JPEG", ".jpg"), ("JPEG", ".jpeg"),
                                                           ("JPEG", ".JPE"), ("TIFF", ".tif"), ("TIFF", ".tiff"),
                                                           ("BMP", ".bmp"))]])
def test_extension_that_lies_is_read_by_content(tmp_path, fmt, name, lies):
    path = tmp_path / name
    path.write_bytes(png_bytes(Image.fromarray(np.full((32, 32, 3), 90, np.uint8)), fmt))
    result = decode(path)
    assert result.source_format == fmt
    assert [n for n in result.notes if "although its name ends in" in n] == (
        [f"the file is a {fmt} although its name ends in {path.suffix}"] if lies else [])


def test_16_bit_png_is_scaled_to_its_range():
    values = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    result = decode(png_bytes(Image.fromarray(values)))
    assert result.pixels.min() == 0.0 and result.pixels.max() == 1.0
    assert result.pixels[32, 32] == pytest.approx((values[32, 32] - 1000) / 2000, abs=1e-4)
    assert any("16-bit" in n for n in result.notes)


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")])
def test_16_bit_images_handed_in_decoded_are_scaled_in_any_byte_order(mode, dtype):
    values = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(dtype)
    result = decode(Image.frombytes(mode, (32, 32), values.tobytes()))
    assert result.pixels.min() == 0.0 and result.pixels.max() == 1.0
    assert result.pixels[16, 16] == pytest.approx((float(values[16, 16]) - 1000) / 2000, abs=1e-4)
    assert "16-bit grey image scaled from its own minimum and maximum" in result.notes


def test_a_decoder_running_out_of_memory_says_so(monkeypatch):
    from ctapp import imaging

    def exhausted(_array):
        raise MemoryError

    monkeypatch.setattr(imaging, "_from_array", exhausted)
    with pytest.raises(ImageDecodeError) as caught:
        decode(np.zeros((32, 32), np.uint8))
    assert str(caught.value) == "the image is too large to decode in memory" and caught.value.__cause__ is None


@pytest.mark.parametrize("dtype, mode, depth", [(np.int32, "I", "32-bit"), (np.float32, "F", "32-bit float")])
def test_32_bit_tiff_is_scaled_to_its_range(dtype, mode, depth):
    values = np.linspace(-500, 70000, 64 * 64).reshape(64, 64).astype(dtype)  # far beyond 8 and 16 bits
    image = Image.fromarray(values)
    assert image.mode == mode
    result = decode(png_bytes(image, fmt="TIFF"))
    assert result.mode == mode and result.pixels.min() == 0.0 and result.pixels.max() == 1.0
    assert result.pixels[32, 32] == pytest.approx((values[32, 32] + 500) / 70500, abs=1e-4)
    assert f"{depth} grey image scaled from its own minimum and maximum" in result.notes


def test_large_and_tiny_images():
    big = decode(png_bytes(Image.new("L", (3000, 2500), 7)))
    # Downscaled right after decoding to 2048 px on the long side, aspect kept.
    assert big.size == (2048, round(2500 * 2048 / 3000))
    assert any("downscaled from 3000x2500" in note for note in big.notes)
    with pytest.raises(ImageDecodeError, match="1x1 pixels"):
        decode(png_bytes(Image.new("L", (1, 1))))


def test_dicom_applies_rescale_and_lung_window():
    hu = np.array([[-1400, -1350], [-600, 150]] * 16, dtype=np.int16).repeat(16, axis=1)
    stored = (hu + 1024) // 2  # slope 2, intercept -1024 gives back hu
    result = decode(make_dicom(stored, slope=2.0, intercept=-1024.0))
    assert result.source_format == "DICOM"
    np.testing.assert_allclose(result.hu, ((hu + 1024) // 2) * 2 - 1024)
    assert result.hu.dtype == result.pixels.dtype == np.float32  # kept for re-windowing: half the memory of float64
    low = LUNG_WINDOW.center - LUNG_WINDOW.width / 2
    expected = np.clip((result.hu - low) / LUNG_WINDOW.width, 0, 1)
    np.testing.assert_allclose(result.pixels, expected, atol=1e-6)
    assert result.pixels[0, 0] == 0.0 and result.pixels[1, 16] == 1.0  # below and above the window
    assert result.hu[1, 0] == -600 and result.pixels[1, 0] == pytest.approx(0.5)  # mid-grey in the lung window
    windowed = result.rewindow(Window(40, 400))
    assert windowed.pixels[1, 0] == 0.0 and windowed.pixels[1, 16] == pytest.approx(0.775)  # mediastinal window
    raster = decode(png_bytes(Image.fromarray(np.full((32, 32), 90, np.uint8))))
    assert raster.hu is None and raster.rewindow(Window(40, 400)) is raster  # no HU: nothing to window


def test_colour_dicom_frames_become_grey_by_their_luma():
    from pydicom.dataset import Dataset

    from ctapp.imaging import dicom_colour_to_grey

    rgb = Dataset()
    rgb.PhotometricInterpretation, rgb.SamplesPerPixel = "RGB", 3
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[0, ..., 0] = 255  # pure red
    frames[1, ..., 1] = 255  # pure green
    grey = dicom_colour_to_grey(frames, rgb)  # a multi-frame file: one grey image per frame
    assert grey.shape == (2, 4, 4)
    assert grey[0] == pytest.approx(np.full((4, 4), 0.299), abs=1 / 255)
    assert grey[1] == pytest.approx(np.full((4, 4), 0.587), abs=1 / 255)
    wide = np.zeros((4, 4, 3), np.int16)  # not 8-bit: scaled from its own range first
    wide[:2, ..., 2] = 1000
    assert dicom_colour_to_grey(wide, rgb)[:2] == pytest.approx(np.full((2, 4), 0.114), abs=1 / 255)
    mono = Dataset()
    mono.PhotometricInterpretation, mono.SamplesPerPixel = "MONOCHROME2", 1
    assert dicom_colour_to_grey(np.zeros((4, 4), np.uint16), mono) is None


def test_dicom_is_detected_without_extension(tmp_path):
    path = tmp_path / "IM0001"
    path.write_bytes(make_dicom(np.zeros((32, 32), np.int16)))
    assert decode(path).source_format == "DICOM"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, this is not an image", "not an image"),
    (b"%PDF-1.4 fake", "PDF"),
])
def test_bad_bytes_get_a_clear_message(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode(data)


def test_truncated_png_is_reported():
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode(data[: len(data) // 2])


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        decode(tmp_path / "nope.png")


def test_numpy_and_pil_inputs():
    grey = np.random.default_rng(1).integers(0, 256, (30, 40), dtype=np.uint8)
    np.testing.assert_allclose(decode(grey).pixels, grey / 255.0)
    np.testing.assert_allclose(decode(Image.fromarray(grey)).pixels, grey / 255.0)
    with pytest.raises(ImageDecodeError, match="shape"):
        decode(np.zeros((2, 3, 4, 5)))
    # A float array already in [0, 1] is taken as it is; any other range is scaled from its own extremes.
    unit = np.array([[0.0, 0.25], [0.5, 1.0]] * 8, np.float32).repeat(8, axis=1)
    assert np.array_equal(decode(unit).pixels, unit) and not decode(unit).notes
    wide = decode(unit * 1.5)
    np.testing.assert_allclose(wide.pixels, unit, atol=1e-6)
    assert wide.notes == ["float32 array scaled from its own minimum and maximum"]


# -- dataset layouts -------------------------------------------------------------


def test_class_names_are_normalised():
    assert class_key("adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib") == class_key("adenocarcinoma") == "adenocarcinoma"
    assert class_key("large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa") == "large-cell-carcinoma"
    assert class_key("Viral Pneumonia") == "viral-pneumonia"
    assert display_name("squamous.cell.carcinoma_left.hilum") == "Squamous cell carcinoma"
    assert display_name("COVID") == "COVID" and display_name("non-COVID") == "Non-COVID"


def test_split_layout_merges_spellings(tmp_path):
    write_classes(tmp_path / "train", ["adenocarcinoma_left.lower.lobe_T2", "normal"], 3, size=24)
    write_classes(tmp_path / "val", ["adenocarcinoma_left.lower.lobe_T2", "normal"], 2, size=24)
    write_classes(tmp_path / "test", ["adenocarcinoma", "normal"], 2, size=24)
    index = scan_dataset(tmp_path)
    assert index.layout == "splits"
    assert index.class_names == ["adenocarcinoma", "normal"]
    assert index.display_names == ["Adenocarcinoma", "Normal"]
    assert index.splits == ["train", "valid", "test"]
    assert index.counts() == {"train": {"adenocarcinoma": 3, "normal": 3}, "valid": {"adenocarcinoma": 2, "normal": 2},
                              "test": {"adenocarcinoma": 2, "normal": 2}}
    assert any("spelled 2 ways" in note for note in index.notes)


def test_a_class_spelled_several_ways_is_shown_by_its_shortest_spelling(tmp_path):
    write_classes(tmp_path / "train", ["Viral.Pneumonia_T1", "normal"], 2, size=24)
    write_classes(tmp_path / "valid", ["viral pneumonia", "normal"], 2, size=24)
    index = scan_dataset(tmp_path)
    assert index.class_names == ["normal", "viral-pneumonia"]
    assert index.display_names == ["Normal", "Viral pneumonia"]  # not "Viral Pneumonia", first in sort order


def test_a_class_too_small_for_the_share_held_out_is_named(tmp_path):
    write_classes(tmp_path / "covid", ["covid"], 12, size=24)
    write_classes(tmp_path / "covid", ["rare"], 2, size=24, start=50)
    index = scan_dataset(tmp_path / "covid")
    with pytest.raises(DatasetError, match="class 'rare' has only 2 images, but holding out 25% for valid needs "
                                           "at least 4 per class"):
        assign_splits(index, val_fraction=0.25, seed=0)


def test_class_layout_split_is_stratified_and_seeded(tmp_path):
    write_classes(tmp_path, ["covid", "non-covid"], 20, size=24)
    index = scan_dataset(tmp_path)
    assert index.layout == "classes" and index.splits == []
    a = assign_splits(index, val_fraction=0.25, seed=3)
    b = assign_splits(index, val_fraction=0.25, seed=3)
    assert [s.split for s in a.samples] == [s.split for s in b.samples]
    assert a.counts()["valid"] == {"covid": 5, "non-covid": 5}


def test_block_split_keeps_consecutive_numbers_together(tmp_path):
    write_classes(tmp_path, ["covid", "non-covid"], 40, size=24)
    index = assign_splits(scan_dataset(tmp_path), val_fraction=0.25, seed=0, block_size=10)
    blocks = {}
    for s in index.samples:
        number = int(s.path.stem.split("(")[1].rstrip(")"))
        blocks.setdefault((s.label, number // 10), set()).add(s.split)
    assert all(len(splits) == 1 for splits in blocks.values())
    assert {s.split for s in index.samples} == {"train", "valid"}
    held = sum(s.split == "valid" for s in index.samples)
    assert index.notes[-1] == \
        f"split here by blocks of 10 consecutive file numbers, seed 0: train {80 - held}, valid {held}"


def test_holding_out_half_holds_out_half(tmp_path):
    write_classes(tmp_path, ["covid", "non-covid"], 12, size=24)
    index = assign_splits(scan_dataset(tmp_path), val_fraction=0.5, seed=2)
    assert index.counts()["valid"] == index.counts()["train"] == {"covid": 6, "non-covid": 6}


def test_three_way_split_holds_out_test_then_valid_from_the_rest(tmp_path):
    write_classes(tmp_path, ["covid", "non-covid"], 20, size=24)
    index = assign_splits(scan_dataset(tmp_path), val_fraction=0.25, test_fraction=0.25, seed=1)
    counts = index.counts()
    assert counts["test"] == counts["valid"] == {"covid": 5, "non-covid": 5}
    assert counts["train"] == {"covid": 10, "non-covid": 10}
    assert index.notes[-1] == "split here by image, seed 1: test 10, train 20, valid 10"


def test_a_split_keeps_the_files_its_name_pattern_groups(tmp_path):
    # "p1-a.png", "p1-b.png", ...: with the pattern, one patient's files share a side.
    for label in ("covid", "normal"):
        (tmp_path / label).mkdir()
        for patient in range(8):
            for view in "abc":
                Image.fromarray(np.full((16, 16), 30 * patient, np.uint8)).save(
                    tmp_path / label / f"p{patient}-{view}.png")
    index = assign_splits(scan_dataset(tmp_path), val_fraction=0.25, seed=0, pattern=r"^(p\d+)-")
    sides = {}
    for s in index.samples:
        sides.setdefault((s.label, s.path.stem.split("-")[0]), set()).add(s.split)
    assert all(len(side) == 1 for side in sides.values())
    assert {s.split for s in index.samples} == {"train", "valid"}


def test_hidden_system_and_side_files_in_a_class_folder_are_not_images(tmp_path):
    write_classes(tmp_path, ["covid", "normal"], 3, size=16)
    image = (tmp_path / "covid" / "covid (0).png").read_bytes()
    for name in (".hidden.png", "._covid (0).png", "notes.txt", "Thumbs.db"):
        (tmp_path / "covid" / name).write_bytes(image)
    (tmp_path / "covid" / "more").mkdir()
    index = scan_dataset(tmp_path)
    assert sorted(s.path.name for s in index.samples if s.label == index.class_names.index("covid")) == [
        "covid (0).png", "covid (1).png", "covid (2).png"]


def test_groups_by_file_number(tmp_path):
    paths = write_classes(tmp_path, ["a"], 25, size=24)
    index = scan_dataset(tmp_path)
    groups = group_ids(index.samples, block_size=10)
    by_number = {int(s.path.stem.split("(")[1].rstrip(")")): g for s, g in zip(index.samples, groups)}
    assert by_number[0] == by_number[9] != by_number[10] == by_number[19] != by_number[20]
    assert len(paths) == 25


def test_groups_by_a_name_pattern_keep_one_papers_figures_together():
    from pathlib import Path

    from ctapp.data import Sample

    names = ["2020.03.13-p5-10.png", "2020.03.13-p6-2%1.png", "fig3%2.png", "fig3%7.png", "fig4.png", "99.png"]
    samples = [Sample(Path("/d/covid") / n, 0, "") for n in names]
    default = group_ids(samples)  # the UCSD convention: paper id before "-p", figure before "%"
    assert default[0] == default[1] and default[2] == default[3] and len(set(default)) == 4
    by_patient = group_ids([Sample(Path("/d/c") / n, 0, "") for n in ("12-a.png", "12-b.png", "13-a.png")],
                           pattern=r"^(\d+)")
    assert by_patient[0] == by_patient[1] != by_patient[2]
    assert len(set(group_ids(samples, pattern=""))) == 6  # no pattern: every file its own group


def test_a_file_per_patient_source_groups_by_file_while_the_others_group_by_block():
    from pathlib import Path

    from ctapp.data import Sample

    def named(source: str, stems: list[str]) -> list[Sample]:
        return [Sample(Path(f"/d/{source}/COVID/{n}.jpg"), 0, "", source) for n in stems]

    mosmed = named("mosmed", [f"img{i}" for i in range(1, 21)])
    sars = named("sarscov2-ctscan", [f"Covid ({i})" for i in range(1, 21)])
    groups = group_ids(mosmed + sars, block_size=10)
    assert len(set(groups[:20])) == 20  # one slice per study: numbers say nothing
    assert len(set(groups[20:])) == 3  # 1-9, 10-19, 20: blocks of consecutive slices
    assert not set(groups[:20]) & set(groups[20:])
    # Without the rule, MosMed would be cut into blocks too.
    assert len(set(group_ids(mosmed, block_size=10, file_per_patient=frozenset()))) == 3


def test_folds_hold_every_sources_classes_in_their_shares():
    from pathlib import Path

    from ctapp.data import Sample, cv_folds

    # Source 'a' is mostly class 0 and 'b' mostly class 1: stratifying by class alone can give a fold
    # almost no class-1 images of 'a'; by source and class, each fold holds its share of each.
    samples = [Sample(Path(f"/d/{src}/{label}/{src}{label}-{i}.png"), label, "", src)
               for src, sizes in (("a", (60, 12)), ("b", (12, 60))) for label, n in enumerate(sizes)
               for i in range(n)]
    folds = cv_folds(samples, np.arange(len(samples)), 3, 0, ["x", "y"])
    for src, label, n in (("a", 0, 60), ("a", 1, 12), ("b", 0, 12), ("b", 1, 60)):
        per_fold = np.bincount([f for s, f in zip(samples, folds) if s.source == src and s.label == label],
                               minlength=3)
        assert per_fold.tolist() == [n // 3] * 3, (src, label, per_fold)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no sub-folders"):
        scan_dataset(tmp_path)
    (tmp_path / "normal").mkdir()
    with pytest.raises(DatasetError, match="hold no files"):
        scan_dataset(tmp_path)


def test_one_class_cannot_be_split(tmp_path):
    write_classes(tmp_path, ["normal"], 6, size=24)
    with pytest.raises(DatasetError, match="two classes"):
        assign_splits(scan_dataset(tmp_path))


def test_unknown_class_for_a_model_is_refused(tmp_path):
    write_classes(tmp_path, ["covid", "pneumonia"], 2, size=24)
    with pytest.raises(DatasetError, match="pneumonia"):
        scan_dataset(tmp_path, class_names=["covid", "non-covid"])


def test_notes_on_extra_folders_and_a_class_empty_in_one_split(tmp_path):
    write_classes(tmp_path / "train", ["covid", "normal"], 3, size=24)
    write_classes(tmp_path / "valid", ["covid"], 2, size=24)
    (tmp_path / "valid" / "normal").mkdir()
    (tmp_path / "scratch").mkdir()
    index = scan_dataset(tmp_path)
    assert index.notes == ["ignored folder 'scratch': not a split name",
                           "folder 'valid/normal' is empty: that split has no images of 'normal'"]


def test_a_class_folder_empty_everywhere_is_refused(tmp_path):
    write_classes(tmp_path, ["covid"], 3, size=24)
    (tmp_path / "pneumonia").mkdir()
    with pytest.raises(DatasetError, match=r"class folder\(s\) 'pneumonia' hold no images; add images or remove"):
        scan_dataset(tmp_path)


def test_sources_pooled_with_their_names_and_missing_classes(tmp_path):
    from ctapp.data import scan_sources

    write_classes(tmp_path / "hospital-a", ["COVID", "non-COVID"], 2, size=24)
    write_classes(tmp_path / "papers" / "b", ["covid", "pneumonia"], 3, size=24, start=10)
    index = scan_sources([tmp_path / "hospital-a", tmp_path / "papers" / "b"])
    assert index.class_names == ["covid", "non-covid", "pneumonia"] and index.layout == "classes"
    assert index.display_names == ["COVID", "Non-COVID", "Pneumonia"]
    counts = {}
    for s in index.samples:
        key = (s.source, index.class_names[s.label])
        counts[key] = counts.get(key, 0) + 1
    assert counts == {("hospital-a", "covid"): 2, ("hospital-a", "non-covid"): 2, ("papers/b", "covid"): 3,
                      ("papers/b", "pneumonia"): 3}
    assert [n for n in index.notes if "no images of" in n] == [
        "hospital-a: no images of ['pneumonia']", "papers/b: no images of ['non-covid']"]
    # A model's class order (evaluating pooled sources with it) is kept, labels following it.
    ordered = scan_sources([tmp_path / "hospital-a", tmp_path / "papers" / "b"],
                           class_names=["pneumonia", "covid", "non-covid"])
    assert ordered.class_names == ["pneumonia", "covid", "non-covid"]
    assert sorted((s.path, ordered.class_names[s.label]) for s in ordered.samples) == \
        sorted((s.path, index.class_names[s.label]) for s in index.samples)
    with pytest.raises(DatasetError, match="the same folder is given twice"):
        scan_sources([tmp_path / "hospital-a", tmp_path / "hospital-a"])
    with pytest.raises(DatasetError, match="no dataset folder given"):
        scan_sources([])


def test_folds_need_two_and_enough_images_of_each_class(tmp_path):
    from ctapp.data import cv_folds

    write_classes(tmp_path, ["covid", "normal"], 6, size=24)
    index = scan_dataset(tmp_path)
    groups = np.arange(len(index.samples))
    with pytest.raises(DatasetError, match="cross-validation needs at least 2 folds, got 1"):
        cv_folds(index.samples, groups, 1, 0, index.class_names)
    with pytest.raises(DatasetError, match="class 'covid' has only 6 images, but 7-fold cross-validation needs "
                                           "at least 7 per class"):
        cv_folds(index.samples, groups, 7, 0, index.class_names)
    blocks = groups // 3
    with pytest.raises(DatasetError, match="has only 2 blocks of consecutive slices"):
        cv_folds(index.samples, blocks, 3, 0, index.class_names)


def test_the_dataset_fingerprint_names_the_files_not_their_order(tmp_path):
    import random

    write_classes(tmp_path / "data", ["covid", "normal"], 4, size=24)
    index = scan_dataset(tmp_path / "data")
    first = index.fingerprint()
    random.Random(0).shuffle(index.samples)
    assert index.fingerprint() == first
    (tmp_path / "data" / "normal" / "normal (0).png").write_bytes(
        (tmp_path / "data" / "normal" / "normal (0).png").read_bytes() + b"\0")  # one file one byte longer
    assert index.fingerprint() != first
