"""Streamlit caches of the app; the only module of ``ctapp`` that imports Streamlit.

* Loaded models are resources (``st.cache_resource``): one instance per
  process, shared by every session; :class:`~ctapp.inference.LoadedModel`
  serialises its forward passes, so sharing is safe.
* Reports, model lists, training histories, predictions and Grad-CAMs are data
  (``st.cache_data``), keyed by the file's modification time so that a
  retrained model or a rewritten report is read again.
* The audit log is a resource, one per log path.
* Folder evaluations take the process-wide :func:`evaluation_slot`: one at a
  time, whoever asks.

Uploaded images are keyed by their SHA-256, never by name. Every cache that
holds images, maps or reports is bounded in entries and expires: an analysis
holds the slice, its map and (DICOM) its Hounsfield units, up to three
2048x2048 float arrays after decoding's downscale, so 16 entries are at most
~800 MB whatever the uploads.
"""
from __future__ import annotations

import csv
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from .auditlog import AuditLog, default_path
from .evaluation import predictions_path, read_predictions
from .figures import read_history
from .inference import Analysis, LoadedModel, ModelEntry, Prediction, list_models, load_model, model_dirs, model_stamp

HISTORY_FILE = "history.csv"
AUDIT_FILE = "audit.json"
TTL = "15m"  # an upload's results outlive its tab by this much at most
MAX_ANALYSES = 16
_evaluation_lock = threading.Lock()


def stamp(path: str | Path) -> float:
    """Modification time of ``path`` (0 when it does not exist): part of every cache key."""
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------- models


@st.cache_data(max_entries=16, ttl=20, show_spinner=False)
def _models(dirs: tuple[str, ...], stamps: tuple[float, ...]) -> list[ModelEntry]:
    return list_models([Path(d) for d in dirs])


def models() -> list[ModelEntry]:
    """Every model folder of the model directories (re-listed when one is added)."""
    dirs = model_dirs()
    return _models(tuple(str(d) for d in dirs), tuple(stamp(d) for d in dirs))


def models_by_task() -> dict[str, list[ModelEntry]]:
    """The models grouped by task, tasks in the order their first model is listed."""
    tasks: dict[str, list[ModelEntry]] = {}
    for entry in models():
        tasks.setdefault(entry.task, []).append(entry)
    return tasks


@st.cache_resource(max_entries=6, show_spinner="Loading the model...")
def _load_model(path: str, weights_stamp: float) -> LoadedModel:
    return load_model(path)


def loaded_model(path: str | Path) -> LoadedModel:
    """The process-wide instance of the model in folder ``path``."""
    path = Path(path).resolve()
    return _load_model(str(path), model_stamp(path))


@st.cache_data(max_entries=1024, ttl=TTL, show_spinner=False)
def _predict(path: str, weights_stamp: float, sha256: str, _data: bytes) -> Prediction:
    return _load_model(path, weights_stamp).predict(_data)


def predict(path: str | Path, sha256: str, data: bytes) -> Prediction:
    """Prediction of the model in ``path`` for uploaded file bytes with hash ``sha256``.

    Raises :class:`~ctapp.imaging.ImageDecodeError` for a file that is not a usable slice.
    """
    path = Path(path).resolve()
    return _predict(str(path), model_stamp(path), sha256, data)


@st.cache_data(max_entries=MAX_ANALYSES, ttl=TTL, show_spinner=False)
def _analyse(path: str, weights_stamp: float, sha256: str, method: str, target: str | None,
             _data: bytes) -> Analysis:
    return _load_model(path, weights_stamp).analyse(_data, target=target, method=method)


def analyse(path: str | Path, sha256: str, data: bytes, *, method: str = "Grad-CAM",
            target: str | None = None) -> Analysis:
    """Prediction plus class-activation map (``method``) for class ``target``
    (a class key; None explains the predicted class)."""
    path = Path(path).resolve()
    return _analyse(str(path), model_stamp(path), sha256, method, target, data)


# --------------------------------------------------------------------------- reports and cards


@st.cache_data(max_entries=256, ttl=TTL, show_spinner=False)
def _read_json(path: str, file_stamp: float) -> dict | None:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_json(path: str | Path) -> dict | None:
    """A JSON object file (evaluation report, audit, card); None when absent or unreadable."""
    return _read_json(str(path), stamp(path))


@st.cache_data(max_entries=64, ttl=TTL, show_spinner=False)
def _predictions(report_path: str, csv_stamp: float) -> list[dict]:
    return read_predictions(report_path)


def predictions(report_path: str | Path) -> list[dict]:
    """Per-image rows of an evaluation report (empty when it has no CSV)."""
    return _predictions(str(report_path), stamp(predictions_path(Path(report_path))))


@st.cache_data(max_entries=64, ttl=TTL, show_spinner=False)
def _history(path: str, file_stamp: float) -> list[dict]:
    try:
        return read_history(path)
    except (OSError, ValueError, csv.Error):
        return []


def history(model_folder: str | Path) -> list[dict]:
    """The model folder's training history (``history.csv``); empty when absent."""
    path = Path(model_folder) / HISTORY_FILE
    return _history(str(path), stamp(path)) if path.is_file() else []


def dataset_audit(model_folder: str | Path) -> dict | None:
    """The full dataset audit training wrote beside the model (``audit.json``)."""
    return read_json(Path(model_folder) / AUDIT_FILE)


# --------------------------------------------------------------------------- audit log


@st.cache_resource(show_spinner=False)
def _audit_log(path: str) -> AuditLog:
    return AuditLog(path)


def audit_log() -> AuditLog:
    """The diagnosis audit log at ``CTAPP_AUDIT_LOG`` (or the default path)."""
    return _audit_log(str(default_path()))


# --------------------------------------------------------------------------- folder evaluations


@contextmanager
def evaluation_slot() -> Iterator[bool]:
    """Whether this caller may run a folder evaluation now (True while it
    holds the process's only slot; False when another evaluation runs)."""
    acquired = _evaluation_lock.acquire(blocking=False)
    try:
        yield acquired
    finally:
        if acquired:
            _evaluation_lock.release()
