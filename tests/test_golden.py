"""Golden tests: every shipped model in models/ reproduces, on fixed slices, the
calibrated probabilities stored in tests/golden/<model>.json (to 1e-3).

A change to shared preprocessing (say mean and std swapped) shifts training and
inference together, so only stored values of already-trained models notice it.
The fixed slices are deterministic phantoms, plus named real slices when
../shared/data is present (skipped otherwise). When a model is retrained, its
weights' SHA-256 no longer matches the stored one: regenerate the values with
``.venv/bin/python -m benchmarks.golden --update`` (after checking that the
change in predictions is intended).
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from benchmarks.golden import GOLDEN_DIR, UPDATE_COMMAND, golden_path, model_folders, slice_source
from ctapp.checkpoint import sha256_file
from ctapp.model_folders import WEIGHTS_FILE, load_model

FOLDERS = model_folders()


@cache
def golden(name: str) -> dict | None:
    path = GOLDEN_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


@cache
def weights_sha256(folder: Path) -> str:
    return sha256_file(folder / WEIGHTS_FILE)


@cache
def loaded(folder: Path):
    return load_model(folder)


def cases() -> list:
    out = []
    for folder in FOLDERS:
        for entry in (golden(folder.name) or {}).get("slices", []):
            marks = [pytest.mark.shared_data] if entry["source"] == "shared_data" else []
            out.append(pytest.param(folder, entry, id=f"{folder.name}-{entry['name']}", marks=marks))
    return out


@pytest.mark.skipif(not FOLDERS, reason="no shipped models in models/")
@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_golden_values_belong_to_the_shipped_weights(folder):
    record = golden(folder.name)
    assert record is not None, (
        f"{golden_path(folder)} is missing: store golden values for the new model {folder.name} with "
        f"`{UPDATE_COMMAND}`")
    actual = weights_sha256(folder)
    assert record["weights_sha256"] == actual, (
        f"models/{folder.name}/{WEIGHTS_FILE} has changed (SHA-256 {actual[:12]}..., golden values were computed "
        f"for {record['weights_sha256'][:12]}...): after retraining, regenerate the golden values with "
        f"`{UPDATE_COMMAND}` and commit tests/golden/")


def test_every_golden_file_has_a_model():
    names = {f.name for f in FOLDERS}
    stale = sorted(p.name for p in GOLDEN_DIR.glob("*.json") if p.stem not in names)
    assert not stale, f"golden values for models that are gone: {stale}; remove them with `{UPDATE_COMMAND}`"


@pytest.mark.parametrize("folder, entry", cases())
def test_shipped_model_reproduces_its_golden_probabilities(folder, entry):
    source = slice_source(entry)
    if source is None:
        pytest.skip(f"{entry['path']} is not in ../shared/data here: the real-slice golden check needs it")
    record = golden(folder.name)
    if record["weights_sha256"] != weights_sha256(folder):
        pytest.fail(f"models/{folder.name} was retrained: regenerate its golden values with `{UPDATE_COMMAND}`")
    prediction = loaded(folder).predict(source)
    expected = entry["probabilities"]
    assert set(prediction.probabilities) == set(expected)
    differences = {k: abs(prediction.probabilities[k] - v) for k, v in expected.items()}
    assert max(differences.values()) <= record["tolerance"], (
        f"{folder.name} on {entry['name']}: probabilities {prediction.probabilities} differ from the golden "
        f"{expected} by up to {max(differences.values()):.2e}. Preprocessing or inference changed what a "
        f"trained model sees; if that is intended (and the model retrained), run `{UPDATE_COMMAND}`")
    assert prediction.label == entry["label"]
