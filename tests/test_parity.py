"""The fast path gives the answers of a plain fp32 pass, for every shipped model,
and so does the opt-in int8 path, within its own stated tolerance.

The fast path (``ctapp.precision.inference_precision``): bf16 autocast where the
CPU has native bf16 kernels, channels_last, slices batched and squared once for
all members of an ensemble. The reference: fp32, contiguous, one slice at a
time. On a fixed set of generated slices (CT-like phantoms and images that are
not chest CT) both give the same answer state, and probabilities within
:data:`TOLERANCE` of each other; int8 (``ctapp.quantized``) within
:data:`INT8_TOLERANCE`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from ctapp.model_folders import DEFAULT_MODELS_DIR, list_models, load_model
from ctapp.precision import FP32, Precision, cpu_has_fast_bf16, inference_precision
from ctapp.quantized import CALIBRATION_FILE
from training.foreign import foreign_images

# Largest difference of any class probability from the fp32 reference, by the fast
# path's arithmetic, measured on the shipped members (benchmarks/latency.py --parity):
# fp32 batched in channels_last differed from one contiguous slice at a time by at most
# 7e-7 on these slices; bf16 autocast (forced, on 10 real and 5 generated slices per
# member) by 0.003-0.004, 0.030 for lung-resnet50, out-of-distribution scores by at most
# 1.8%, and no answer state changed. The bounds leave room above those figures.
TOLERANCE = {None: 1e-4, torch.bfloat16: 0.05}

# int8 (opt-in) moves probabilities further: on these slices by at most 0.092
# (lung-resnet50), 0.028-0.056 for the others (benchmarks/latency.py --parity); on
# the training-source slices each quantization.json records, by up to 0.37.
INT8_TOLERANCE = 0.15
# Where int8 changes an answer state on these slices (a reason it is not the default).
INT8_STATE_CHANGES = {"lung-resnet50": "phantom 0: confident in fp32, low confidence in int8"}
# A precision may be the default only where it keeps the fp32 answer state on this
# share of every shipped model's training-source slices.
DEFAULT_STATE_AGREEMENT = 0.99

SHIPPED = [entry.path for entry in list_models([DEFAULT_MODELS_DIR])]


def phantom(seed: int, size: int = 160) -> np.ndarray:
    """A CT-like slice through a lung window: a body outline, two lungs of
    random size, vessels and a nodule or two, scanner noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = ((x - 0.5) / rng.uniform(0.38, 0.46)) ** 2 + ((y - 0.5) / rng.uniform(0.3, 0.4)) ** 2 < 1
    width, height = rng.uniform(0.09, 0.14), rng.uniform(0.18, 0.25)
    lungs = (((x - 0.32) / width) ** 2 + ((y - 0.5) / height) ** 2 < 1) | \
        (((x - 0.68) / width) ** 2 + ((y - 0.5) / height) ** 2 < 1)
    grey = np.where(body, 0.55, 0.0) - np.where(lungs, 0.45, 0.0)
    for _ in range(rng.integers(1, 3)):
        cy, cx, r = rng.uniform(0.35, 0.65), rng.choice([0.32, 0.68]) + rng.uniform(-0.04, 0.04), rng.uniform(0.01, 0.04)
        grey = np.where((x - cx) ** 2 + (y - cy) ** 2 < r ** 2, 0.5, grey)
    grey = grey + 0.08 * np.sin(x * rng.uniform(40, 80)) * lungs + rng.normal(0, 0.02, grey.shape)
    return (np.clip(grey, 0, 1) * 255).astype(np.uint8)


def parity_slices() -> list[np.ndarray]:
    others = foreign_images(128, seed=3)
    return [phantom(seed) for seed in range(4)] + [others["photo"], others["abdomen_ct_like"]]


