"""The dataset audit on planted problems (exact counts) and on the real data."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from synthetic import write_classes

from ctapp.audit import audit_dataset
from ctapp.data import scan_dataset
from training import audit as audit_cli


@pytest.fixture
def planted(tmp_path):
    """train: a 6, b 6; valid: a 2, b 2; then plant known problems."""
    root = tmp_path / "data"
    write_classes(root / "train", ["a_stage1", "b"], 6, seed=0, size=32)
    write_classes(root / "valid", ["a", "b"], 2, seed=1, size=32)
    train_a, train_b = root / "train" / "a_stage1", root / "train" / "b"
    # 1) a duplicate group of three inside train/a (two redundant copies), one saved as RGBA
    shutil.copy(train_a / "a (0).png", train_a / "a (0) - Copy.png")
    Image.open(train_a / "a (0).png").convert("RGBA").save(train_a / "a (0) - Copy (2).png")
    # 2) two validation images that are copies of training images (cross-split)
    shutil.copy(train_b / "b (1).png", root / "valid" / "b" / "copied b.png")
    shutil.copy(train_a / "a (2).png", root / "valid" / "a" / "copied a.png")
    # 3) one image under two labels
    shutil.copy(train_a / "a (3).png", train_b / "mislabelled.png")
    # 4) an unreadable file and a JPEG named .png
    (train_b / "broken.png").write_bytes(b"not an image at all")
    Image.open(train_b / "b (4).png").convert("RGB").save(train_b / "jpeg inside.png", format="JPEG")
    return root


def test_audit_counts_planted_problems(planted):
    report = audit_dataset(scan_dataset(planted))
    d = report.to_dict()
    assert d["images"] == 6 * 2 + 2 * 2 + 2 + 2 + 1 + 2  # 23 files
    assert d["readable"] == 22
    assert d["unreadable"] == ["train/b/broken.png"]
    assert d["duplicate_groups"] == 4  # a(0) x3, b(1)+valid copy, a(2)+valid copy, a(3)+mislabelled
    assert sorted(map(sorted, d["duplicates"])) == [  # the groups the model card page lists
        ["train/a_stage1/a (0) - Copy (2).png", "train/a_stage1/a (0) - Copy.png", "train/a_stage1/a (0).png"],
        ["train/a_stage1/a (2).png", "valid/a/copied a.png"], ["train/a_stage1/a (3).png", "train/b/mislabelled.png"],
        ["train/b/b (1).png", "valid/b/copied b.png"]]
    assert d["redundant_copies"] == 2 + 1 + 1 + 1
    assert d["unique_images"] == 22 - 5
    assert d["cross_split_copies"] == 2
    assert sorted(d["cross_split_copy_paths"]) == ["valid/a/copied a.png", "valid/b/copied b.png"]
    assert d["label_conflicts"] == [["train/a_stage1/a (3).png", "train/b/mislabelled.png"]]
    # policy: drop the 2 redundant copies, the 2 evaluation copies and both conflicting images
    assert d["dropped"] == 6
    assert d["kept"] == 22 - 6
    assert d["class_balance_kept"]["valid"] == {"a": 2, "b": 2}
    assert any("extension" in note for note in d["notes"])
    assert "train/a_stage1/a (0).png" not in d["dropped_paths"]  # the first copy is kept


def test_audit_cli_json_keys(planted, capsys):
    assert audit_cli.run(["--data", str(planted), "--json"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""  # no progress line around the JSON
    report = json.loads(printed.out)
    assert printed.out.startswith('{\n  "')  # indented: read by people as well as by programs
    for key in ("images", "unique_images", "duplicate_groups", "redundant_copies", "cross_split_copies",
                "label_conflicts", "unreadable"):
        assert key in report
    assert isinstance(report["label_conflicts"], list) and isinstance(report["unreadable"], list)
    assert report["cross_split_copies"] == 2
    assert audit_cli.run(["--data", str(planted)]) == 0
    assert capsys.readouterr().err.startswith(f"auditing {report['images']}/{report['images']} images | ")
    (planted.parent / "empty").mkdir()
    assert audit_cli.run(["--data", str(planted.parent / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {planted.parent / 'empty'}")


def test_audit_text_lists_each_unreadable_file_with_its_reason(planted, capsys):
    (planted / "valid" / "a" / "empty.png").write_bytes(b"")
    assert audit_cli.run(["--data", str(planted)]) == 0
    text = capsys.readouterr().out
    start = text.index("unreadable: 2\n")
    assert text[start:].splitlines()[1:4] == [
        "  - train/b/broken.png: not an image file (it looks like text); upload a PNG, JPEG, TIFF, BMP or DICOM slice",
        "  - valid/a/empty.png: the file is empty", "class balance: train: a 8, b 8; valid: a 3, b 3"]


def test_audit_describes_each_class_by_its_own_images(tmp_path):
    for name, images in {"dark": [(16, 20, 10), (16, 30, 30)], "bright": [(24, 24, 200)]}.items():
        (tmp_path / name).mkdir()
        for i, (height, width, level) in enumerate(images):
            Image.fromarray(np.full((height, width), level, np.uint8)).save(tmp_path / name / f"{i}.png")
    stats = audit_dataset(scan_dataset(tmp_path)).to_dict()["per_class"]
    assert (stats["dark"]["images"], stats["bright"]["images"]) == (2, 1)
    assert stats["dark"]["width"] == {"min": 20, "median": 25, "max": 30, "mean": 25, "std": 5}
    assert stats["dark"]["height"]["max"] == 16 and stats["bright"]["height"]["max"] == 24
    assert stats["dark"]["brightness"]["mean"] == pytest.approx(20 / 255, abs=1e-6)
    assert stats["bright"]["brightness"]["min"] == pytest.approx(200 / 255, abs=1e-6)
    assert stats["dark"]["contrast"]["max"] == stats["bright"]["contrast"]["max"] == 0  # flat images


def test_a_copy_shared_by_a_pooled_source_is_kept_once_from_the_folder_without_splits(tmp_path):
    """Sources pooled for cross-validation: a class folder source next to one
    with a train split. A copy in both is one image, kept once."""
    from ctapp.data import scan_sources

    write_classes(tmp_path / "clinic", ["covid", "normal"], 3, size=24)
    write_classes(tmp_path / "public" / "train", ["covid", "normal"], 3, size=24, start=10, seed=5)
    shutil.copy(tmp_path / "clinic" / "covid" / "covid (0).png", tmp_path / "public" / "train" / "covid" / "c.png")
    index = scan_sources([tmp_path / "clinic", tmp_path / "public"])
    assert index.layout == "splits"
    report = audit_dataset(index).to_dict()
    assert report["duplicate_groups"] == 1 and report["dropped"] == 1
    assert list(report["dropped_paths"]) == ["public/train/covid/c.png"]


def test_shortcut_probe_sees_brightness(tmp_path):
    """Classes that differ only in brightness are 'solved' by the probe."""
    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("bright", 160)):
        (tmp_path / name).mkdir()
        for i in range(15):
            pixels = np.clip(rng.normal(level, 10, (32, 32)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    probe = audit_dataset(scan_dataset(tmp_path)).to_dict()["shortcut_probe"]
    assert probe["accuracy"] > 0.9 and probe["chance"] == 0.5


def test_a_shortcut_probe_fifteen_points_above_chance_is_a_warning_overall_and_per_source():
    from ctapp.audit import AuditReport

    def warnings(accuracy: float, per_source: dict) -> list[str]:
        shortcut = {"accuracy": accuracy, "chance": 0.5, "per_source": per_source}
        return AuditReport(None, [], {}, [], [], [], shortcut).warnings()

    message = ("image size and brightness alone predict the class with {:.0%} accuracy (chance {:.0%}): the model "
               "may learn where an image came from, not what it shows")
    assert warnings(0.64, {"papers": {"accuracy": 0.4, "chance": 0.25}}) == [
        "in papers: " + message.format(0.4, 0.25)]
    assert warnings(0.65, {"papers": {"accuracy": 0.39, "chance": 0.25}}) == [message.format(0.65, 0.5)]
    assert warnings(0.6, {"papers": {"accuracy": None, "chance": 0.25}}) == []


def test_shortcut_probe_on_too_few_or_no_readable_images_says_so(tmp_path):
    from ctapp.audit import shortcut_probe

    for name in ("dark", "bright"):
        (tmp_path / name).mkdir()
        Image.new("L", (32, 32), 40 if name == "dark" else 160).save(tmp_path / name / "1.png")
    probe = audit_dataset(scan_dataset(tmp_path)).to_dict()["shortcut_probe"]
    assert probe["accuracy"] is None and probe["chance"] == 0.5
    assert probe["note"] == "too few images per class to run the probe"
    nothing = shortcut_probe([])
    assert nothing["accuracy"] is None and nothing["chance"] == 0.0 and "too few" in nothing["note"]
    # Two images of each class are enough: a 2-fold probe.
    for name in ("dark", "bright"):
        Image.new("L", (32, 32), 50 if name == "dark" else 170).save(tmp_path / name / "2.png")
    probe = audit_dataset(scan_dataset(tmp_path)).to_dict()["shortcut_probe"]
    assert probe["accuracy"] == 1.0 and "note" not in probe  # brightness alone tells them apart


def test_input_shortcut_probe_sees_padding_and_not_noise():
    """On model inputs: classes told apart only by the black padding around the slice are solved; classes
    drawn from one distribution stay near chance (3 classes, 2 of them 10 images: 5 folds, chance 0.5)."""
    from ctapp.audit import input_shortcut_probe

    rng = np.random.default_rng(1)
    inputs = rng.uniform(0.2, 0.8, (40, 16, 16)).astype(np.float32)
    labels = np.array([0] * 20 + [1] * 10 + [2] * 10)
    padded = inputs.copy()
    padded[labels == 1, :4] = 0.0  # a quarter of the square black
    padded[labels == 2, :8] = 0.0  # half of it
    found = input_shortcut_probe(padded, labels)
    assert found["chance"] == 0.5 and found["accuracy"] > 0.9
    assert found["features"] == ["mean", "std", "p5", "p25", "p50", "p75", "p95", "black share"]
    noise = input_shortcut_probe(inputs, labels)
    assert noise["accuracy"] < 0.7 and 0.0 < noise["accuracy_std"] < 0.5  # the spread over folds, as printed
    assert set(noise) == {"features", "chance", "accuracy", "accuracy_std"}
    # A subset (one source) without one of the classes: the probe runs on the classes it has.
    without_middle = labels != 1
    pair = input_shortcut_probe(padded[without_middle], labels[without_middle])
    assert pair["chance"] == 20 / 30 and pair["accuracy"] > 0.9


@pytest.mark.shared_data
def test_real_chest_ct_audit_matches_hand_count(shared_data):
    """Hand count (file hashes and decoded pixels agree): 59 groups of identical images
    with 107 redundant copies, 10 validation images that are training images, and
    l4.png (large cell) == sq2.png (squamous)."""
    report = audit_dataset(scan_dataset(shared_data / "chest-ct-scan-images" / "Data")).to_dict()
    assert report["images"] == 685 and report["unreadable"] == []
    assert report["duplicate_groups"] == 59
    assert report["redundant_copies"] == 107
    assert report["cross_split_copies"] == 10
    assert all(p.startswith("valid/normal/") for p in report["cross_split_copy_paths"])
    assert len(report["label_conflicts"]) == 1
    conflict = sorted(p.rsplit("/", 1)[1] for p in report["label_conflicts"][0])
    assert conflict == ["l4.png", "sq2.png"]
    assert report["unique_images"] == 578
