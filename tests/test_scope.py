"""The scope check (ctapp.scope): a model withholds a confident answer where
another model sees a finding it was not trained for, on every path that
answers, and only there."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_models import write_model_folder

from ctapp.checkpoint import CheckpointError
from ctapp.imaging import decode
from ctapp.inference import CONFIDENT, LOW_CONFIDENCE, OTHER_FINDING, BatchScores, score_files_read_once
from ctapp.model_folders import load_model, model_stamp
from ctapp.scope import SCOPE_FILE, ScopeRule, restate, rule_file
from training.foreign import ct_phantom
from training.scope import choose_threshold, file_key


def _rule(min_probability: float, model: str = "../finding", finding: str = "class1") -> ScopeRule:
    return ScopeRule(model, finding, min_probability, "pneumonia", "tumour subtypes")


def _models(tmp_path, min_probability: float, ensemble: bool = False):
    models = tmp_path / "models"
    write_model_folder(models / "finding", seed=5)
    for name, seed in (("a", 0), ("b", 1)):
        write_model_folder(models / name, num_classes=3, seed=seed)
    scoped = models / "a"
    if ensemble:
        scoped = models / "ab"
        scoped.mkdir()
        (scoped / "ensemble.json").write_text(json.dumps({"members": ["../a", "../b"]}))
    (scoped / SCOPE_FILE).write_text(rule_file(_rule(min_probability), {"statement": "test"}))
    return scoped


def _answering(model, threshold: float = 0.0):
    """Every answer confident (an untrained model's are not), so the rule has answers to withhold."""
    model.confidence_threshold = threshold
    return model


SLICES = [decode(ct_phantom(96, seed)) for seed in range(3)]


@pytest.mark.parametrize("ensemble", [False, True])
def test_a_confident_answer_the_finding_model_overrules_is_withheld_on_every_path(tmp_path, ensemble):
    scoped = _models(tmp_path, 0.0, ensemble)
    model = _answering(load_model(scoped))
    assert model.scope is not None and all(m.scope is None for m in model.members if m is not model)
    answer = model.predict(SLICES[0])
    assert answer.state == OTHER_FINDING and answer.uncertain and not answer.out_of_distribution
    assert "pneumonia" in answer.reasons[0] and "tumour subtypes" in answer.reasons[0]
    assert [p.state for p in model.classify_slices(lambda i: SLICES[i], 3, batch_size=2)] == [OTHER_FINDING] * 3
    assert model.analyse(SLICES[1]).prediction.state == OTHER_FINDING
    png = tmp_path / "slice.png"
    Image.fromarray(ct_phantom(96, 2)).save(png)
    assert score_files_read_once(model, [png], workers=1)[0].states == [OTHER_FINDING]  # evaluation reports
    # The networks' own scores, and the model loaded without its scope, answer as before.
    assert model.score_files([png]).states == [CONFIDENT]
    assert _answering(load_model(scoped, scoped=False)).predict(SLICES[0]).state == CONFIDENT


def test_below_the_rules_probability_the_answer_stands_and_uncertain_answers_are_not_asked(tmp_path):
    model = _answering(load_model(_models(tmp_path, 1.01)))
    asked = []
    ask = model.scope.finding_probability
    model.scope.finding_probability = lambda slices: asked.append(len(slices)) or ask(slices)
    assert [p.state for p in model.classify_slices(lambda i: SLICES[i], 3)] == [CONFIDENT] * 3
    assert asked == [3]
    model.confidence_threshold = 1.01  # nothing confident: nothing to withhold, the finding model is not run
    assert [p.state for p in model.classify_slices(lambda i: SLICES[i], 3)] == [LOW_CONFIDENCE] * 3
    assert asked == [3, 0]


def test_restate_turns_only_confident_answers_at_or_above_the_threshold():
    n = 4
    scores = BatchScores(np.full((n, 2), 0.5), np.full((n, 2), 0.5), np.zeros(n),
                         [CONFIDENT, CONFIDENT, LOW_CONFIDENCE, CONFIDENT], [[], [], ["low"], []])
    out = restate(scores, np.array([0.7, 0.69, 0.9, np.nan]), _rule(0.7))
    assert out.states == [OTHER_FINDING, CONFIDENT, LOW_CONFIDENCE, CONFIDENT]
    assert out.reasons[0][0].startswith("another finding") and out.reasons[2] == ["low"]
    assert scores.states[0] == CONFIDENT  # the input is left as it was


def test_a_scope_rule_that_cannot_be_used_is_a_clear_error(tmp_path):
    scoped = _models(tmp_path, 0.5)
    (scoped / SCOPE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable scope rule"):
        load_model(scoped)
    (scoped / SCOPE_FILE).write_text(rule_file(_rule(0.5, model="../nowhere"), {}))
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_model(scoped)
    (scoped / SCOPE_FILE).write_text(rule_file(_rule(0.5, finding="pneumonia"), {}))
    with pytest.raises(CheckpointError, match="has no class 'pneumonia'"):
        load_model(scoped)


def test_a_new_scope_rule_changes_the_models_cache_key(tmp_path):
    scoped = _models(tmp_path, 0.5)
    before = model_stamp(scoped)
    (scoped / SCOPE_FILE).write_text(rule_file(_rule(0.9), {}))
    import os
    os.utime(scoped / SCOPE_FILE, (before + 10, before + 10))
    assert model_stamp(scoped) == before + 10


def test_the_threshold_withholds_at_most_the_budget_of_confident_answers():
    probability = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.99])
    confident = np.array([True] * 9 + [False])  # the unconfident 0.99 does not count
    for budget, withheld in ((0.0, 0), (0.1, 0), (0.12, 1), (0.25, 2), (0.5, 4)):
        t = choose_threshold(probability, confident, budget)
        assert int((probability[confident] >= t).sum()) == withheld
    with pytest.raises(ValueError, match="answered none of its out-of-fold slices confidently"):
        choose_threshold(probability, np.zeros(10, bool), 0.5)


