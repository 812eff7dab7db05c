"""The app's hot paths (issue 26 follow-up): an evaluation reads each file
once, an ensemble decodes each file once for all its members, a failed series
read or classification is not kept for the next request, the model card shows
the int8 agreement, and a batch's slice shown in detail runs each network once."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os

import numpy as np
import pytest
from app_fixtures import APP, TASK, app_env, app_settings, png_bytes  # noqa: F401
from PIL import Image
from streamlit.testing.v1 import AppTest
from tiny_models import sample_images, tiny_network

import ctapp.inference
import ctapp.preprocess
from ctapp.evaluation import evaluate_files
from ctapp.inference import NOT_CHEST_CT, EnsembleModel, LoadedModel
from ctapp.model_folders import DEFAULT_MODELS_DIR
from ctapp.preprocess import PreprocessConfig

TIMEOUT = 120  # seconds per script run: the CPU is shared with a training job


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


def test_a_series_read_that_found_nothing_is_read_again_and_others_are_not(monkeypatch):
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
    partial = [Input("whole.png", png_bytes(seed=4)), Input("cut.png", png_bytes(seed=3)[:100])]
    for _ in range(2):  # a stray bad file among good ones: kept, errors and all, not read on every rerun
        result = ui_cache.read_series(partial)
        assert len(result.errors) == 1 and len(result.images) == 1
    assert reads == [1, 1, 1, 2]


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


# --------------------------------------------------------------------------- pages


def run_page(at: AppTest) -> AppTest:
    at = at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def page_text(at: AppTest) -> str:
    parts = [str(element.value) for kind in ("markdown", "caption", "info", "warning", "error")
             for element in getattr(at, kind)]
    return "\n".join(parts + [frame.value.to_string() for frame in [*at.dataframe, *at.table]])


SHIPPED = DEFAULT_MODELS_DIR / "covid-ensemble"  # the path the page lists it under


def test_the_int8_agreement_is_read_from_the_calibration_file():
    from ctapp import figures

    assert figures.int8_agreement(None) == {} and figures.int8_agreement({"layers": ["layer1"]}) == {}
    recorded = {"agreement": {"slices": 600, "state_agreement": 0.9333, "label_agreement": 0.985,
                              "p99_abs_dp": 0.0853, "max_abs_dp": 0.1212, "states_changed": {"a -> b": 4},
                              "date": "2026-12-06", "measured_by": "python -m training.quantize"}}
    assert figures.int8_agreement(recorded) == {
        "Slices compared": "600", "Answer state kept": "93.3%", "Label kept": "98.5%",
        "|Δp|, 99th percentile": "0.085", "|Δp|, largest": "0.121", "States changed": "a -> b: 4",
        "Measured": "2026-12-06, python -m training.quantize"}
    assert "CTAPP_INFERENCE_AMP=int8" in figures.INT8_OPT_IN


@pytest.mark.skipif(not (SHIPPED / "quantization.json").is_file(), reason="the shipped covid-ensemble is absent")
def test_the_model_card_shows_the_int8_agreement_and_that_int8_is_opt_in(app_settings):
    recorded = json.loads((SHIPPED / "quantization.json").read_text())["agreement"]
    at = run_page(AppTest.from_file(str(APP), default_timeout=TIMEOUT))
    at = run_page(at.switch_page("pages/model_card.py"))
    text = page_text(run_page(at.selectbox(key="card_model").set_value(str(SHIPPED))))
    assert "int8 against fp32" in text and "CTAPP_INFERENCE_AMP=int8" in text
    for figure in (f"{recorded['state_agreement']:.1%}", f"{recorded['label_agreement']:.1%}",
                   f"{recorded['p99_abs_dp']:.3f}"):
        assert figure in text, figure
    at = run_page(at.selectbox(key="card_model").set_value(str(app_settings.model_a)))
    assert "int8 against fp32" not in page_text(at)  # a model without a calibration file


def test_the_chest_ct_check_is_summed_up_from_its_card():
    from ctapp import figures

    assert figures.chest_check_summary(None) == ("", []) and figures.chest_check_summary({"figures": {}}) == ("", [])
    card = {"threshold": 0.0148, "figures": {
        "out_of_fold": {"lung": {"slices": 600, "refused": 0.0}, "covid": {"slices": 400, "refused": 0.005}},
        "foreign_set": {"head_ct": {"images": 5, "refused_by_check": 1.0}},
        "leave_one_kind_out": {"head_ct": {"images": 5, "refused_by_check": 0.2}}}}
    sentence, rows = figures.chest_check_summary(card)
    assert "below a score of 1.5%" in sentence and "refused 2 of 1,000 chest CT slices" in sentence
    assert rows == [
        {"Images": "chest CT, out of fold: lung", "Count": 600, "Refused": "0.0%",
         "Refused, kind left out of training": None},
        {"Images": "chest CT, out of fold: covid", "Count": 400, "Refused": "0.5%",
         "Refused, kind left out of training": None},
        {"Images": "foreign: head_ct", "Count": 5, "Refused": "100%", "Refused, kind left out of training": "20%"}]


@pytest.mark.skipif(not (SHIPPED.parent / "chest-check" / "chest_check.json").is_file(),
                    reason="the shipped chest-CT check is absent")
def test_the_model_card_shows_the_chest_ct_check_beside_the_model(app_settings):
    at = run_page(AppTest.from_file(str(APP), default_timeout=TIMEOUT))
    at = run_page(at.switch_page("pages/model_card.py"))
    at = run_page(at.selectbox(key="card_model").set_value(str(SHIPPED)))
    text = page_text(at)
    assert "Chest-CT check" in text and "python -m training.chest_check" in text
    assert "foreign: head_ct" in text and "chest CT, out of fold: mosmed" in text
    at = run_page(at.selectbox(key="card_model").set_value(str(app_settings.model_a)))
    assert "Chest-CT check" not in page_text(at)  # a model with no check beside it


def test_a_batchs_slice_shown_in_detail_runs_each_network_once(app_settings, monkeypatch):
    """The slice shown in detail (the first that reads, then the one picked)
    gets its prediction from its map's pass; the others are predicted only."""
    calls = []
    for name in ("predict", "analyse"):
        real = getattr(LoadedModel, name)
        monkeypatch.setattr(LoadedModel, name, lambda self, image, *args, _name=name, _real=real, **kw:
                            calls.append((_name, hashlib.sha256(image).hexdigest())) or _real(self, image, *args, **kw))
    at = run_page(AppTest.from_file(str(APP), default_timeout=TIMEOUT))
    if at.selectbox(key="task").value != TASK:
        at = run_page(at.selectbox(key="task").set_value(TASK))
    files = [("cut.png", png_bytes(seed=71)[:120]), ("first.png", png_bytes(seed=72)),
             ("second.png", png_bytes(label=1, seed=73))]
    cut, first, second = (hashlib.sha256(data).hexdigest() for _, data in files)
    at = run_page(at.file_uploader(key="uploads").set_value([(name, data, "image/png") for name, data in files]))
    # cut.png is tried first for the detail and refused by its decoder, before any network runs.
    assert sorted(calls) == sorted([("analyse", cut), ("analyse", first), ("predict", second)])
    assert len(at.image) == 2  # the slice and its map
    calls.clear()
    at = run_page(at.selectbox(key="detail_slice").set_value("second.png"))
    # first.png keeps the answer of its map's pass (cached); only second.png's map is drawn (cut.png is decoded
    # again and refused).
    assert sorted(calls) == sorted([("predict", cut), ("analyse", second)])
    assert len(at.image) == 2
