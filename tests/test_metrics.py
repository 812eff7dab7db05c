"""Evaluation metrics against values computed by hand."""
import numpy as np
import pytest

from ctapp.metrics import (
    calibrated,
    evaluation_report,
    expected_calibration_error,
    few_images_note,
    fit_temperature,
    mcnemar,
    positive_class,
)


def test_binary_report_by_hand():
    # classes: covid (positive), non-covid
    y_true = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    report = evaluation_report(y_true, probs, ["covid", "non-covid"])
    # predictions: 0 0 1 1 1 0 1 -> correct: T T F T T F T
    assert report["accuracy"] == pytest.approx(5 / 7)
    assert report["confusion_matrix"] == [[2, 1], [1, 3]]
    assert report["positive_class"] == "covid"
    assert report["sensitivity"] == pytest.approx(2 / 3)
    assert report["specificity"] == pytest.approx(3 / 4)
    assert report["per_class"]["covid"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                            "f1": pytest.approx(2 / 3), "support": 3}
    # AUC for covid: P(score_pos > score_neg) over 3x4 pairs, scores .9 .8 .3 vs .2 .1 .6 .4 -> 4+4+2 of 12
    assert report["roc_auc"]["per_class"]["covid"] == pytest.approx(10 / 12)
    assert report["roc_auc"]["macro"] == pytest.approx(10 / 12)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.75) / 2)
    # Reliability: confidences .6 (right once of two), .7 (wrong), .8 and .9 (right twice each).
    assert [(b["count"], b["accuracy"]) for b in report["reliability"]] == [(2, 0.5), (1, 0.0), (2, 1.0), (2, 1.0)]
    assert [b["confidence"] for b in report["reliability"]] == pytest.approx([0.6, 0.7, 0.8, 0.9])


def test_positive_class_names():
    assert positive_class(["covid", "non-covid"]) == 0
    assert positive_class(["normal", "pneumonia"]) == 1
    assert positive_class(["cat", "dog"]) == 1


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y_true = np.array([0, 1, 0, 0])
    # bin of 0.9: accuracy 0.5, confidence 0.9 -> 0.4 x 2; bin of 0.6: accuracy 1, conf 0.6 -> 0.4 x 2
    assert expected_calibration_error(probs, y_true) == pytest.approx(0.4)


def test_multiclass_report_handles_a_missing_class():
    y_true = np.array([0, 1, 1, 0])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    report = evaluation_report(y_true, probs, ["a", "b", "c"])
    assert report["roc_auc"]["per_class"]["c"] is None
    assert report["per_class"]["c"]["support"] == 0
    assert report["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert "sensitivity" not in report


def test_temperature_recovers_the_true_one():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 4))
    true_probs = calibrated(logits, 2.5)
    y = np.array([rng.choice(4, p=p) for p in true_probs])
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.1)
    assert expected_calibration_error(calibrated(logits, fit_temperature(logits, y)), y) < \
        expected_calibration_error(calibrated(logits, 1.0), y)


def test_mcnemar():
    a = np.array([True] * 20 + [False] * 5)
    b = np.array([False] * 10 + [True] * 15)
    result = mcnemar(a, b)
    assert result["only_a_correct"] == 10 and result["only_b_correct"] == 5
    assert 0.05 < result["p_value"] < 0.5  # 10 vs 5 discordant: two-sided exact p = 0.30
    assert mcnemar(a, a)["p_value"] == 1.0


