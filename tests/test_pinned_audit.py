"""The audit and the training data policy on copies planted in every split
(train, valid and test), with counts worked out by hand.

Pins two faults that once survived the suite: cross-split copies in a ``test``
split not counted, and ``--keep-duplicates`` inverted (so the default silently
kept duplicates and leaked training images into evaluation).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from synthetic import write_classes

from ctapp.audit import audit_dataset
from ctapp.data import scan_dataset

# Planted copies: (source, copy), relative to the dataset root.
PLANTED = [
    ("train/alpha/alpha (0).png", "train/alpha/alpha (0) again.png"),  # duplicate inside train
    ("train/beta/beta (1).png", "valid/beta/beta from train.png"),  # train -> valid
    ("train/beta/beta (1).png", "test/beta/beta from train.png"),  # the same train image -> test
    ("train/alpha/alpha (2).png", "test/alpha/alpha from train.png"),  # train -> test
    ("valid/alpha/alpha (100).png", "test/alpha/alpha from valid.png"),  # valid -> test (no training copy)
    ("valid/beta/beta (100).png", "valid/beta/beta (100) again.png"),  # duplicate inside valid
    ("train/alpha/alpha (3).png", "train/beta/filed as beta.png"),  # the same image under two labels
]
CROSS_SPLIT = ["test/alpha/alpha from train.png", "test/beta/beta from train.png", "valid/beta/beta from train.png"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """16 distinct slices (train 4+4, valid 2+2, test 2+2), then 7 planted copies: 23 files."""
    root = tmp_path_factory.mktemp("planted") / "data"
    write_classes(root / "train", ["alpha", "beta"], 4, seed=0, size=32, start=0)
    write_classes(root / "valid", ["alpha", "beta"], 2, seed=1, size=32, start=100)
    write_classes(root / "test", ["alpha", "beta"], 2, seed=2, size=32, start=200)
    for source, copy in PLANTED:
        shutil.copy(root / source, root / copy)
    return root


@pytest.fixture(scope="module")
def report(planted) -> dict:
    return audit_dataset(scan_dataset(planted), workers=1).to_dict()


def test_audit_counts_copies_planted_in_every_split(report):
    assert report["images"] == 23 and report["readable"] == 23
    assert report["unique_images"] == 16
    # groups: alpha(0) x2, beta(1) x3, alpha(2) x2, alpha(100) x2, beta(100) x2, alpha(3) x2
    assert report["duplicate_groups"] == 6
    assert report["redundant_copies"] == 1 + 2 + 1 + 1 + 1 + 1


def test_audit_counts_training_images_copied_into_test_as_well_as_valid(report):
    assert report["cross_split_copies"] == 3  # one in valid, two in test
    assert sorted(report["cross_split_copy_paths"]) == CROSS_SPLIT
    # a copy between valid and test is not a copy of a training image
    assert "test/alpha/alpha from valid.png" not in report["cross_split_copy_paths"]
    assert any("3 evaluation image(s) also appear in training" in w for w in report["warnings"])


def test_audit_policy_drops_every_redundant_copy_and_both_conflicting_images(report):
    dropped = report["dropped_paths"]
    assert sorted(dropped) == sorted([copy for _, copy in PLANTED] + ["train/alpha/alpha (3).png"])
    assert report["dropped"] == 8 and report["kept"] == 23 - 8
    assert dropped["test/alpha/alpha from train.png"] == "copy of train image alpha (2).png"
    assert dropped["test/alpha/alpha from valid.png"] == "copy of valid image alpha (100).png"
    assert dropped["train/alpha/alpha (0) again.png"] == "duplicate of alpha (0).png"
    assert report["class_balance_kept"] == {"train": {"alpha": 3, "beta": 4}, "valid": {"alpha": 2, "beta": 2},
                                            "test": {"alpha": 2, "beta": 2}}


def _prepared(planted: Path, tmp_path: Path, *extra: str):
    from training.fit import get_args_parser
    from training.single_split import prepare_data

    args = get_args_parser().parse_args(["--data", str(planted), "--out", str(tmp_path / "out"), "--workers", "1",
                                         *extra])
    index, _, _ = prepare_data(args, log=lambda message: None)
    return {split: sorted(str(s.path.relative_to(planted)) for s in index.split(split))
            for split in ("train", "valid", "test")}


def test_training_drops_duplicates_and_cross_split_copies_by_default(planted, tmp_path):
    splits = _prepared(planted, tmp_path)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [7, 4, 4]
    everything = sum(splits.values(), [])
    for _, copy in PLANTED:
        assert copy not in everything
    assert "train/alpha/alpha (3).png" not in everything  # label conflict: both copies go
    assert "train/alpha/alpha (0).png" in splits["train"]  # the first copy stays


def test_keep_duplicates_flag_keeps_every_copy(planted, tmp_path):
    splits = _prepared(planted, tmp_path, "--keep-duplicates")
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [10, 6, 7]
    for path in CROSS_SPLIT:
        assert path in splits[path.split("/")[0]]


@pytest.mark.parametrize("layout", ["classes", "train split only"])
def test_training_splits_keep_the_files_its_group_pattern_names_together(tmp_path, layout):
    """``--group-pattern`` reaches the split whichever way the validation images are held out."""
    import numpy as np
    from PIL import Image

    from training.fit import get_args_parser
    from training.single_split import prepare_data

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label in ("alpha", "beta"):
        folder = root / ("train" if layout != "classes" else "") / label
        folder.mkdir(parents=True)
        for patient in range(10):
            for view in "abc":  # three different slices of one patient
                Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{patient}-{view}.png")
    args = get_args_parser().parse_args(["--data", str(root), "--out", str(tmp_path / "out"), "--workers", "1",
                                         "--group-pattern", r"^(\d+)-"])
    index, _, _ = prepare_data(args, log=lambda message: None)
    sides = {}
    for s in index.samples:
        sides.setdefault((s.label, s.path.stem.split("-")[0]), set()).add(s.split)
    assert len(sides) == 20 and all(len(side) == 1 for side in sides.values())
    assert {s.split for s in index.samples} == {"train", "valid"}
