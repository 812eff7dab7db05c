"""Calibrated confidence, pinned by hand: evaluation reports computed with the
model's temperature, and a weak answer shown as "uncertain" everywhere a user
reads it (the prediction, the results table, its CSV download, the HTML report
and the command line).

The models here have a classifier whose weights are zero, so their logits are
their bias whatever the image: every probability below is a softmax worked out
by hand (a hand-made model needs no training and no data).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctapp.checkpoint import save_model_file
from ctapp.inference import LoadedModel
from ctapp.model_folders import ModelEntry
from ctapp.models import create_model
from ctapp.preprocess import PreprocessConfig, to_square

CLASSES = ["alpha", "beta"]
DISPLAY = ["Alpha", "Beta"]
WEAK_BIAS = [0.2, 0.0]  # p(alpha) = 1 / (1 + e^-0.2) = 0.5498: below the 2-class threshold 0.75
STRONG_BIAS = [3.0, 0.0]  # p(alpha) = 1 / (1 + e^-3) = 0.9526


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def constant_net(bias: list[float]) -> torch.nn.Module:
    net = create_model("baseline", len(bias), weights="none")
    with torch.no_grad():
        net.classifier[1].weight.zero_()
        net.classifier[1].bias.copy_(torch.tensor(bias))
    return net.eval()


def meta(temperature: float = 1.0) -> dict:
    return {"arch": "baseline", "class_names": CLASSES, "display_names": DISPLAY,
            "preprocess": PreprocessConfig(img_size=32).to_dict(), "temperature": temperature, "name": "const"}


def constant_model(bias: list[float], temperature: float = 1.0) -> LoadedModel:
    return LoadedModel(constant_net(bias), meta(temperature))


def slice_pixels(seed: int = 0, shape=(40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png(path, seed: int = 0):
    Image.fromarray(slice_pixels(seed)).save(path)
    return path


# --------------------------------------------------------------------------- the prediction


def test_weak_answer_is_uncertain_with_a_low_confidence_reason():
    p = constant_model(WEAK_BIAS).predict(slice_pixels())
    assert p.label == "alpha" and p.confidence == pytest.approx(sigmoid(0.2))
    assert p.uncertain is True
    assert p.reasons == ["low confidence: the top probability 55% is below 75%"]
    assert not p.out_of_distribution


def test_confident_answer_is_not_uncertain():
    p = constant_model(STRONG_BIAS).predict(slice_pixels())
    assert p.confidence == pytest.approx(sigmoid(3.0))
    assert p.uncertain is False and p.reasons == []


def test_temperature_can_turn_a_confident_answer_uncertain():
    # logits (2, 0): 0.881 at T = 1, but 1 / (1 + e^-0.5) = 0.622 at T = 4
    assert not constant_model([2.0, 0.0]).predict(slice_pixels()).uncertain
    p = constant_model([2.0, 0.0], temperature=4.0).predict(slice_pixels())
    assert p.confidence == pytest.approx(sigmoid(0.5)) and p.uncertain


# --------------------------------------------------------------------------- table, CSV, HTML report, CLI


def _results(models: list[LoadedModel], name: str = "weak.png"):
    from pages.diagnosis import SliceResult, Upload

    upload = Upload(name, b"", "ab" * 32)
    return [SliceResult(upload, [m.predict(slice_pixels()) for m in models])]


def test_results_table_says_uncertain_and_where_it_leans():
    from pages.diagnosis import results_table

    model = constant_model(WEAK_BIAS)
    rows = results_table(_results([model]), [ModelEntry(None, "weak", {})], [model])
    # An uncertain answer carries no confidence (no confident-looking bar): its result says where it leans.
    assert rows == [{"File": "weak.png", "Result": "Uncertain (leans Alpha)", "Confidence": None,
                     "Flags": "low confidence"}]
    strong = constant_model(STRONG_BIAS)
    rows = results_table(_results([strong]), [ModelEntry(None, "strong", {})], [strong])
    assert rows[0]["Result"] == "Alpha" and rows[0]["Flags"] == ""


def test_csv_download_keeps_every_column_and_the_uncertain_state():
    from pages.diagnosis import results_table, table_csv

    weak, strong = constant_model(WEAK_BIAS), constant_model(STRONG_BIAS)
    entries = [ModelEntry(None, "weak", {}), ModelEntry(None, "strong", {})]
    text = table_csv(results_table(_results([weak, strong]), entries, [weak, strong]))
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == ["File", "weak: Result", "weak: Confidence", "strong: Result", "strong: Confidence",
                                 "Models agree", "Flags"]
    (row,) = list(reader)
    assert row["File"] == "weak.png"
    assert row["weak: Result"] == "Uncertain (leans Alpha)" and row["strong: Result"] == "Alpha"
    assert row["weak: Confidence"] == ""  # uncertain: no confidence to show
    assert float(row["strong: Confidence"]) == pytest.approx(sigmoid(3.0))
    assert row["Models agree"] == "True"
    assert row["Flags"] == "weak: low confidence"


def test_html_report_shows_the_uncertain_state_and_its_reason():
    from ctapp.report import ModelResult, slice_report

    p = constant_model(WEAK_BIAS).predict(slice_pixels())
    page = slice_report(image=slice_pixels(), results=[ModelResult("weak", "v1", p, dict(zip(CLASSES, DISPLAY)))])
    assert "Uncertain: no confident answer (most likely Alpha, 55%)." in page
    assert "<li>low confidence: the top probability 55% is below 75%</li>" in page
    assert "class='verdict flagged'" in page


def _cli(folder, image, *extra) -> str:
    from ctapp.predict import get_args_parser, main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(get_args_parser().parse_args([str(image), "--model", str(folder), *extra]))
    assert code == 0
    return out.getvalue()


def test_command_line_shows_the_uncertain_state(tmp_path):
    folder = tmp_path / "weak"
    save_model_file(folder / "model.pt", constant_net(WEAK_BIAS), meta())
    image = png(tmp_path / "slice.png")
    path, label, confidence, probabilities, *flags = _cli(folder, image).rstrip("\n").split("\t")
    assert (path, confidence, probabilities) == (str(image), "0.550", "alpha=0.550 beta=0.450")
    assert "alpha" in label  # where it leans
    shown = " ".join([label, *flags]).lower()
    assert "uncertain" in shown or "low confidence" in shown
    assert "low confidence: the top probability 55% is below 75%" in flags
    record = json.loads(_cli(folder, image, "--json"))
    assert record["uncertain"] is True and record["reasons"] == [
        "low confidence: the top probability 55% is below 75%"]
    assert record["confidence"] == pytest.approx(sigmoid(0.2))


# --------------------------------------------------------------------------- evaluation reports


def test_evaluation_report_uses_the_models_temperature(tmp_path):
    """Logits (1, 0) at T = 2: every image gets p(alpha) = 1 / (1 + e^-0.5) = 0.6225;
    with two of three images truly alpha the calibrated ECE is |2/3 - 0.6225|."""
    from ctapp.evaluation import evaluate_files

    model = constant_model([1.0, 0.0], temperature=2.0)
    paths = [png(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    report, rows = evaluate_files(model, paths, [0, 0, 1], workers=1)
    p = sigmoid(0.5)
    assert report["temperature"] == 2.0
    for row in rows:
        assert row["p_alpha"] == pytest.approx(p) and row["p_beta"] == pytest.approx(1 - p)
        assert row["confidence"] == pytest.approx(p)
    assert report["ece"] == pytest.approx(abs(2 / 3 - p))
    assert report["ece_uncalibrated"] == pytest.approx(abs(2 / 3 - sigmoid(1.0)))
    assert report["log_loss"] == pytest.approx(-(2 * math.log(p) + math.log(1 - p)) / 3)
    assert report["model"] == model.name
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="^no readable images to evaluate$"):
        evaluate_files(model, [tmp_path / "broken.png"], [0], workers=1)


def test_training_writes_its_validation_report_with_the_fitted_temperature(tiny_model):
    """The shipped report's per-image probabilities equal softmax(logits / T),
    the logits computed here from the raw network on images decoded by hand."""
    from ctapp.checkpoint import load_model_file
    from ctapp.evaluation import read_predictions

    net, saved = load_model_file(tiny_model / "model.pt")
    temperature = saved["temperature"]
    assert temperature != pytest.approx(1.0, abs=1e-3)
    report = json.loads((tiny_model / "eval_report.json").read_text())
    assert report["temperature"] == pytest.approx(temperature)
    config = PreprocessConfig.from_dict(saved["preprocess"])
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    rows = read_predictions(tiny_model / "eval_report.json")
    assert rows
    for row in rows[:6]:
        path = Path(report["data"]) / row["path"]  # rows name files under the report's data root
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
        assert grey.shape == (config.img_size, config.img_size)  # square at the input size: no resizing
        # The body crop and intensity standardisation (pinned in test_pinned_preprocess and
        # test_crossval) come from the shared function; the normalisation and the temperature here.
        square, _ = to_square(grey, config)
        x = (torch.from_numpy(square)[None, None].expand(1, 3, -1, -1) - mean) / std
        with torch.no_grad():
            logits = net(x).double()[0]
        expected = torch.softmax(logits / temperature, 0).numpy()
        got = [float(row[f"p_{name}"]) for name in saved["class_names"]]
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_temperature_fit_recovers_a_temperature_below_one():
    """An under-confident model needs T < 1 (sharpening): labels drawn from
    softmax(logits / 0.5) must give back T = 0.5."""
    from ctapp.metrics import calibrated, fit_temperature

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in calibrated(logits, 0.5)])
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.1)