def compare(model, precision: Precision, slices: list[np.ndarray]) -> tuple[float, list]:
    """Largest probability difference of the fast path at ``precision`` from the
    fp32 reference, and the slices whose state differs (index, reference, fast)."""
    decoded = [model._decode(pixels) for pixels in slices]
    model.set_precision(FP32)
    reference = [model.predict(image) for image in decoded]
    model.set_precision(precision)
    fast = model.classify_slices(lambda i: decoded[i], len(decoded), batch_size=len(decoded))
    difference = max(abs(a.probabilities[k] - b.probabilities[k]) for a, b in zip(reference, fast)
                     for k in a.probabilities)
    changed = [(i, a.state, b.state) for i, (a, b) in enumerate(zip(reference, fast)) if a.state != b.state]
    return difference, changed


@pytest.fixture(scope="module")
def slices() -> list[np.ndarray]:
    return parity_slices()


def test_the_shipped_models_are_all_checked():
    names = {path.name for path in SHIPPED}
    assert {"lung-ensemble", "covid-ensemble"} <= names and len(names) >= 6


@pytest.mark.slow
@pytest.mark.parametrize("folder", SHIPPED, ids=lambda path: path.name)
def test_the_fast_path_answers_as_fp32_does(folder, slices):
    precision = inference_precision()
    assert precision.channels_last
    difference, changed = compare(load_model(folder), precision, slices)
    assert changed == []
    assert difference <= TOLERANCE[precision.autocast_dtype], precision.describe()


def test_the_reference_is_what_it_claims():
    """The reference really is fp32 one slice at a time, and a bf16 pass on a tiny
    model differs from it by more than fp32 rounding (else the test could not tell)."""
    model = tiny_model(2, 48)
    assert FP32.autocast_dtype is None and not FP32.channels_last
    pixels = [phantom(seed, 48) for seed in range(3)]
    difference, _ = compare(model, Precision(torch.device("cpu"), torch.bfloat16), pixels)
    assert 1e-4 < difference <= TOLERANCE[torch.bfloat16]


def test_grad_cam_runs_on_the_fast_path_and_agrees_with_its_prediction():
    """Under bf16 autocast the CAM layer is read in fp32 (NumPy has no bf16): the
    map is drawn, and the analysis answers as predict does at that precision."""
    model = tiny_model(2, 48)
    model.set_precision(Precision(torch.device("cpu"), torch.bfloat16))
    pixels = phantom(7, 60)
    analysis = model.analyse(pixels)
    assert analysis.cam.shape == (60, 60) and np.isfinite(analysis.cam).all() and analysis.cam.max() > 0
    shown = model.predict(pixels)
    assert analysis.prediction.state == shown.state and analysis.prediction.label == shown.label
    assert analysis.prediction.probabilities == pytest.approx(shown.probabilities, abs=TOLERANCE[torch.bfloat16])


def recorded_agreement(folder) -> dict:
    return json.loads((folder / CALIBRATION_FILE).read_text(encoding="utf-8"))["agreement"]


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda path: path.name)
def test_every_shipped_model_records_how_int8_agrees_with_fp32(folder):
    figures = recorded_agreement(folder)
    assert figures["slices"] >= 500 and 0.5 < figures["state_agreement"] <= 1
    assert 0 < figures["p99_abs_dp"] <= figures["max_abs_dp"] < 1


def test_int8_is_the_default_only_where_every_shipped_model_keeps_its_answers():
    """The rule behind ``inference_precision("auto")``: int8 would be the default
    without fast bf16 only if every shipped model kept the fp32 answer state on
    99% of its training-source slices; the recorded figures say whether it does."""
    keeps = all(recorded_agreement(folder)["state_agreement"] >= DEFAULT_STATE_AGREEMENT for folder in SHIPPED)
    assert inference_precision("auto").int8 == (keeps and not cpu_has_fast_bf16())


@pytest.mark.slow
@pytest.mark.parametrize("folder", [
    pytest.param(path, marks=pytest.mark.xfail(reason=INT8_STATE_CHANGES[path.name], strict=True))
    if path.name in INT8_STATE_CHANGES else path for path in SHIPPED], ids=lambda path: path.name)
def test_int8_answers_as_fp32_does(folder, slices):
    model = load_model(folder)
    difference, changed = compare(model, inference_precision("int8"), slices)
    assert [member.int8_unavailable for member in model.members if member.int8_unavailable] == []
    assert changed == []
    assert difference <= INT8_TOLERANCE
