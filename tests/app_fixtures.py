"""Fixtures and builders for the app tests (AppTest and browser).

``app_env`` gives the app two small models of one task (the session's trained
``tiny_model`` and a copy whose validation predictions are partly flipped, so
the comparison dashboard has disagreements to show), and points the model,
audit-log, reports and data-root settings at temporary folders.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from series_synthetic import ct_slice, stored_from_hu
from synthetic import PATIENT_ID, PATIENT_NAME, make_slice  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app.py"
TASK = "Alpha / Beta"
MODEL_FILES = ("model.pt", "model_card.json", "eval_report.json", "eval_report.csv", "history.csv", "audit.json")


@dataclass
class AppEnv:
    models_dir: Path
    model_a: Path
    model_b: Path
    data: Path  # the tiny dataset (train/ and valid/ of class folders)
    audit_log: Path
    reports: Path
    env: dict[str, str]


def png_bytes(label: int = 0, seed: int = 0, size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_slice(label, np.random.default_rng(seed), size)).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(size: int = 64, seed: int = 0) -> bytes:
    """A CT DICOM slice (int16 stored values, rescale slope 1 / intercept -1024)
    with patient identifiers in its header, which the app must never show."""
    grey = make_slice(0, np.random.default_rng(seed), size).astype(np.float32) / 255.0
    hu = grey * 1500.0 - 1350.0  # air about -1350 HU, bright blobs near 0 HU
    return ct_slice(stored_from_hu(hu))


def copy_model(source: Path, target: Path, name: str) -> Path:
    target.mkdir(parents=True)
    for file in MODEL_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, target / file)
    card = json.loads((target / "model_card.json").read_text())
    card["name"] = name
    (target / "model_card.json").write_text(json.dumps(card))
    return target


def flip_predictions(model_dir: Path, every: int = 3) -> None:
    """Flip every ``every``-th validation prediction of a two-class model's per-image CSV."""
    path = model_dir / "eval_report.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((model_dir / "eval_report.json").read_text())["class_names"]
    for i, row in enumerate(rows):
        if i % every == 0:
            row["pred"] = classes[1 - classes.index(row["pred"])]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="session")
def app_env(tmp_path_factory, tiny_model, tiny_dataset) -> AppEnv:
    root = tmp_path_factory.mktemp("app")
    models = root / "models"
    model_a = copy_model(tiny_model, models / "tiny-a", "tiny-a")
    model_b = copy_model(tiny_model, models / "tiny-b", "tiny-b")
    flip_predictions(model_b)
    card = json.loads((model_b / "model_card.json").read_text())
    card["latency_ms"] = {"predict": 4.2, "predict_gradcam": 31.5, "image": "512x512", "threads": 2,
                          "machine": "x86_64"}
    (model_b / "model_card.json").write_text(json.dumps(card))
    env = {"CTAPP_MODELS_DIR": str(models), "CTAPP_AUDIT_LOG": str(root / "audit.sqlite"),
           "CTAPP_REPORTS_DIR": str(root / "reports"), "CTAPP_DATA_ROOTS": str(tiny_dataset)}
    return AppEnv(models, model_a, model_b, tiny_dataset, root / "audit.sqlite", root / "reports", env)


@pytest.fixture
def app_settings(app_env, monkeypatch) -> AppEnv:
    for key, value in app_env.env.items():
        monkeypatch.setenv(key, value)
    return app_env
