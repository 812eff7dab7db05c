"""The gate's both-ways table (benchmarks/gate.py): the foreign-image set builds
every kind as files the app decodes, and the table's out-of-fold side counts
what the app would answer, member and ensemble, as a hand count does."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gate import oof_answers, tally
from ctapp.imaging import decode
from ctapp.inference import CONFIDENT, LOW_CONFIDENCE, NOT_CHEST_CT, UNLIKE_TRAINING
from ctapp.model_folders import ENSEMBLE_FILE
from ctapp.ood import EnsembleGate
from training.foreign import FOREIGN_KINDS, foreign_set


def test_the_foreign_set_builds_every_kind_as_files_the_app_decodes():
    images = foreign_set(size=96)
    per_kind = Counter(image.kind for image in images)
    assert set(per_kind) == set(FOREIGN_KINDS)
    assert min(per_kind.values()) >= 4, per_kind  # several variants, so a share means something
    assert len({image.name for image in images}) == len(images)
    pixels = {}
    for image in images:
        decoded = decode(image.data)
        assert decoded.source_format == image.format, image.name
        pixels[image.name] = decoded.to_uint8()
        assert decoded.pixels.std() > 0 or image.kind == "blank", image.name
    # Other body parts, reformats and the CT phantoms reach the model as a scanner's CT does: Hounsfield
    # units in DICOM, through the lung window.
    for image in images:
        if image.kind in ("head_ct", "abdomen_ct", "pelvis_ct", "coronal_reformat", "sagittal_reformat") \
                and image.format == "DICOM":
            assert decode(image.data).hu is not None, image.name
    assert len({p.tobytes() for p in pixels.values()}) == len(pixels)  # no two variants alike
    again = {image.name: decode(image.data).to_uint8() for image in foreign_set(size=96)}
    assert again.keys() == pixels.keys() and all(np.array_equal(again[k], pixels[k]) for k in pixels)  # seeded


# A hand-made cross-validated pair: two folds, per-fold thresholds, and the rows as training writes them.
FITS = [{"fold": 0, "temperature": 1.0, "confidence_threshold": 0.7, "ood_threshold": 2.0, "far_threshold": 10.0},
        {"fold": 1, "temperature": 1.0, "confidence_threshold": 0.8, "ood_threshold": 4.0, "far_threshold": 20.0}]
# sha, source, fold, true, pred, confidence, (ood, far) of member a, (ood, far) of member b
SLICES = [
    ("s1", "A", 0, "x", "x", 0.9, (1.0, 3.0), (1.0, 3.0)),      # both at home: answered, right
    ("s2", "A", 0, "x", "y", 0.9, (1.0, 3.0), (1.0, 3.0)),      # answered, wrong
    ("s3", "A", 0, "x", "x", 0.6, (1.0, 3.0), (1.0, 3.0)),      # low confidence
    ("s4", "A", 1, "y", "y", 0.9, (5.0, 6.0), (1.0, 6.0)),      # a: unlike (5 > 4); mean ratio (1.25 + 0.25) / 2
    ("s5", "B", 1, "y", "y", 0.9, (10.0, 25.0), (2.0, 5.0)),    # a: not a chest CT (25 > 20); b at home
    ("s6", "B", 0, "y", "x", 0.95, (3.0, 12.0), (3.0, 11.0)),   # both: not a chest CT
    ("s7", "B", 1, "x", "x", 0.85, (5.0, 6.0), (6.0, 7.0)),     # both unlike
]


def _write_member(folder: Path, member: int) -> None:
    folder.mkdir(parents=True)
    with open(folder / "eval_report.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "source", "fold", "true", "pred", "confidence", "p_x", "p_y", "ood_score", "far_score",
                         "sha256"])
        for sha, source, fold, true, pred, confidence, *scores in SLICES:
            ood, far = scores[member]
            p_x = confidence if pred == "x" else 1 - confidence
            writer.writerow([f"{sha}.png", source, fold, true, pred, confidence, p_x, 1 - p_x, ood, far, sha])
    (folder / "eval_report.json").write_text(json.dumps({"out_of_fold": True, "class_names": ["x", "y"],
                                                         "crossfit": {"per_fold": FITS}}))


@pytest.fixture
def pair(tmp_path) -> Path:
    _write_member(tmp_path / "a", 0)
    _write_member(tmp_path / "b", 1)
    ensemble = tmp_path / "ab"
    ensemble.mkdir()
    (ensemble / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../a", "../b"]}))
    # The members agree on every slice's probabilities, so the ensemble's (temperature 1) are theirs.
    fits = [{"fold": f["fold"], "temperature": 1.0, "confidence_threshold": f["confidence_threshold"]} for f in FITS]
    (ensemble / "eval_report.json").write_text(json.dumps({"out_of_fold": True, "crossfit": {"per_fold": fits}}))
    return tmp_path


def test_the_out_of_fold_side_of_the_table_matches_a_hand_count(pair):
    states = [a["state"] for a in oof_answers(pair / "a")]
    assert states == [CONFIDENT, CONFIDENT, LOW_CONFIDENCE, UNLIKE_TRAINING, NOT_CHEST_CT, NOT_CHEST_CT,
                      UNLIKE_TRAINING]
    assert [a["state"] for a in oof_answers(pair / "b")] == [CONFIDENT, CONFIDENT, LOW_CONFIDENCE, CONFIDENT,
                                                             CONFIDENT, NOT_CHEST_CT, UNLIKE_TRAINING]
    # The ensemble: not a chest CT only when both members say so; unlike when the mean ratio is over 1
    # (s4: 0.75, s5: (2.5 + 0.5) / 2 = 1.5, s7: (1.25 + 1.5) / 2).
    ensemble = oof_answers(pair / "ab", EnsembleGate("all", "mean"))
    assert [a["state"] for a in ensemble] == [CONFIDENT, CONFIDENT, LOW_CONFIDENCE, CONFIDENT, UNLIKE_TRAINING,
                                              NOT_CHEST_CT, UNLIKE_TRAINING]
    severest = oof_answers(pair / "ab", EnsembleGate("any", "max"))
    assert [a["state"] for a in severest] == [CONFIDENT, CONFIDENT, LOW_CONFIDENCE, UNLIKE_TRAINING, NOT_CHEST_CT,
                                              NOT_CHEST_CT, UNLIKE_TRAINING]
    source_a = tally([a for a in ensemble if a["source"] == "A"])
    assert source_a == {"slices": 4, "not_chest_ct": 0.0, "unlike": 0.0, "answered": 0.75,
                        "accuracy_answered": pytest.approx(2 / 3), "confidently_wrong": 0.25}
    source_b = tally([a for a in ensemble if a["source"] == "B"])
    assert source_b["not_chest_ct"] == pytest.approx(1 / 3) and source_b["unlike"] == pytest.approx(2 / 3)
    assert source_b["answered"] == 0 and source_b["accuracy_answered"] is None
    assert source_b["confidently_wrong"] == 0


def test_a_set_without_classes_of_the_model_has_no_accuracy():
    figures = tally([{"state": CONFIDENT, "correct": None}, {"state": NOT_CHEST_CT, "correct": None}])
    assert figures["answered"] == 0.5 and figures["accuracy_answered"] is None
    assert figures["confidently_wrong"] is None and np.isclose(figures["not_chest_ct"], 0.5)


SHIPPED = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.skipif(not (SHIPPED / "lung-ensemble" / ENSEMBLE_FILE).is_file(), reason="no shipped lung ensemble")
def test_one_members_lone_not_a_chest_ct_is_not_the_shipped_ensembles(tmp_path):
    """Real chest CT slices that lung-vgg19_bn alone called 'not a chest CT' out of fold by its far score
    (as a model folder without the chest-CT check beside it does): the ensemble (its shipped rule) does
    not call them so, and still gives them no answer."""
    import shutil

    for name in ("lung-ensemble", "lung-vgg19_bn", "lung-resnet50"):  # their reports, away from the check
        shutil.copytree(SHIPPED / name, tmp_path / name, ignore=shutil.ignore_patterns("*.pt"))
    # Every model's out-of-fold answers come in the order of their rows' paths, which the members share.
    ensemble = oof_answers(tmp_path / "lung-ensemble")
    vgg, resnet = ([a["state"] for a in oof_answers(tmp_path / name)] for name in ("lung-vgg19_bn", "lung-resnet50"))
    lone = [i for i, (v, r) in enumerate(zip(vgg, resnet)) if v == NOT_CHEST_CT and r != NOT_CHEST_CT]
    assert lone  # the shipped reports hold such slices
    assert all(ensemble[i]["state"] == UNLIKE_TRAINING for i in lone)
    assert not any(a["state"] == NOT_CHEST_CT for a in ensemble)
    severest = oof_answers(tmp_path / "lung-ensemble", EnsembleGate("any", "max"))
    assert all(severest[i]["state"] == NOT_CHEST_CT for i in lone)
    # Beside the shipped chest-CT check, which refused none of them out of fold, the far score says "unlike".
    if (SHIPPED / "chest-check").is_dir():
        checked = [a["state"] for a in oof_answers(SHIPPED / "lung-vgg19_bn")]
        assert all(checked[i] == UNLIKE_TRAINING for i in lone) and NOT_CHEST_CT not in checked
