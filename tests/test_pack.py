"""The packed training set: written once from the folders, read back as they are read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic import make_split_dataset, write_classes

from ctapp.data import DatasetError
from ctapp.preprocess import PreprocessConfig
from training.pack import Layer, default_layers, write_pack
from training.packed import FolderData, PackedData

EQUALISED_48 = PreprocessConfig(img_size=48, crop="body", intensity="equalise")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    """Three sources (a split-layout one, an unreadable file, a MosMed-like one) and their pack."""
    root = tmp_path_factory.mktemp("sources")
    make_split_dataset(root / "lung", ["adenocarcinoma_left_T2", "normal"], train=4, valid=2, size=40)
    write_classes(root / "covid" / "hospital", ["COVID", "non-COVID"], 5, size=56)
    write_classes(root / "covid" / "mosmed", ["COVID", "non-COVID"], 5, size=36, seed=3)
    (root / "covid" / "hospital" / "COVID" / "broken.png").write_bytes(b"not an image")
    roots = [root / "lung", root / "covid" / "hospital", root / "covid" / "mosmed"]
    write_pack(roots, root / "pack.npz", [Layer("equalise", 48), Layer("percentile", 40, ("covid/hospital",))],
               workers=1, log=lambda msg: None)
    return root, root / "pack.npz"


@pytest.mark.parametrize("sources", [["covid/hospital", "covid/mosmed"], ["lung"]])
def test_the_packed_set_round_trips_to_the_same_inputs_as_the_images(packed, sources):
    root, pack_file = packed
    roots = [root / s for s in sources]
    pack = PackedData(pack_file)
    folders, stored = FolderData().scan(roots), pack.scan(roots)
    assert stored.samples == folders.samples  # paths, labels, splits and sources
    assert (stored.class_names, stored.display_names, stored.layout, stored.notes) == \
        (folders.class_names, folders.display_names, folders.layout, folders.notes)
    assert stored.fingerprint() == folders.fingerprint()
    assert pack.audit(stored, workers=1).to_dict() == FolderData().audit(folders, workers=1).to_dict()
    paths = [s.path for s in folders.samples]
    from_images, from_pack = FolderData().load(paths, EQUALISED_48, workers=1), pack.load(paths, EQUALISED_48)
    assert from_pack.errors == from_images.errors and from_pack.digests == from_images.digests
    assert from_pack.geometries == from_images.geometries
    assert from_pack.images.shape == from_images.images.shape
    assert float((from_pack.images - from_images.images).abs().max()) <= 0.5 / 255 + 1e-6  # uint8 rounding only


def test_the_pack_reads_without_the_images(packed, tmp_path):
    root, pack_file = packed
    moved = tmp_path / "elsewhere"
    (root / "covid").rename(moved)
    try:
        pack = PackedData(pack_file)
        index = pack.scan([root / "covid" / "hospital", root / "covid" / "mosmed"])
        loaded = pack.load([s.path for s in index.samples], EQUALISED_48)
        assert sum(1 for e in loaded.errors if e) == 1 and "broken.png" in next(e for e in loaded.errors if e)
        assert float(loaded.images.sum()) > 0 and pack.audit(index).to_dict()["unreadable"] == [
            "hospital/COVID/broken.png"]
    finally:
        moved.rename(root / "covid")


def test_a_smaller_input_is_resized_from_the_layer_and_a_missing_layer_is_named(packed):
    root, pack_file = packed
    pack = PackedData(pack_file)
    index = pack.scan([root / "covid" / "hospital", root / "lung"])
    paths = [s.path for s in index.samples if "broken" not in s.path.name]
    small = PreprocessConfig(img_size=32, crop="body", intensity="equalise")
    resized, direct = pack.load(paths, small), FolderData().load(paths, small, workers=1)
    assert resized.images.shape == (len(paths), 1, 32, 32)
    assert float((resized.images - direct.images).abs().mean()) < 0.06  # two resamplings, not one
    percentile = PreprocessConfig(img_size=40, crop="body", intensity="percentile")
    hospital = [p for p in paths if "hospital" in p.parts]
    assert pack.load(hospital, percentile).images.shape[0] == len(hospital)
    with pytest.raises(DatasetError, match=r"no percentile layer of lung at 40 px or more; write one with "
                                           r"python -m training.pack --layer percentile:40:lung"):
        pack.load([p for p in paths if "lung" in p.parts][:1], percentile)
    with pytest.raises(DatasetError, match="holds crop 'body'"):
        pack.load(hospital[:1], PreprocessConfig(img_size=40, crop="none", intensity="equalise"))
    with pytest.raises(DatasetError, match="no source of .* ends so; it holds"):
        pack.scan([root / "covid" / "elsewhere"])


def test_a_file_that_is_not_a_pack_says_so(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"PK not really")
    with pytest.raises(DatasetError, match="not a packed training set"):
        PackedData(tmp_path / "x.npz")


def test_the_default_layers_are_the_shipped_recipes_sizes():
    names = ["chest-ct-scan-images/Data", "sarscov2-ctscan", "mosmed", "my-hospital"]
    assert default_layers(names) == [Layer("equalise", 192, ("chest-ct-scan-images/Data",)),
                                     Layer("equalise", 128, ("sarscov2-ctscan", "mosmed")),
                                     Layer("percentile", 128, ("sarscov2-ctscan", "mosmed")),
                                     Layer("equalise", 128, ("my-hospital",))]
    assert Layer.parse("equalise:128") == Layer("equalise", 128, ())
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="INTENSITY:SIZE"):
        Layer.parse("sharp:128")


def test_the_pack_is_compressed_below_the_raw_squares(packed):
    _, pack_file = packed
    arrays = np.load(pack_file, allow_pickle=False)
    raw = sum(arrays[k].nbytes for k in arrays.files if k.endswith("_images"))
    assert pack_file.stat().st_size < raw


def test_a_fresh_reader_finds_a_file_by_its_sources_name_and_place(packed):
    root, pack_file = packed
    scanned = PackedData(pack_file)
    paths = [s.path for s in scanned.scan([root / "covid" / "mosmed"]).samples]
    fresh = PackedData(pack_file)  # another reader, as a later step of a run opens it, without a scan
    expected = scanned.load(paths, EQUALISED_48)
    loaded = fresh.load(paths, EQUALISED_48)
    assert loaded.digests == expected.digests and len(set(loaded.digests)) == len(paths) == 10
    assert bool((loaded.images == expected.images).all())
    with pytest.raises(DatasetError, match="is not in"):
        fresh.load([root / "covid" / "mosmed" / "COVID" / "nowhere.png"], EQUALISED_48)


@pytest.mark.slow
def test_a_cross_validation_from_the_pack_is_the_one_from_the_folders_without_them(tmp_path):
    import json

    from training.fit import run

    for name, n, size in (("sarscov2-ctscan", 12, 40), ("mosmed", 8, 36)):
        write_classes(tmp_path / "data" / name, ["COVID", "non-COVID"], n, size=size, seed=len(name))
    data = [str(tmp_path / "data" / "sarscov2-ctscan"), str(tmp_path / "data" / "mosmed")]
    write_pack([Path(d) for d in data], tmp_path / "pack.npz", [Layer("equalise", 48)], workers=1,
               log=lambda msg: None)
    argv = ["--data", *data, "--cv", "2", "--split-block", "5", "--arch", "baseline", "--img-size", "32",
            "--batch-size", "8", "--epochs", "1", "--workers", "1", "--quiet"]
    assert run([*argv, "--out", str(tmp_path / "from-folders")]) == 0
    (tmp_path / "data").rename(tmp_path / "gone")
    assert run([*argv, "--out", str(tmp_path / "from-pack"), "--pack", str(tmp_path / "pack.npz")]) == 0
    folds = [(tmp_path / run_dir / "cv" / "folds.csv").read_text() for run_dir in ("from-folders", "from-pack")]
    assert folds[0] == folds[1] and "mosmed/COVID" in folds[0]
    cards = [json.loads((tmp_path / run_dir / "model_card.json").read_text())
             for run_dir in ("from-folders", "from-pack")]
    assert cards[0]["training_data"]["fingerprint"] == cards[1]["training_data"]["fingerprint"]
    assert cards[0]["training_data"]["audit"] == cards[1]["training_data"]["audit"]
    assert run([*argv[:5], "--out", str(tmp_path / "single"), "--pack", str(tmp_path / "pack.npz")]) == 2