def test_report_rows_written_elsewhere_match_files_by_source_class_and_name():
    assert file_key("../shared/data/covid-ct-ucsd/COVID/x.png") == file_key("/data/covid-ct-ucsd/COVID/x.png")
    assert file_key("a/COVID/x.png") != file_key("a/non-COVID/x.png")


def _slice_answer(state: str, label: str = "normal") -> "Prediction":
    from ctapp.inference import Prediction

    probabilities = {"cancer": 0.05, "normal": 0.05, label: 0.9}
    return Prediction(label, label.title(), probabilities, 0.9, state != CONFIDENT, False, None, state=state)


def test_a_series_mostly_of_another_finding_has_no_result_and_a_minority_is_still_named():
    from ctapp.series import SeriesPredictions, summarise

    classes = ["cancer", "normal"]
    mostly = [_slice_answer(OTHER_FINDING)] * 8 + [_slice_answer(CONFIDENT, "cancer")] * 3
    summary = summarise("s", SeriesPredictions(mostly, classes, ["Cancer", "Normal"]))
    assert summary.outcome == "no result" and summary.uncertain_by_state[OTHER_FINDING] == 8
    assert summary.verdict == ("No result: only 3 of 11 slices were answered confidently (8 uncertain: another "
                               "finding 8); the series is not judged")
    some = [_slice_answer(CONFIDENT)] * 7 + [_slice_answer(OTHER_FINDING)] * 3
    summary = summarise("s", SeriesPredictions(some, classes, ["Cancer", "Normal"]), rule_only=True)
    assert summary.outcome == "no finding" and summary.verdict.endswith(
        "another finding on 3 slices, which this model was not trained for (see the slices' reasons)")
    few = [_slice_answer(CONFIDENT)] * 8 + [_slice_answer(OTHER_FINDING)] * 2
    assert "another finding" not in summarise("s", SeriesPredictions(few, classes, ["Cancer", "Normal"])).verdict


