"""training.series_check: pseudo-series from out-of-fold rows, the app's answer
state per slice and series-level sensitivity and specificity."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ctapp.data import file_number
from ctapp.evaluation import read_predictions
from training import series_check
from training.series_check import SECTION, out_of_fold_predictions, pseudo_series

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["covid", "non-covid"]
FOLD_FIT = {"temperature": 1.0, "confidence_threshold": 0.8, "ood_threshold": 2.0, "far_threshold": 9.0}


def test_pseudo_series_never_straddle_folds_classes_or_blocks():
    # Folds change every 10 file numbers, blocks every 20: each block is cut in two by the folds.
    items = [(f"{folder}{n}", truth, (n // 10) % 3, Path(f"src/{folder}/Slice ({n}).png"))
             for folder, truth in (("COVID", "covid"), ("non-COVID", "non-covid")) for n in range(60)]
    items.append(("no-number", "covid", 0, Path("src/COVID/scan.png")))
    fold_of = {key: fold for key, _, fold, _ in items}
    truth_of = {key: truth for key, truth, _, _ in items}
    series, left_out = pseudo_series(items, block=20, min_slices=5)
    assert len(series) == 12 and left_out == 1
    for s in series:
        numbers = [file_number(Path(k)) for k in s.keys]
        assert {fold_of[k] for k in s.keys} == {s.fold} and {truth_of[k] for k in s.keys} == {s.truth}
        assert len({n // 20 for n in numbers}) == 1 and numbers == sorted(numbers) and len(numbers) == 10
    assert sorted(k for s in series for k in s.keys) == sorted(k for k in fold_of if k != "no-number")
    _, short = pseudo_series(items, block=20, min_slices=11)
    assert short == len(items)  # every piece is shorter than 11: all left out


def _row(folder: str, number: int, fold: int, p_covid: float, ood: float = 0.5, source: str = "sarscov2-ctscan"):
    truth = "covid" if folder == "COVID" else "non-covid"
    return {"path": f"../shared/data/{source}/{folder}/Covid ({number}).png", "source": source, "fold": fold,
            "true": truth, "pred": "covid" if p_covid >= 0.5 else "non-covid", "confidence": max(p_covid, 1 - p_covid),
            "p_covid": p_covid, "p_non-covid": 1 - p_covid, "ood_score": ood, "far_score": ood, "uncertain": "",
            "image": "", "sha256": f"{folder}-{source}-{number:04d}"}


def _series(folder: str, start: int, fold: int, answers: list[tuple[int, float]], ood: float = 0.5) -> list[dict]:
    """Twenty slices from ``start``: ``answers`` as (how many, p_covid), in order."""
    ps = [p for k, p in answers for _ in range(k)]
    assert len(ps) == 20
    return [_row(folder, start + i, fold, p, ood) for i, p in enumerate(ps)]


def _model_folder(tmp_path: Path) -> Path:
    """A cross-validated model's folder holding out-of-fold rows of six SARS-CoV-2
    pseudo-series (block 20) and a UCSD slice, which must be ignored."""
    rows = (_series("COVID", 20, 0, [(15, 0.95), (5, 0.05)])  # COVID found
            + _series("COVID", 40, 1, [(20, 0.05)])  # confidently non-COVID: reads as reassurance
            + _series("COVID", 60, 0, [(5, 0.95), (15, 0.55)])  # mostly low confidence: no result
            + _series("non-COVID", 20, 1, [(20, 0.02)])  # cleared
            + _series("non-COVID", 40, 0, [(10, 0.97), (10, 0.03)])  # false alarm
            + _series("non-COVID", 60, 2, [(20, 0.03)], ood=5.0)  # unlike the training images: no result
            + [_row("COVID", 7, 2, 0.99, source="covid-ct-ucsd")])
    folder = tmp_path / "covid-net"
    folder.mkdir()
    report = {"out_of_fold": True, "class_names": CLASSES, "display_names": ["COVID", "Non-COVID"],
              "positive_class": "covid", "crossfit": {"per_fold": [{"fold": k, **FOLD_FIT} for k in range(3)]}}
    (folder / "eval_report.json").write_text(json.dumps(report))
    (folder / "model_card.json").write_text(json.dumps({"name": "covid-net", "classes": CLASSES,
                                                             "display_names": ["COVID", "Non-COVID"]}))
    with open(folder / "eval_report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_series_level_counts_on_hand_made_out_of_fold_rows(tmp_path):
    folder = _model_folder(tmp_path)
    section = series_check.out_of_fold_section(folder, block=20, min_slices=10)
    assert section["series"] == 6 and section["slices"] == 120 and section["slices_left_out"] == 0
    assert section["counts"] == {"covid": {"finding": 1, "no finding": 1, "no result": 1},
                                 "non-covid": {"finding": 1, "no finding": 1, "no result": 1}}
    assert section["sensitivity"] == 0.5 and section["specificity"] == 0.5
    assert section["no_result"] == {"positive": 1, "negative": 1} and section["reassuring_on_positive"] == 1
    assert [s["series"] for s in section["reassuring_series"]] == ["covid 40-59 fold 1"]
    # The card's evidence is the rule alone, which reassured that series, so the shipped gate withholds the verdict;
    # the app's figures take fold 1's gate from folds 0 and 2, which reassured none: a gate that saw its own
    # evidence would have hidden this series.
    assert section["rule_alone"]["reassuring_on_positive"] == 1 and section["no_finding_withheld"]
    assert section["per_fold"]["0"]["counts"] == {"covid": {"finding": 1, "no finding": 0, "no result": 1},
                                                  "non-covid": {"finding": 1, "no finding": 0, "no result": 0}}
    assert section["per_fold"]["1"]["sensitivity"] == 0.0 and section["per_fold"]["1"]["specificity"] == 1.0
    assert section["per_fold"]["2"]["sensitivity"] is None  # no COVID series held out by fold 2


def test_a_mostly_low_confidence_pseudo_series_gets_no_result(tmp_path):
    _, _, rows, predictions = out_of_fold_predictions(_model_folder(tmp_path))
    series, _ = pseudo_series([(k, r["true"], int(r["fold"]), Path(r["path"])) for k, r in rows.items()], 20, 10)
    summaries = dict((s.id, summary) for s, summary in series_check.summaries_of(
        series, predictions, CLASSES, ["COVID", "Non-COVID"]))
    unanswered = summaries["covid 60-79 fold 0"]
    assert unanswered.outcome == "no result" and unanswered.answered == 5
    assert unanswered.uncertain_by_state["low confidence"] == 15
    assert summaries["non-COVID 60-79 fold 2".replace("non-COVID", "non-covid")].uncertain_by_state[
        "unlike the training images"] == 20


def test_the_command_writes_the_section_into_card_and_report_and_keeps_the_rest(tmp_path, capsys):
    folder = _model_folder(tmp_path)
    assert series_check.run(["--model", str(folder), "--block", "20"]) == 0
    assert "sensitivity (COVID) 50%" in capsys.readouterr().out
    card, report = (json.loads((folder / name).read_text()) for name in ("model_card.json", "eval_report.json"))
    assert card["name"] == "covid-net" and report["crossfit"]["per_fold"][0]["confidence_threshold"] == 0.8
    assert card[SECTION]["out_of_fold"] == report[SECTION]["out_of_fold"]
    assert card[SECTION]["out_of_fold"]["reassuring_on_positive"] == 1 and "rule" in card[SECTION]
    assert series_check.run(["--model", str(tmp_path / "nowhere")]) == 2


def test_the_model_card_page_shows_each_series_check(tmp_path):
    from pages.model_card import series_checks

    folder = _model_folder(tmp_path)
    assert series_check.run(["--model", str(folder), "--block", "20"]) == 0
    card = json.loads((folder / "model_card.json").read_text())
    [(title, statement, rows)] = series_checks(card)
    assert title == "Held-out pseudo-series, out of fold" and "specificity 50%" in statement
    assert "one block of 20 consecutive numbers" in statement
    assert rows == [{"Series of": "COVID", "Finding reported": 1, "No finding class reached": 1, "No result": 1},
                    {"Series of": "Non-COVID", "Finding reported": 1, "No finding class reached": 1, "No result": 1}]
    assert series_checks({"classes": CLASSES}) == []


def _unflagged(folder: Path) -> set[str]:
    """Rows whose scores are within both out-of-distribution thresholds of their fold."""
    fits = {f["fold"]: f for f in json.loads((folder / "eval_report.json").read_text())["crossfit"]["per_fold"]}
    return {row["path"] for row in read_predictions(folder / "eval_report.json")
            if float(row["ood_score"]) <= fits[int(row["fold"])]["ood_threshold"]
            and float(row["far_score"]) <= fits[int(row["fold"])]["far_threshold"]}


@pytest.mark.parametrize("name, members", [("covid-resnet50", []), ("covid-vgg19_bn", []),
                                           ("covid-ensemble", ["covid-resnet50", "covid-vgg19_bn"])])
def test_rebuilt_out_of_fold_answers_are_the_recorded_ones(name, members):
    """A network's states and an ensemble's probabilities are what training
    recorded; an ensemble's states too wherever no member flagged the slice
    (elsewhere they follow the app's current gate, not the one of the recording)."""
    folder = REPO / "models" / name
    if not (folder / "eval_report.csv").is_file():
        pytest.skip(f"{folder} is not shipped here")
    recorded = {row["path"]: row for row in read_predictions(folder / "eval_report.json")}
    _, _, _, predictions = out_of_fold_predictions(folder)
    assert predictions.keys() == recorded.keys()
    unflagged = set.intersection(*[_unflagged(REPO / "models" / m) for m in members]) if members else set(recorded)
    assert len(unflagged) > 0.8 * len(recorded)
    for key, row in recorded.items():
        assert predictions[key].confidence == pytest.approx(float(row["confidence"]), abs=1e-9)
        if key in unflagged:
            assert predictions[key].uncertain == (row["uncertain"] == "True")
            assert predictions[key].state == row.get("state", predictions[key].state)
