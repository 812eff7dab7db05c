"""The Python API and the predict CLI on a tiny trained model."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from synthetic import make_slice

from ctapp import CheckpointError, ImageDecodeError, decode, list_models, load_model


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model)


@pytest.fixture
def slice_png(tmp_path):
    pixels = make_slice(1, np.random.default_rng(5), size=60)
    path = tmp_path / "slice.png"
    Image.fromarray(pixels).save(path)
    return path


def test_every_input_kind_gives_the_same_prediction(model, slice_png):
    data = slice_png.read_bytes()
    image = Image.open(io.BytesIO(data))
    results = [model.predict(x) for x in (slice_png, str(slice_png), data, image, np.asarray(image))]
    first = results[0]
    assert first.label in model.class_names
    assert sum(first.probabilities.values()) == pytest.approx(1.0)
    assert first.confidence == max(first.probabilities.values())
    for other in results[1:]:
        assert other.label == first.label
        assert other.probabilities == pytest.approx(first.probabilities, abs=1e-6)


def test_probabilities_are_temperature_calibrated(model, slice_png):
    import torch

    from ctapp.preprocess import model_input

    p = model.predict(slice_png)
    x, _ = model_input(decode(slice_png).pixels, model.preprocess)
    with torch.no_grad():
        logits = model.model(x).double()
    expected = torch.softmax(logits / model.temperature, 1)[0].numpy()
    assert model.temperature != 1.0
    np.testing.assert_allclose(list(p.probabilities.values()), expected, atol=1e-6)


def test_explain_returns_a_map_at_the_image_resolution(model):
    wide = np.zeros((50, 90), np.uint8)
    wide[:, 20:70] = make_slice(0, np.random.default_rng(2), size=50)
    cam = model.explain(wide)
    assert cam.shape == (50, 90)
    assert cam.dtype == np.float32 or cam.dtype == np.float64
    assert 0.0 <= cam.min() and cam.max() <= 1.0
    # A chosen class gets its own map; none given explains the predicted class.
    maps = {name: model.explain(wide, target=name) for name in model.class_names}
    assert all(m.shape == (50, 90) for m in maps.values())
    assert not np.allclose(*maps.values(), atol=1e-3)
    np.testing.assert_array_equal(cam, maps[model.predict(wide).label])
    analysis = model.analyse(wide, method="EigenCAM")
    assert analysis.cam.shape == (50, 90) and analysis.cam_class == analysis.prediction.label


def test_analyse_prediction_equals_predict(model, slice_png):
    assert model.analyse(slice_png).prediction.probabilities == pytest.approx(
        model.predict(slice_png).probabilities, abs=1e-6)


def test_out_of_distribution_and_uncertain_flags(model):
    blank = np.full((64, 64), 255, np.uint8)
    p = model.predict(blank)
    assert p.ood_score is not None and model.ood.threshold is not None
    assert p.out_of_distribution == (p.ood_score > model.ood.threshold)
    assert p.uncertain == bool(p.reasons)


def test_ood_score_is_the_geometric_mean_of_the_keys_relative_to_validation():
    from ctapp.ood import MahalanobisOOD

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    train = {"early": rng.normal(size=(200, 8)), "late": rng.normal(size=(200, 4)) + labels[:, None] * 3}
    valid = {"early": rng.normal(size=(50, 8)), "late": rng.normal(size=(50, 4))}
    ood = MahalanobisOOD.fit(train, labels, valid, dims=4)
    assert np.median(ood.layer_scores(valid)["early"]) == pytest.approx(1.0)
    # Unusual only in the early layer (like a photograph whose late features look ordinary).
    odd = {"early": rng.normal(size=(5, 8)) + 6, "late": rng.normal(size=(5, 4))}
    scores = ood.layer_scores(odd)
    assert (scores["early"] > 5).all() and (scores["late"] < 5).all()
    np.testing.assert_allclose(ood.score(odd), np.sqrt(scores["early"] * scores["late"]), rtol=1e-9)
    np.testing.assert_allclose(ood.far_score(odd), scores["early"], rtol=1e-9)  # "not a chest CT": the worst key
    again = MahalanobisOOD.from_dict(ood.to_dict())
    assert again.combine == "geometric mean"
    np.testing.assert_allclose(again.score(odd), ood.score(odd), rtol=1e-5)
    # A detector saved before the field (or with "max") keeps the largest ratio its thresholds were fitted for.
    legacy = MahalanobisOOD.from_dict({k: v for k, v in ood.to_dict().items() if k != "combine"})
    np.testing.assert_allclose(legacy.score(odd), scores["early"], rtol=1e-5)
    np.testing.assert_allclose(legacy.far_score(odd), scores["early"], rtol=1e-5)
    with pytest.raises(CheckpointError, match="unknown out-of-distribution combination"):
        MahalanobisOOD.from_dict({**ood.to_dict(), "combine": "mean"})


def test_not_a_chest_ct_is_judged_by_the_far_score_and_unlike_training_by_the_ood_score(model):
    from ctapp.inference import CONFIDENT, NOT_CHEST_CT, UNLIKE_TRAINING

    near, far, sure = model.ood.threshold, model.ood.far_threshold, 0.999
    assert near < far
    assert model.assess(sure, near / 2, far_score=far * 2)[0] == NOT_CHEST_CT  # one stage wildly off
    assert model.assess(sure, near * 1.01, far_score=far / 2)[0] == UNLIKE_TRAINING
    assert model.assess(sure, near / 2, far_score=far / 2)[0] == CONFIDENT
    assert model.assess(sure, far * 2)[0] == NOT_CHEST_CT  # without a far score, the OOD score serves both
    assert model.assess(sure, near / 2, body_found=False, far_score=far / 2)[0] == NOT_CHEST_CT


def test_beside_a_chest_ct_check_only_the_check_calls_a_slice_not_a_chest_ct(model, monkeypatch):
    """With a check trained for the question, a far score says unlike the training images (chest CT of
    another hospital lies far from them too); a slice the check refuses is still not a chest CT."""
    from ctapp.inference import CONFIDENT, NOT_CHEST_CT, UNLIKE_TRAINING

    near, far, sure = model.ood.threshold, model.ood.far_threshold, 0.999
    monkeypatch.setattr(model, "input_check", lambda pixels: "")
    assert model.assess(sure, near / 2, far_score=far * 2)[0] == UNLIKE_TRAINING
    assert model.assess(sure, far * 2)[0] == UNLIKE_TRAINING
    assert model.assess(sure, near / 2, far_score=far / 2)[0] == CONFIDENT
    assert model.assess(sure, near / 2, body_found=False, far_score=far / 2)[0] == NOT_CHEST_CT


def test_model_ood_watches_every_backbone_stage_by_mean_spread_and_peak(model):
    from ctapp.ood import ood_feature_keys
    from ctapp.models import get_spec

    stages = get_spec(model.arch).feature_layers(model.model)
    assert len(stages) == 4 and model.feature_layers == ood_feature_keys(stages)
    assert set(model.feature_layers) == {s + suffix for s in stages for suffix in ("", ":std", ":max")}


def test_feature_capture_pools_each_stage_by_mean_spread_and_peak():
    import torch
    from torch import nn

    from ctapp.ood import FeatureCapture

    net = nn.Sequential(nn.Identity(), nn.Flatten())
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5) ** 1.5
    with FeatureCapture(net, ["0", "0:std", "0:max", "1"]) as capture:
        net(x)
    got = capture.features()
    values = x.numpy().reshape(2, 3, -1)
    np.testing.assert_allclose(got["0"].numpy(), values.mean(axis=2), rtol=1e-6)
    np.testing.assert_allclose(got["0:std"].numpy(), values.std(axis=2, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(got["0:max"].numpy(), values.max(axis=2), rtol=1e-6)
    assert got["1"].shape == (2, 60)  # a flat output is taken as it is


def test_unknown_class_and_method(model, slice_png):
    with pytest.raises(ValueError, match="unknown class"):
        model.explain(slice_png, target="zebra")
    with pytest.raises(ValueError, match="unknown CAM method"):
        model.explain(slice_png, method="magic")


def test_bad_image_raises_the_project_error(model):
    with pytest.raises(ImageDecodeError):
        model.predict(b"definitely not an image")


def test_load_model_refuses_missing_and_tampered(tmp_path, tiny_model):

    with pytest.raises(CheckpointError, match="no model here"):
        load_model(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    with open(copy / "model.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(copy)


def test_list_models_finds_model_folders(tiny_model):
    found = list_models([tiny_model.parent])
    assert [m.name for m in found] == [tiny_model.name]
    assert found[0].card["classes"] == ["alpha", "beta"]
    assert found[0].report_path.is_file()


def test_a_checkpoint_without_a_creation_time_has_an_empty_version(tmp_path):
    from ctapp.checkpoint import save_model_file
    from ctapp.models import create_model
    from ctapp.preprocess import PreprocessConfig

    meta = {"arch": "baseline", "class_names": ["a", "b"], "preprocess": PreprocessConfig(img_size=32).to_dict()}
    save_model_file(tmp_path / "bare.pt", create_model("baseline", 2), meta)
    save_model_file(tmp_path / "dated.pt", create_model("baseline", 2), {**meta, "created": "2026-11-29T18:01:02.345"})
    assert load_model(tmp_path / "bare.pt").version == ""  # shown and logged as the model's version
    assert load_model(tmp_path / "dated.pt").version == "2026-11-29T18:01:02"


def test_model_folders_are_the_shipped_ones_plus_those_the_environment_lists(monkeypatch, tmp_path):
    from ctapp.model_folders import DEFAULT_MODELS_DIR, MODELS_ENV, model_dirs

    monkeypatch.delenv(MODELS_ENV, raising=False)
    assert model_dirs() == [DEFAULT_MODELS_DIR]
    monkeypatch.setenv(MODELS_ENV, f"{tmp_path / 'a'}{os.pathsep}{os.pathsep}{tmp_path / 'b'}")
    assert model_dirs() == [DEFAULT_MODELS_DIR, tmp_path / "a", tmp_path / "b"]


def test_a_model_is_listed_by_its_cards_name_else_its_folders(tiny_model, tmp_path):
    for folder in ("named", "unnamed"):
        shutil.copytree(tiny_model, tmp_path / folder)
    card_path = tmp_path / "named" / "model_card.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "name": "Lung baseline, spring retrain"}))
    card_path = tmp_path / "unnamed" / "model_card.json"
    card_path.write_text(json.dumps({k: v for k, v in card.items() if k != "name"}))
    assert [m.name for m in list_models([tmp_path])] == ["Lung baseline, spring retrain", "unnamed"]


def test_predict_cli_reports_bad_files_and_goes_on(tiny_model, tiny_dataset, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    good = sorted((tiny_dataset / "valid" / "beta").iterdir())[:2]
    cmd = [sys.executable, "-m", "ctapp.predict", *map(str, good), str(bad), "--model", str(tiny_model), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [*map(str, good), str(bad)]
    assert all("label" in line for line in lines[:2])
    assert "not an image" in lines[2]["error"]
    ok = subprocess.run(cmd[:4] + ["--model", str(tiny_model)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ok.returncode == 0 and ok.stdout.count("\n") == 1


def test_predict_cli_help_names_the_module_and_every_kind_of_model_folder():
    from ctapp.predict import get_args_parser

    text = get_args_parser().format_help()
    assert text.startswith("usage: python -m ctapp.predict ") and "predict.py" not in text
    assert "ensemble folder (ensemble.json)" in " ".join(text.split())


def test_a_cam_fades_out_past_the_body_crop_instead_of_ending_in_a_hard_rectangle():
    from ctapp.preprocess import CAM_FADE, Geometry, cam_to_image

    # A 100 x 160 crop at (50, 100) of a 200 x 300 slice, padded to a 160-pixel square.
    geometry = Geometry(200, 300, (50, 100, 150, 260), 30, 0, 160)
    full = cam_to_image(np.ones((32, 32), np.float32), geometry)
    fade = CAM_FADE * geometry.side
    assert full[50:150, 100:260].min() == pytest.approx(1.0)  # the map itself inside the crop
    steps = max(np.abs(np.diff(full, axis=0)).max(), np.abs(np.diff(full, axis=1)).max())
    assert steps <= 1.0 / fade + 1e-6  # no edge: it was a step of 1.0 at the crop's border
    assert full[50 - 5, 180] == pytest.approx(1 - 5 / fade, abs=1e-4)
    assert full[100, 100 - int(fade) - 1] == 0 and full[0, 0] == 0


def test_an_ensemble_decodes_a_file_once_and_squares_it_once_per_preprocessing(slice_png, monkeypatch):
    import ctapp.inference
    from ctapp.inference import EnsembleModel
    from tiny_models import tiny_model

    ensemble = EnsembleModel([tiny_model(seed=0), tiny_model(seed=1)], {})
    calls = {"decode": 0, "to_square": 0}
    for name in calls:
        real = getattr(ctapp.inference, name)
        monkeypatch.setattr(ctapp.inference, name, lambda *a, real=real, name=name, **k:
                            calls.__setitem__(name, calls[name] + 1) or real(*a, **k))
    ensemble.predict(slice_png)
    assert calls == {"decode": 1, "to_square": 1}


def test_slices_answered_in_batches_are_answered_as_one_at_a_time_with_progress_in_slices():
    from ctapp.inference import EnsembleModel
    from tiny_models import tiny_model

    ensemble = EnsembleModel([tiny_model(seed=0), tiny_model(seed=1)], {})
    slices = [decode(make_slice(i % 2, np.random.default_rng(i), size=56)) for i in range(5)]
    progress = []
    batched = ensemble.classify_slices(lambda i: slices[i], 5, batch_size=2, on_progress=lambda *a: progress.append(a))
    assert progress == [(2, 5), (4, 5), (5, 5)]
    for one, many in zip((ensemble.predict(s) for s in slices), batched):
        assert one.state == many.state and one.notes == many.notes
        assert one.probabilities == pytest.approx(many.probabilities, abs=1e-5)
