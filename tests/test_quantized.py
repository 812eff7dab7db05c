"""The int8 path (``ctapp.quantized``, ``training.quantize``) on a tiny model:
the calibration file round-trips, the out-of-distribution check keeps reading
the stages, and a folder without a usable file answers in fp32 with the reason."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import sample_images, tiny_network, write_model_folder

from ctapp.checkpoint import save_model_file
from ctapp.model_folders import load_model, model_stamp
from ctapp.ood import FeatureCapture, MahalanobisOOD
from ctapp.precision import INFERENCE_AMP_ENV, inference_precision
from ctapp.preprocess import PreprocessConfig, normalize, to_square
from ctapp.quantized import CALIBRATION_FILE, calibrate, read_calibration, stage_layers, write_calibration

SIZE = 48
FP32, INT8 = inference_precision("off"), inference_precision("int8")


def squares(count: int, seed: int = 0) -> torch.Tensor:
    config = PreprocessConfig(img_size=SIZE)
    return torch.stack([torch.from_numpy(to_square(pixels, config)[0])[None]
                        for pixels in sample_images(count + seed)[seed:]])


def model_folder_with_ood(folder):
    """A tiny model folder whose out-of-distribution check reads two stages."""
    model, meta = tiny_network(2, SIZE)
    config = PreprocessConfig(img_size=SIZE)
    keys = ["features.6", "features.6:max", "features.13"]
    with torch.no_grad(), FeatureCapture(model, keys) as capture:
        model(normalize(squares(24), config))
    features = {key: f.numpy() for key, f in capture.features().items()}
    ood = MahalanobisOOD.fit(features, np.arange(24) % 2, features, dims=4)
    ood.threshold, ood.far_threshold = 3.0, 30.0
    meta["ood"] = ood.to_dict()
    folder.mkdir(parents=True)
    save_model_file(folder / "model.pt", model, meta)
    return folder


def calibrated_folder(tmp_path):
    folder = model_folder_with_ood(tmp_path / "tiny")
    model = load_model(folder)
    calibration = calibrate(model.model, model.spec.head, stage_layers(model.feature_layers),
                            [normalize(squares(16, seed=30), model.preprocess)])
    write_calibration(folder, calibration)
    return folder, calibration


def answers(model, pixels):
    return [model.predict(p) for p in pixels]


def test_the_calibration_file_round_trips_and_drives_the_int8_network(tmp_path):
    folder, calibration = calibrated_folder(tmp_path)
    assert read_calibration(folder) == (calibration, "")
    assert calibration["layers"] == ["features.6", "features.13"]
    model = load_model(folder)
    pixels = sample_images(6, SIZE)
    reference = answers(model, pixels)
    model.set_precision(INT8)
    assert model.runs_int8 and model.int8_unavailable == ""
    int8 = answers(model, pixels)
    differences = [abs(a.probabilities[k] - b.probabilities[k]) for a, b in zip(reference, int8)
                   for k in a.probabilities]
    assert 0 < max(differences) < 0.1  # int8 really answered, close to fp32
    for a, b in zip(reference, int8):  # the stages reach the out-of-distribution check
        assert b.ood_score == pytest.approx(a.ood_score, rel=0.2)



def relative_logit_error(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        reference, int8 = model.model(x), model.int8_network(x)
    return float((int8 - reference).norm() / reference.norm())


def test_the_ranges_in_the_file_are_the_ones_used(tmp_path):
    folder, calibration = calibrated_folder(tmp_path)
    x = normalize(squares(6, seed=50), PreprocessConfig(img_size=SIZE))
    model = load_model(folder)
    model.set_precision(INT8)
    assert relative_logit_error(model, x) < 0.25
    # Widened a thousandfold, the grid is too coarse for these activations: the logits collapse.
    for entry in calibration["activations"].values():
        entry["range"] = [value * 1000 for value in entry["range"]]
    write_calibration(folder, calibration)
    coarse = load_model(folder)
    coarse.set_precision(INT8)
    assert relative_logit_error(coarse, x) > 0.9


def test_grad_cam_in_int8_draws_the_fp32_map_and_answers_as_predict_does(tmp_path):
    folder, _ = calibrated_folder(tmp_path)
    model = load_model(folder)
    model.set_precision(INT8)
    pixels = sample_images(3, SIZE)[2]
    analysis = model.analyse(pixels)
    shown = model.predict(pixels)
    assert analysis.prediction.probabilities == shown.probabilities and analysis.prediction.state == shown.state
    assert analysis.cam.shape == pixels.shape and analysis.cam.max() > 0


def test_a_folder_without_a_calibration_file_answers_in_fp32_and_says_why(tmp_path, caplog):
    folder = write_model_folder(tmp_path / "plain")
    model = load_model(folder)
    pixels = sample_images(3, SIZE)
    reference = answers(model, pixels)
    model.set_precision(INT8)
    assert not model.runs_int8
    assert f"plain has no {CALIBRATION_FILE}" in model.int8_unavailable and "fp32" in model.int8_unavailable
    assert model.int8_unavailable in caplog.text
    assert [a.probabilities for a in answers(model, pixels)] == [a.probabilities for a in reference]


@pytest.mark.parametrize("damage, reason", [
    (lambda c: c["activations"].popitem(), "made for another graph"),
    (lambda c: c.update(layers=["features.6"]), "the out-of-distribution check reads"),
    (lambda c: c.update(activation_range=[0, 255]), "this version uses [0, 127]"),
])
def test_a_calibration_that_does_not_fit_is_refused_with_its_reason(tmp_path, damage, reason):
    folder, calibration = calibrated_folder(tmp_path)
    damage(calibration)
    write_calibration(folder, calibration)
    model = load_model(folder)
    model.set_precision(INT8)
    assert not model.runs_int8 and reason in model.int8_unavailable


def test_an_unreadable_calibration_file_is_a_reason_not_a_crash(tmp_path):
    folder = write_model_folder(tmp_path / "broken")
    (folder / CALIBRATION_FILE).write_text("{not json", encoding="utf-8")
    model = load_model(folder)
    model.set_precision(INT8)
    assert not model.runs_int8 and "unreadable calibration file" in model.int8_unavailable


def test_int8_is_chosen_by_name_only(monkeypatch):
    assert INT8.int8 and "int8" in INT8.describe() and INT8.autocast_dtype is None
    assert not inference_precision("auto").int8 and not FP32.int8
    monkeypatch.setenv(INFERENCE_AMP_ENV, "int8")
    assert inference_precision().int8
    monkeypatch.setenv(INFERENCE_AMP_ENV, "int4")
    with pytest.raises(ValueError, match="auto, bf16, int8, off"):
        inference_precision()


def test_the_command_calibrates_a_folder_and_records_its_agreement(tmp_path, capsys):
    from training.quantize import run

    folder = model_folder_with_ood(tmp_path / "models" / "tiny")
    data = tmp_path / "data"
    rows = []
    for i, pixels in enumerate(sample_images(12, 64)):
        path = data / "source" / f"class{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        rows.append({"image": path.relative_to(data).as_posix(), "true": f"class{i % 2}"})
    with open(folder / "eval_report.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "true"])
        writer.writeheader()
        writer.writerows(rows)

    assert run([str(folder), "--data", str(data), "--calibration-slices", "8", "--quiet"]) == 0
    saved = json.loads((folder / CALIBRATION_FILE).read_text())
    assert saved["slices"] == 8 and saved["agreement"]["slices"] == 12
    assert 0 <= saved["agreement"]["state_agreement"] <= 1 and saved["agreement"]["max_abs_dp"] > 0
    assert "tiny: int8 kept the answer state of" in capsys.readouterr().out

    assert run([str(tmp_path / "models"), "--data", str(data)]) == 2
    assert "no model here" in capsys.readouterr().err


def test_a_new_calibration_file_renews_the_apps_cached_model(tmp_path):
    folder = write_model_folder(tmp_path / "plain")
    before = model_stamp(folder)
    assert before == (folder / "model.pt").stat().st_mtime
    (folder / CALIBRATION_FILE).write_text("{}", encoding="utf-8")
    os.utime(folder / CALIBRATION_FILE, (before + 10, before + 10))
    assert model_stamp(folder) == before + 10
