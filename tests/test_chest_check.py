"""The chest-CT check (ctapp.chest_check, trained by training.chest_check): its
training separates made-up chest slices from other images, the shipped check
refuses foreign images and passes real chest CT, a model beside a check
refuses what it refuses (with the check's reason), and a damaged check folder
gives a clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import write_model_folder

from ctapp.chest_check import CARD_FILE, CHECK_FOLDER, OUT_OF_FOLD_FILE, WEIGHTS_FILE, ChestCheckError, \
    build_network, check_beside, load_check, save_check
from ctapp.imaging import LUNG_WINDOW, decode
from ctapp.inference import NO_BODY_NOTE, NOT_CHEST_CT
from ctapp.model_folders import DEFAULT_MODELS_DIR, load_model
from ctapp.preprocess import body_box, to_square
from training.chest_check import CONFIG, TrainingSet, choose_threshold, negative_files, scores, squares_of, \
    synthetic_chest_files, train_check
from training.foreign import ct_phantom, foreign_set

SHIPPED = DEFAULT_MODELS_DIR / CHECK_FOLDER
needs_shipped = pytest.mark.skipif(not (SHIPPED / WEIGHTS_FILE).is_file(), reason="no models/chest-check here")


def test_training_separates_made_up_chest_slices_from_other_images():
    torch.set_num_threads(1)
    positives = squares_of(synthetic_chest_files(8, seed=7))
    kinds = ("document", "head_ct", "coronal_reformat", "pattern")
    negatives = {kind: squares_of(files) for kind, files in negative_files(3, seed=7, kinds=kinds).items()}
    network = train_check(TrainingSet(positives, negatives), seed=0, epochs=25)
    chest, other = scores(network, positives), scores(network, torch.cat(list(negatives.values())))
    assert chest.min() > other.max(), (chest.round(3), other.round(3))


def test_the_threshold_lies_below_every_out_of_fold_chest_slice_by_the_margin():
    # lowest 0.2: odds 0.25, over 4: 0.0625, probability 0.0625 / 1.0625
    assert choose_threshold(np.array([0.9, 0.2, 0.5])) == pytest.approx(0.0625 / 1.0625)


def _check_folder(folder, threshold: float):
    torch.manual_seed(0)
    save_check(folder, build_network(4), 4, CONFIG, threshold, {"recipe": "test"})
    return folder


def test_a_model_beside_a_check_refuses_what_it_refuses_with_its_reason(tmp_path):
    models = tmp_path / "models"
    model_folder = write_model_folder(models / "tiny")
    phantom = ct_phantom(128)
    without = load_model(model_folder)
    assert without.input_check is None and without.predict(phantom).state != NOT_CHEST_CT  # no check: opt in only
    _check_folder(models / CHECK_FOLDER, threshold=1.0)  # refuses every slice with a body
    model = load_model(model_folder)
    prediction = model.predict(phantom)
    assert prediction.state == NOT_CHEST_CT
    assert any(note.startswith("the chest-CT check finds this unlike") for note in prediction.notes)
    assert NO_BODY_NOTE not in prediction.notes
    assert model.analyse(phantom).prediction.state == NOT_CHEST_CT  # the Grad-CAM path
    png = tmp_path / "phantom.png"
    from PIL import Image

    Image.fromarray(phantom).save(png)
    files = model.score_files([png])  # the evaluation path
    assert files.states == [NOT_CHEST_CT] and files.refusals[0].startswith("the chest-CT check")
    blank = model.predict(np.zeros((64, 64), np.uint8))  # no body: the check never runs
    assert blank.state == NOT_CHEST_CT and NO_BODY_NOTE in blank.notes


def test_a_damaged_check_folder_gives_a_clear_error(tmp_path):
    folder = _check_folder(tmp_path / CHECK_FOLDER, threshold=0.5)
    assert load_check(folder).threshold == 0.5
    weights, card = folder / WEIGHTS_FILE, json.loads((folder / CARD_FILE).read_text())

    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ChestCheckError, match="SHA-256 does not match"):
        load_check(folder)

    def with_card_for_current_weights():
        from ctapp.checkpoint import sha256_file

        (folder / CARD_FILE).write_text(json.dumps({**card, "weights_sha256": sha256_file(weights)}))

    with_card_for_current_weights()
    with pytest.raises(ChestCheckError, match="not a readable checkpoint"):
        load_check(folder)
    torch.save({"format": "ctapp.model", "state_dict": {}}, weights)  # a network's checkpoint, not a check
    with_card_for_current_weights()
    with pytest.raises(ChestCheckError, match="not chest-CT check weights"):
        load_check(folder)
    torch.save({"format": "ctapp.chest_check", "width": 8, "state_dict": build_network(4).state_dict()}, weights)
    with_card_for_current_weights()
    with pytest.raises(ChestCheckError, match="a damaged chest-CT check"):
        load_check(folder)
    (folder / CARD_FILE).write_text("{not json")
    with pytest.raises(ChestCheckError, match="unreadable chest-CT check card"):
        load_check(folder)
    model_folder = write_model_folder(tmp_path / "beside")
    with pytest.raises(ChestCheckError):  # a model beside a broken check is refused, not silently unchecked
        load_model(model_folder)


@needs_shipped
@pytest.mark.parametrize("name", ["abdomen_ct/dicom_0", "pelvis_ct/dicom_1", "sagittal_reformat/at_0.5",
                                  "head_ct/dicom_2", "photo/sample_0", "radiograph/frontal_dicom"])
def test_the_shipped_check_refuses_foreign_images(name):
    check = load_check(SHIPPED)
    image = next(f for f in foreign_set() if f.name == name)
    geometry = to_square(decode(image.data, window=LUNG_WINDOW).pixels, check.config, check)[1]
    assert not geometry.body_found and geometry.refusal, name


@needs_shipped
@pytest.mark.shared_data
def test_the_shipped_check_passes_real_chest_ct_of_every_source(shared_data):
    check = check_beside(DEFAULT_MODELS_DIR / "covid-vgg19_bn")  # one instance for the directory's models
    for source in ("chest-ct-scan-images/Data/valid/normal", "sarscov2-ctscan/COVID", "covid-ct-ucsd/non-COVID",
                   "mosmed/COVID"):
        path = sorted((shared_data / source).iterdir())[0]
        assert check(decode(path, window=LUNG_WINDOW).pixels) == "", path
    model = load_model(DEFAULT_MODELS_DIR / "covid-vgg19_bn")
    assert model.input_check is check
    assert model.predict(shared_data / "sarscov2-ctscan" / "COVID" / "Covid (1).png").state != NOT_CHEST_CT


def test_a_check_folder_beside_models_is_not_listed_as_a_model(tmp_path):
    from ctapp.model_folders import list_models

    write_model_folder(tmp_path / "tiny")
    _check_folder(tmp_path / CHECK_FOLDER, threshold=0.5)
    assert [entry.name for entry in list_models([tmp_path])] == ["tiny"]


def _write_out_of_fold_member(member, far_score: float):
    """A cross-validated network's out-of-fold report: slices S/a.png (fold 0) and S/b.png (fold 1), both
    answered 'x' at 0.9, near the training images, with ``far_score``."""
    import csv

    member.mkdir(parents=True, exist_ok=True)
    fits = [{"fold": k, "temperature": 1.0, "confidence_threshold": 0.7, "ood_threshold": 2.0, "far_threshold": 10.0}
            for k in (0, 1)]
    with open(member / "eval_report.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "source", "fold", "true", "pred", "confidence", "p_x", "p_y", "ood_score",
                         "far_score", "image", "sha256"])
        for name, fold in (("a", 0), ("b", 1)):
            writer.writerow([f"{name}.png", "S", fold, "x", "x", 0.9, 0.9, 0.1, 1.0, far_score, f"S/{name}.png",
                             name])
    (member / "eval_report.json").write_text(json.dumps({"out_of_fold": True, "class_names": ["x", "y"],
                                                        "crossfit": {"per_fold": fits}}))
    return member


def test_the_gate_table_counts_what_the_check_beside_a_model_refused_out_of_fold(tmp_path):
    """benchmarks/gate.py joins the out-of-fold verdicts of the check beside a model to its out-of-fold rows
    by image."""
    from benchmarks.gate import oof_answers
    from ctapp.inference import CONFIDENT, UNLIKE_TRAINING

    beside = tmp_path / "beside"
    _check_folder(beside / CHECK_FOLDER, threshold=0.5)
    (beside / CHECK_FOLDER / OUT_OF_FOLD_FILE).write_text("image,score\nS/a.png,0.1\nS/b.png,0.9\n")
    alone = _write_out_of_fold_member(tmp_path / "alone" / "member", far_score=3.0)
    checked = _write_out_of_fold_member(beside / "member", far_score=3.0)
    assert [a["state"] for a in oof_answers(alone)] == [CONFIDENT, CONFIDENT]
    assert [a["state"] for a in oof_answers(checked)] == [NOT_CHEST_CT, CONFIDENT]
    # As in the app beside a check: a far score makes a slice unlike the training images, not "not a chest CT".
    alone = _write_out_of_fold_member(tmp_path / "alone" / "member", far_score=30.0)
    checked = _write_out_of_fold_member(beside / "member", far_score=30.0)
    assert [a["state"] for a in oof_answers(alone)] == [NOT_CHEST_CT, NOT_CHEST_CT]
    assert [a["state"] for a in oof_answers(checked)] == [NOT_CHEST_CT, UNLIKE_TRAINING]


def _ensemble_beside_a_check(models, threshold: float):
    """A two-member ensemble (tiny networks ``a`` and ``b``) loaded from ``models/ab``, beside a check."""
    for name, seed in (("a", 0), ("b", 1)):
        write_model_folder(models / name, seed=seed)
    (models / "ab").mkdir()
    (models / "ab" / "ensemble.json").write_text(json.dumps({"members": ["../a", "../b"]}))
    _check_folder(models / CHECK_FOLDER, threshold=threshold)
    return load_model(models / "ab")


def test_an_ensemble_beside_a_check_refuses_on_every_path(tmp_path):
    """Its members share the check: a series of slices, and files scored for an evaluation, are refused
    with the check's reason."""
    from PIL import Image

    ensemble = _ensemble_beside_a_check(tmp_path / "models", threshold=1.0)
    assert all(member.input_check is ensemble.members[0].input_check is not None for member in ensemble.members)
    slices = [decode(ct_phantom(96, seed)) for seed in range(3)]
    answers = ensemble.classify_slices(lambda i: slices[i], len(slices), batch_size=2)
    assert [a.state for a in answers] == [NOT_CHEST_CT] * 3
    assert all(any(note.startswith("the chest-CT check") for note in a.notes) for a in answers)
    png = tmp_path / "phantom.png"
    Image.fromarray(ct_phantom(96)).save(png)
    files = ensemble.score_files([png])
    assert files.states == [NOT_CHEST_CT] and files.refusals[0].startswith("the chest-CT check")


