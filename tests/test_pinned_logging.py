"""What the server writes about an upload: its SHA-256, never its file name (a
file name often carries a patient's name or ID). Pins the server log lines of a
failed classification or explanation and the rows of the diagnosis audit log."""
from __future__ import annotations

import hashlib
import logging
import sqlite3

import pytest

from ctapp.inference import Prediction
from ctapp.model_folders import ModelEntry
from ctapp.store import Store

NAME = "Doe_Jane_1951-02-03_PID778899.png"
DATA = b"not really a slice, the model is stubbed"
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def diagnosis():
    import pages.diagnosis

    return pages.diagnosis


def _upload(diagnosis):
    (upload,) = diagnosis.read_uploads([type("F", (), {"name": NAME, "getvalue": lambda self: DATA})()])
    assert upload.sha256 == SHA  # computed here by hashlib, independently of the page
    return upload


def _assert_hash_not_name(records: list[logging.LogRecord]) -> None:
    assert records, "nothing was logged"
    for record in records:
        text = record.getMessage() + (record.exc_text or "")
        assert SHA in record.getMessage()
        assert NAME not in text and "PID778899" not in text and "Doe_Jane" not in text


def test_server_log_of_a_failed_classification_names_the_hash_not_the_file(diagnosis, monkeypatch, caplog):
    def broken(path, sha256, data):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(diagnosis.ui_cache, "predict", broken)
    with caplog.at_level(logging.ERROR, logger=diagnosis.log.name):
        (result,) = diagnosis.classify([_upload(diagnosis)], [ModelEntry(None, "m", {})])
    assert "could not be analysed" in result.error
    _assert_hash_not_name([r for r in caplog.records if r.name == diagnosis.log.name])


def test_server_log_of_a_failed_explanation_names_the_hash_not_the_file(diagnosis, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("Grad-CAM exploded")

    monkeypatch.setattr(diagnosis, "explain", broken)
    result = diagnosis.SliceResult(_upload(diagnosis))
    with caplog.at_level(logging.ERROR, logger=diagnosis.log.name):
        diagnosis.show_detail(result, [], [], "Grad-CAM", "", 0.4)  # outside a Streamlit run: elements are no-ops
    _assert_hash_not_name([r for r in caplog.records if r.name == diagnosis.log.name])


def test_audit_log_rows_hold_the_uploads_hash_never_its_name(diagnosis, monkeypatch, tmp_path):
    log = Store(tmp_path / "audit.sqlite")
    monkeypatch.setattr(diagnosis.ui_cache, "audit_log", lambda: log)
    prediction = Prediction("alpha", "Alpha", {"alpha": 0.55, "beta": 0.45}, 0.55, True, False, None,
                            ["low confidence: the top probability 55% is below 75%"])
    model = type("Model", (), {"name": "tiny", "version": "2024-01-01T00:00:00"})()
    result = diagnosis.SliceResult(_upload(diagnosis), [prediction])
    assert diagnosis.record_diagnoses([result], [ModelEntry(tmp_path, "tiny", {})], [model], set()) == 1
    log.close()
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        rows = db.execute("SELECT * FROM diagnoses").fetchall()
    (row,) = rows
    assert SHA in row
    assert not any(NAME in str(v) or "Doe_Jane" in str(v) or "PID778899" in str(v) for v in row)