def _out_of_fold_report(folder, classes: list[str], files: list, source: str, seed: int) -> None:
    """A cross-validated network's out-of-fold rows for ``files`` (two folds, true class the first, random
    probabilities), every answer near the training images and above its fold's confidence threshold of 0."""
    import csv

    rng = np.random.default_rng(seed)
    fits = [{"fold": k, "temperature": 1.0, "confidence_threshold": 0.0, "ood_threshold": 2.0,
             "far_threshold": 10.0} for k in (0, 1)]
    with open(folder / "eval_report.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "source", "fold", "true", *[f"p_{c}" for c in classes], "ood_score", "far_score"])
        for i, path in enumerate(files):
            p = rng.dirichlet(np.ones(len(classes)))
            writer.writerow([str(path), source, i % 2, classes[0], *p, 1.0, 1.0])
    (folder / "eval_report.json").write_text(json.dumps({"out_of_fold": True, "class_names": classes,
                                                         "crossfit": {"per_fold": fits}}))


def test_training_scope_chooses_the_threshold_out_of_fold_and_the_app_uses_its_rule(tmp_path):
    """The rule withholds at most the budget of the scoped model's confident out-of-fold answers; the finding
    model's probabilities come from its out-of-fold rows where it trained on the source, fresh elsewhere."""
    from training.scope import get_args_parser, main

    def slices(folder, count, first_seed):
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(ct_phantom(64, first_seed + i)).save(folder / f"{i + 1}.png")
        return sorted(folder.iterdir())

    data, models = tmp_path / "data", tmp_path / "models"
    own = slices(data / "lung" / "tumour", 10, 0)
    trained = slices(data / "sarscov2-ctscan" / "COVID", 12, 100)
    unseen = slices(data / "elsewhere" / "COVID", 3, 200)
    scoped, finding = write_model_folder(models / "lung", num_classes=3), write_model_folder(models / "covid", seed=5)
    _out_of_fold_report(scoped, ["tumour", "class1", "class2"], [p.relative_to(data / "lung") for p in own], "lung", 0)
    _out_of_fold_report(finding, ["class0", "class1"], trained, "sarscov2-ctscan", 1)
    args = get_args_parser().parse_args([
        "--model", str(scoped), "--data", str(data / "lung"), "--finding-model", str(finding), "--finding", "class1",
        "--says", "pneumonia", "--scope", "tumours", "--finding-data", str(data / "sarscov2-ctscan"),
        str(data / "elsewhere"), "--finding-class", "COVID", "--budget", "0.3"])
    result = main(args)
    assert result["rule"].model == "../covid" and result["finding_probabilities"] == {
        "out_of_fold": 12, "fresh": 3, "left_out": 0}
    mine = result["own_out_of_fold"]
    assert mine["before"]["answered"] == 10 and mine["withheld"] == 3  # floor(0.3 * 10)
    written = json.loads((scoped / SCOPE_FILE).read_text())
    assert written["rule"]["min_probability"] == result["rule"].min_probability
    assert set(written["finding_slices"]) == {"sarscov2-ctscan", "elsewhere"}
    assert written["series"]["sarscov2-ctscan"]["before"]["series"] == 1  # 12 numbered slices: one pseudo-series
    model = load_model(scoped)
    assert model.scope.rule == result["rule"] and model.scope.model.name == "covid"
    from ctapp import figures

    sentence, rows = figures.scope_summary(written)
    assert "This model is for tumours. Where covid gives pneumonia a probability of" in sentence
    assert [row["Slices"] for row in rows] == ["this model's own, out of fold", "pneumonia: elsewhere",
                                               "pneumonia: sarscov2-ctscan"]
    assert rows[0]["Answered (before -> with the rule)"] == "10 -> 7"
    assert figures.scope_summary(None) == ("", []) and figures.scope_summary({"rule": {}}) == ("", [])