def test_an_ensemble_asks_a_shared_check_once_a_slice_however_its_members_square_it(tmp_path):
    from dataclasses import replace

    ensemble = _ensemble_beside_a_check(tmp_path / "models", threshold=0.5)
    check, asked = ensemble.members[0].input_check, []

    def counting(pixels, body):
        asked.append(id(pixels))
        return check(pixels, body)

    a, b = ensemble.members
    a.input_check = b.input_check = counting
    b.preprocess = replace(b.preprocess, img_size=a.preprocess.img_size + 16)
    slices = [decode(ct_phantom(96, seed)) for seed in range(3)]
    inputs = ensemble.member_inputs(slices)
    assert inputs[0][0].shape[-1] != inputs[1][0].shape[-1]  # two squarings
    assert sorted(asked) == sorted(id(s.pixels) for s in slices)  # one question a slice
    assert inputs[0][2] == inputs[1][2] == [check(s.pixels) for s in slices]


def test_the_check_squares_a_slice_in_the_body_box_to_square_found_as_if_it_had_looked_itself(tmp_path):
    """to_square hands the check the body box it found, so the check need not look for it again: the
    check's square is bit-identical to the one it makes finding the box itself, and so is its answer."""
    check = load_check(_check_folder(tmp_path / CHECK_FOLDER, threshold=0.5))
    given = []

    def asked(pixels, body):
        given.append(body)
        return check(pixels, body)

    tall = np.zeros((160, 96), np.uint8)
    tall[32:128] = ct_phantom(96, 3)
    framed = np.full((150, 150), 240, np.uint8)  # a white figure margin that body_box peels off
    framed[11:139, 11:139] = ct_phantom(128, 4)
    slices = [decode(image).pixels for image in (ct_phantom(96, 0), ct_phantom(200, 1), tall, framed)]
    for pixels in slices:
        body = body_box(pixels)
        assert body is not None and body != (0, 0, *pixels.shape)  # the check's crop leaves something out
        geometry = to_square(pixels, CONFIG, asked)[1]
        assert given[-1] == body == geometry.box
        assert torch.equal(check.square(pixels, body), check.square(pixels))
        assert geometry.refusal == check(pixels)
    assert len(given) == len(slices)
