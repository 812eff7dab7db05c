"""The app's hot paths (issue 26 follow-up): an evaluation reads each file
once, an ensemble decodes each file once for all its members, and a failed
series read or classification is not kept for the next request."""
from __future__ import annotations

import builtins
import hashlib
import io
import os

import numpy as np
import pytest
from app_fixtures import png_bytes
from PIL import Image
from tiny_models import sample_images, tiny_network

import ctapp.inference
import ctapp.preprocess
from ctapp.evaluation import evaluate_files
from ctapp.inference import NOT_CHEST_CT, EnsembleModel, LoadedModel
from ctapp.preprocess import PreprocessConfig


@pytest.fixture
def slice_files(tmp_path):
    """Four readable PNG slices, a blank one (no body) and a file that is not an image."""
    paths = []
    for i, image in enumerate(sample_images(4)):
        paths.append(tmp_path / f"s{i}.png")
        Image.fromarray(image).save(paths[-1])
    paths.append(tmp_path / "blank.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(paths[-1])
    paths.append(tmp_path / "notes.png")
    paths[-1].write_bytes(b"not an image at all")
    return paths


def count_opens(monkeypatch, paths) -> dict[str, int]:
    """Opens of each of ``paths`` from now on, whichever way a file is opened."""
    names = {os.fspath(p): 0 for p in paths}
    real = io.open

    def counting(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) in names:
            names[os.fspath(file)] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting)
    monkeypatch.setattr(builtins, "open", counting)
    return names


def test_an_evaluation_reads_each_file_once_and_names_it_by_the_bytes_it_scored(slice_files, monkeypatch):
    model = LoadedModel(*tiny_network())
    opens = count_opens(monkeypatch, slice_files)
    report, rows = evaluate_files(model, slice_files, [0, 1, 0, 1, 0, 1], workers=1,
                                  image_roots=[slice_files[0].parent])
    assert opens == {os.fspath(p): 1 for p in slice_files}
    assert list(report["unreadable"]) == [os.fspath(slice_files[-1])]
    assert report["unreadable"][os.fspath(slice_files[-1])].startswith("notes.png: ")  # named by the file, not 'upload'
    monkeypatch.undo()
    assert [row["sha256"] for row in rows] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in slice_files[:-1]]
    assert [row["image"] for row in rows] == [p.name for p in slice_files[:-1]]


def members_of_two_preprocessings() -> list[LoadedModel]:
    """Two members that square a slice differently (size, body crop, equalisation)."""
    first = tiny_network(seed=0)
    network, meta = tiny_network(img_size=64, seed=7)
    meta["preprocess"] = PreprocessConfig(img_size=64, crop="body", intensity="equalise").to_dict()
    return [LoadedModel(*first), LoadedModel(network, meta)]


def test_an_ensemble_decodes_each_file_once_and_answers_as_its_members_one_by_one(slice_files, monkeypatch):
    model = EnsembleModel(members_of_two_preprocessings(), {"confidence_threshold": 0.6})
    member_by_member = model.combine([m.score_files(slice_files, workers=1) for m in model.members])
    decoded = []
    for module in (ctapp.inference, ctapp.preprocess):
        real = module.decode
        monkeypatch.setattr(module, "decode", lambda source, *a, _real=real, **kw: decoded.append(source)
                            or _real(source, *a, **kw))
    scores = model.score_files(slice_files, workers=1)
    assert sorted(map(str, decoded)) == sorted(map(str, slice_files))
    for name in ("probs", "raw_probs", "ood_scores"):
        np.testing.assert_array_equal(getattr(scores, name), getattr(member_by_member, name), err_msg=name)
    for name in ("states", "reasons", "errors", "digests", "body_found"):
        assert getattr(scores, name) == getattr(member_by_member, name), name
    assert scores.states[4] == NOT_CHEST_CT and scores.errors[5] and not any(scores.errors[:5])


# --------------------------------------------------------------------------- caches of the series viewer


def test_a_failed_series_read_is_read_again_and_a_good_one_is_not(monkeypatch):
    from ctapp import ui_cache
    from ctapp.volumes import Input

    reads = []
    real = ui_cache.read_inputs
    monkeypatch.setattr(ui_cache, "read_inputs", lambda inputs: reads.append(len(inputs)) or real(inputs))
    broken = [Input("cut.png", png_bytes(seed=3)[:100])]
    for _ in range(2):
        assert ui_cache.read_series(broken).errors
    assert reads == [1, 1]
    good = [Input("whole.png", png_bytes(seed=3))]
    for _ in range(2):
        result = ui_cache.read_series(good)
        assert not result.errors and len(result.images) == 1
    assert reads == [1, 1, 1]


def test_a_failed_series_classification_is_handed_out_once_more_then_started_anew(tmp_path, monkeypatch):
    from ctapp import ui_cache

    started = []

    class FailedRun:
        finished = failed = True

        def __init__(self, model, series):
            started.append(series)

    monkeypatch.setattr(ui_cache, "BackgroundClassification", FailedRun)
    monkeypatch.setattr(ui_cache, "_load_model", lambda path, stamp: None)
    series = type("SeriesOfOneDigest", (), {"digest": "a series whose classification fails"})()
    first = ui_cache.series_classification(tmp_path, series)
    assert first.failed and started == [series]
    again = ui_cache.series_classification(tmp_path, series)
    assert again is not first and started == [series, series]