def test_selective_threshold_judges_each_slice_by_its_own_predicted_class():
    """Right or wrong is the argmax of each row against its label (here the predicted class
    alternates), and flags given as 0/1 integers count like booleans."""
    from ctapp.metrics import selective_threshold

    confidence = np.linspace(0.99, 0.60, 40)
    predicted = np.arange(40) % 2
    probs = np.where(predicted[:, None] == 0, np.column_stack([confidence, 1 - confidence]),
                     np.column_stack([1 - confidence, confidence]))
    labels = predicted.copy()
    labels[[5, 6, 7, 8]] ^= 1  # four mistakes among the ten most confident
    # Answering the top 20 holds those 4 mistakes (16/20 = 0.8); the top 40, 36/40 = 0.9.
    assert selective_threshold(probs, labels, np.zeros(40, bool), target=0.9) == pytest.approx(confidence[39])
    flags = np.zeros(40, int)
    flags[[20, 21]] = 1  # two right answers flagged: at most 34/38 < 0.9 over any 20 or more answers,
    # so the threshold with the best accuracy is taken, answering all 38 unflagged slices
    assert selective_threshold(probs, labels, flags.astype(bool), target=0.9) == pytest.approx(confidence[39])
    assert selective_threshold(probs, labels, flags, target=0.9) == pytest.approx(confidence[39])
    assert selective_threshold(probs, labels, flags.astype(bool), target=0.85) == pytest.approx(confidence[39])
    flags[[38, 39]] = 1  # now 34/36: the lowest reaching 0.9 is the 36th unflagged, rank 37
    assert selective_threshold(probs, labels, flags, target=0.9) == pytest.approx(confidence[37])


def test_selective_threshold_answers_at_least_twenty_slices_by_default():
    """A threshold never rests on fewer than ``min_answered`` (20) answers: the top 20 are all
    right, so the lowest threshold reaching 0.99 is the 20th confidence; the 21st is wrong."""
    from ctapp.metrics import selective_threshold

    confidence = np.linspace(0.99, 0.55, 30)
    probs = np.column_stack([confidence, 1 - confidence])
    labels = np.zeros(30, int)
    labels[20:] = 1  # every slice from the 21st on is wrong
    assert selective_threshold(probs, labels, np.zeros(30, bool), target=0.99) == pytest.approx(confidence[19])
    # Asking for 21 answers at least, no threshold reaches 0.99: the best over 21 or more is the 21st cut.
    assert selective_threshold(probs, labels, np.zeros(30, bool), target=0.99, min_answered=21) == \
        pytest.approx(confidence[20])


def test_selective_statement_in_plain_words():
    from ctapp.metrics import selective_statement, selective_summary

    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])
    summary = selective_summary(probs, labels, np.array([False, False, False, True]))
    assert summary == {"coverage": 0.75, "accuracy_when_confident": 1.0, "answered": 3, "images": 4,
                       "confident_mistakes": 0.0}
    assert selective_statement(summary) == ("When it answers, it was right 100% of the time; it answers 75% of "
                                            "slices (out-of-fold, 4 images).")
    none = selective_summary(probs, labels, np.ones(4, bool))
    assert none["accuracy_when_confident"] is None and none["coverage"] == 0.0
    assert selective_statement(none) == "It declined to answer every out-of-fold slice."


def test_risk_coverage_starts_with_the_single_most_confident_answer():
    from ctapp.metrics import risk_coverage

    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    curve = risk_coverage(probs, np.array([1, 1, 0]))  # the most confident (0.9) is wrong
    assert [(c["coverage"], c["accuracy"]) for c in curve] == [(1 / 3, 0.0), (2 / 3, 0.5), (1.0, 2 / 3)]
    assert [c["threshold"] for c in curve] == [0.9, 0.7, 0.6]
    assert risk_coverage(np.zeros((0, 2)), np.array([], int)) == []  # no slices, no curve


def test_a_certain_wrong_answer_costs_a_bounded_log_loss():
    """A probability of 0 for the true class counts as 1e-12 (27.6 nats), not infinity."""
    report = evaluation_report(np.array([0, 1]), np.array([[1.0, 0.0], [1.0, 0.0]]), ["a", "b"])
    assert report["log_loss"] == pytest.approx(-np.log(1e-12) / 2)


def test_a_figure_on_fewer_than_twenty_images_says_so():
    """The one note used by the cards, the reports and the dashboard; counts from numpy as well as JSON."""
    assert few_images_note(19) == few_images_note(np.int64(19)) == "fewer than 20 images: a rough figure"
    assert few_images_note(0) != ""
    assert few_images_note(20) == few_images_note(np.int64(400)) == ""
    assert few_images_note(None) == few_images_note(True) == few_images_note(3.0) == ""  # not a count
