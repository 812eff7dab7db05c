"""``training.fit --cv`` and what reads its output, run in this process (fast,
and visible to mutation testing): every figure of the report is recomputed here
from the per-image rows or from the fold models by another route, so a fault in
the out-of-fold bookkeeping, the cross-fitted calibration, the per-fold and
per-source breakdowns, the ensemble, ``training.evaluate`` or
``training.audit`` changes a number these tests check."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score
from synthetic import write_classes

from ctapp.checkpoint import load_model_file
from ctapp.metrics import calibrated, fit_temperature, selective_statement
from ctapp.model_folders import load_model

CLASSES = ["alpha_stage_T1", "beta"]
# --augment medium: the level these figures were pinned with (fit's default before it became detail).
COMMON = ["--cv", "3", "--arch", "baseline", "--img-size", "32", "--batch-size", "8", "--workers", "1",
          "--weight-storage", "fp32", "--split-block", "4", "--augment", "medium", "--quiet"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two sources (one with train / valid / test splits and a copy across them,
    one of class folders only), and two runs on the same folds."""
    import training.crossval
    from training.fit import run

    root = tmp_path_factory.mktemp("cv")
    first, second = root / "first", root / "second"
    write_classes(first / "train", CLASSES, 10, size=40)
    write_classes(first / "valid", ["alpha", "beta"], 4, seed=1, size=40, start=100)
    write_classes(first / "test", ["alpha", "beta"], 3, seed=2, size=40, start=200)
    Image.open(first / "train" / "beta" / "beta (3).png").save(first / "valid" / "beta" / "copy of 3.png")
    write_classes(second, ["alpha", "beta"], 6, seed=3, size=40, start=300)
    data = ["--data", str(first), str(second)]
    a, b = root / "run-a", root / "run-b"
    trained = []  # what run-a's training saw: (run, its training images, its held-out images)
    real = training.crossval.train_model

    def spy(setup, out, train_images, train_labels, valid_images, valid_labels, **kwargs):
        trained.append((out.name, train_images.clone(), valid_images.clone()))
        return real(setup, out, train_images, train_labels, valid_images, valid_labels, **kwargs)

    training.crossval.train_model = spy
    try:
        with contextlib.redirect_stderr(io.StringIO()) as log:
            assert run([*data, *COMMON, "--epochs", "2", "--out", str(a)]) == 0
    finally:
        training.crossval.train_model = real
    assert run([*data, *COMMON, "--epochs", "1", "--lr", "0.003", "--out", str(b)]) == 0
    return {"first": first, "second": second, "a": a, "b": b, "root": root, "trained": trained,
            "log_a": log.getvalue()}


def test_every_labelled_image_gets_one_prediction_from_the_fold_model_that_never_saw_it(runs):
    out = runs["a"]
    rows, folds = read_rows(out / "eval_report.csv"), read_rows(out / "cv" / "folds.csv")
    labelled = {str(p) for p in runs["first"].glob("train/*/*.png")} | {str(p) for p in runs["first"].glob("valid/*/*.png")} \
        | {str(p) for p in runs["second"].glob("*/*.png")}
    assert len(labelled) == 20 + 9 + 12
    named = [r["path"] for r in rows]
    assert len(named) == len(set(named)) == 40  # the copy in valid is kept once, the test split never
    assert not any("test" in Path(p).parts or "copy of" in p for p in named)
    assert sorted(named) == sorted(r["path"] for r in folds)
    fold_of = {r["path"]: r["fold"] for r in folds}
    assert all(r["fold"] == fold_of[r["path"]] for r in rows)
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    # Blocks of 4 consecutive numbers of one class folder of one source stay in one fold.
    blocks: dict[tuple, set] = {}
    for r in folds:
        number = int(re.search(r"\((\d+)\)", r["path"]).group(1))
        blocks.setdefault((r["source"], r["class"], number // 4), set()).add(r["fold"])
    assert all(len(f) == 1 for f in blocks.values()) and len(blocks) > 3
    said = re.search(r"cross-validation: 3 folds of (\d+), (\d+), (\d+) images, (\d+) groups kept whole\n",
                     runs["log_a"])
    assert said and [int(n) for n in said.groups()[:3]] == [sum(r["fold"] == k for r in folds) for k in "012"]

    # The fold model with the calibration fitted on the other folds gives each row's answer again.
    models = {k: load_model(out / "cv" / f"fold-{k}" / "calibrated.pt") for k in "012"}
    for r in rows[::4]:
        assert str(stored(runs, r["path"])) in labelled
        shown = models[r["fold"]].predict(stored(runs, r["path"]))
        assert shown.probabilities["beta"] == pytest.approx(float(r["p_beta"]), abs=1e-4)
        assert shown.uncertain == (r["uncertain"] == "True")


def test_the_run_says_in_how_many_slices_the_body_crop_found_no_body(runs):
    from ctapp.imaging import decode
    from ctapp.preprocess import model_input

    config = load_model(runs["a"]).preprocess
    assert config.crop == "body"
    paths = [r["path"] for r in read_rows(runs["a"] / "eval_report.csv")]
    without = sum(not model_input(decode(stored(runs, p)).pixels, config)[1].body_found for p in paths)
    assert f"body crop: no body found in {without} of 40 slices (left uncropped)" in runs["log_a"]


def test_each_fold_model_trains_on_the_other_folds_only_and_the_shipped_one_on_all(runs):
    def pixels(images) -> set[bytes]:
        return {image.numpy().tobytes() for image in images}

    assert [name for name, *_ in runs["trained"]] == ["fold-0", "fold-1", "fold-2", "full"]
    held_out = [pixels(held) for _, _, held in runs["trained"][:3]]
    everything = set().union(*held_out)
    assert len(everything) == 40 == sum(map(len, held_out))  # the folds cut the 40 images apart
    for (name, train, _), held in zip(runs["trained"], held_out):
        assert pixels(train) == everything - held, name
        _, meta = load_model_file(runs["a"] / "cv" / name / "model.pt")
        assert meta["images_trained"] == len(train) == 40 - len(held) and meta["cv_run"] == name
        assert meta["train_seconds"] > 0 and meta["epoch"] == 2
    _, shipped = load_model_file(runs["a"] / "model.pt")
    report = json.loads((runs["a"] / "eval_report.json").read_text())
    assert shipped["metrics"]["out_of_fold"] is True and shipped["metrics"]["accuracy"] == report["accuracy"]
    _, train, held = runs["trained"][3]
    assert pixels(train) == everything and len(held) == 0


def test_calibration_of_each_fold_and_of_the_shipped_model_comes_from_out_of_fold_logits(runs):
    out = runs["a"]
    rows = read_rows(out / "eval_report.csv")
    report = json.loads((out / "eval_report.json").read_text())
    labels = np.array([r["true"] == "beta" for r in rows], int)
    folds = np.array([int(r["fold"]) for r in rows])
    # Raw logits up to a constant per row, from each fold's network as trained (temperature 1).
    logits = np.zeros((len(rows), 2))
    for k in range(3):
        raw = load_model(out / "cv" / f"fold-{k}" / "model.pt")
        held = np.flatnonzero(folds == k)
        scores = raw.score_files([stored(runs, rows[i]["path"]) for i in held], workers=1)
        logits[held] = np.log(scores.raw_probs)
    shipped = load_model(out)
    assert shipped.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert report["temperature"] == pytest.approx(shipped.temperature)
    ood = np.array([float(r["ood_score"]) for r in rows])
    far = np.array([float(r["far_score"]) for r in rows])
    assert (far >= ood - 1e-9).all()  # the worst stage is never below the geometric mean of all
    for fitted in report["crossfit"]["per_fold"]:
        rest = folds != fitted["fold"]
        assert fitted["temperature"] == pytest.approx(fit_temperature(logits[rest], labels[rest]), rel=1e-3)
        # Out-of-distribution thresholds from the other folds' scores: the near one from the geometric
        # means (95% quantile), the far one from the worst stages (2 x the 99% quantile).
        assert fitted["ood_threshold"] == pytest.approx(np.quantile(ood[rest], 0.95), rel=1e-6)
        assert fitted["far_threshold"] == pytest.approx(2 * np.quantile(far[rest], 0.99), rel=1e-6)


def stored(runs: dict, path: str) -> Path:
    """A row's image: pooled sources are named relative to their common parent."""
    assert (runs["root"] / path).is_file(), path
    return runs["root"] / path


def test_out_of_fold_figures_per_fold_and_per_source_are_those_of_the_rows(runs):
    out = runs["a"]
    rows = read_rows(out / "eval_report.csv")
    report = json.loads((out / "eval_report.json").read_text())
    card = json.loads((out / "model_card.json").read_text())

    def figures(subset: list[dict]) -> dict:
        true, pred = [r["true"] for r in subset], [r["pred"] for r in subset]
        answered = [r for r in subset if r["uncertain"] == "False"]
        return {"images": len(subset), "accuracy": accuracy_score(true, pred),
                "macro_f1": f1_score(true, pred, average="macro"), "coverage": len(answered) / len(subset),
                "accuracy_when_confident": (np.mean([r["true"] == r["pred"] for r in answered])
                                            if answered else None)}

    whole = figures(rows)
    for key, value in whole.items():
        assert report[key] == pytest.approx(value), key
        assert card["validation"][key] == pytest.approx(value), key
    per_fold = {k: figures([r for r in rows if r["fold"] == k]) for k in "012"}
    for k, expected in per_fold.items():
        for key, value in expected.items():
            assert report["per_fold"][k][key] == pytest.approx(value), (k, key)
    accuracies = [per_fold[k]["accuracy"] for k in "012"]
    spread = report["fold_spread"]["accuracy"]
    assert spread["mean"] == pytest.approx(np.mean(accuracies))
    assert spread["std"] == pytest.approx(np.std(accuracies, ddof=1)) and spread["folds"] == 3
    sources = sorted({r["source"] for r in rows})
    assert len(sources) == 2 and sorted(report["per_source"]) == sources
    for source in sources:
        expected = figures([r for r in rows if r["source"] == source])
        for key, value in expected.items():
            assert report["per_source"][source][key] == pytest.approx(value), (source, key)
    supports = {c: sum(r["true"] == c for r in rows) for c in ("alpha", "beta")}
    assert supports == {"alpha": 20, "beta": 20}  # 20 images: just enough not to be marked as rough
    for c, n in supports.items():
        assert report["per_class"][c]["support"] == n and "note" not in report["per_class"][c]
    subsets = [*report["per_fold"].values(), *report["per_source"].values()]
    assert sorted(row["images"] for row in report["per_source"].values()) == [12, 28]
    assert all(("fewer than 20 images" in row.get("note", "")) == (row["images"] < 20) for row in subsets)
    assert card["cross_validation"]["fold_sizes"] == [sum(r["fold"] == k for r in rows) for k in "012"]
    for key in ("roc_auc", "per_class", "sensitivity", "specificity", "positive_class", "fold_spread", "per_source"):
        assert card["validation"][key] == report[key], key


def test_no_fold_keeps_the_epoch_its_held_out_images_liked_best(runs):
    from training.trainer import BEST_FILE, STATE_FILE

    folds = sorted((runs["a"] / "cv").glob("fold-*"))
    assert len(folds) == 3
    for fold in folds:
        assert not (fold / BEST_FILE).exists(), fold
        history = read_rows(fold / "history.csv")
        assert len(history) == 2  # the fixed schedule, all of it
    for finished in [*folds, runs["a"] / "cv" / "full"]:  # its model.pt written, its checkpoint dropped
        assert (finished / "model.pt").is_file() and not (finished / STATE_FILE).exists(), finished


def test_an_ensemble_of_two_runs_averages_their_out_of_fold_rows(runs, capsys):
    from training.card import card_figures
    from training.ensemble import run as make_ensemble

    out = runs["root"] / "ensembles" / "ab"  # a folder whose parent does not exist yet
    capsys.readouterr()
    assert make_ensemble(["--members", str(runs["a"]), str(runs["b"]), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.startswith(f"{out}: out-of-fold accuracy ")
    a = {r["path"]: r for r in read_rows(runs["a"] / "eval_report.csv")}
    b = {r["path"]: r for r in read_rows(runs["b"] / "eval_report.csv")}
    rows = read_rows(out / "eval_report.csv")
    assert sorted(r["path"] for r in rows) == sorted(a)
    report = json.loads((out / "eval_report.json").read_text())
    # Each row: the members' mean, tempered by a temperature fitted on the other folds' means only.
    paths = sorted(a)
    mean = np.array([[(float(a[p][f"p_{c}"]) + float(b[p][f"p_{c}"])) / 2 for c in ("alpha", "beta")] for p in paths])
    labels = np.array([("alpha", "beta").index(a[p]["true"]) for p in paths])
    fold = np.array([a[p]["fold"] for p in paths])
    by_path = {r["path"]: r for r in rows}
    temperatures = {str(f["fold"]): f["temperature"] for f in report["crossfit"]["per_fold"]}
    for k in "012":
        expected = fit_temperature(np.log(mean[fold != k]), labels[fold != k])
        assert temperatures[k] == pytest.approx(expected, rel=1e-3)
        for p, row in zip(np.array(paths)[fold == k], calibrated(np.log(mean[fold == k]), expected)):
            assert float(by_path[p]["p_beta"]) == pytest.approx(row[1], abs=1e-4)
            assert by_path[p]["fold"] == k
    assert len(set(temperatures.values())) == 3  # fitted per fold, not once on all
    assert report["temperature"] == pytest.approx(fit_temperature(np.log(mean), labels), rel=1e-3)
    assert np.abs(mean[:, 1] - np.array([float(a[p]["p_beta"]) for p in paths])).max() > 1e-3  # two networks
    assert report["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in rows]))
    assert [r["source"] for r in rows] == [a[r["path"]]["source"] for r in rows]
    for source, figures in report["per_source"].items():  # each source's own figures, from its rows
        mine = [r for r in rows if r["source"] == source]
        assert figures["images"] == len(mine) and figures["accuracy"] == pytest.approx(
            np.mean([r["true"] == r["pred"] for r in mine]))
    assert sorted(report["per_source"]) == sorted({r["source"] for r in rows}) and len(report["per_source"]) == 2
    # The risk-coverage curve of the rows, recounted: the most confident k answered, k = 1 .. n.
    ranked = sorted(rows, key=lambda r: -float(r["confidence"]))
    for point in report["risk_coverage"]:
        answered = ranked[:round(point["coverage"] * len(rows))]
        assert point["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in answered]))
    assert report["risk_coverage"][-1]["coverage"] == 1.0
    created = datetime.fromisoformat(report["created"])
    assert timedelta(0) <= datetime.now(timezone.utc) - created < timedelta(minutes=10)
    thresholds = {str(f["fold"]): f["confidence_threshold"] for f in report["crossfit"]["per_fold"]}
    fitted = [{str(f["fold"]): f for f in json.loads((runs[m] / "eval_report.json").read_text())["crossfit"]
               ["per_fold"]} for m in ("a", "b")]
    flagged_by_a_member = 0
    for r in rows:  # flagged by either member, or below its fold's threshold (fitted on the other folds): uncertain
        member_rows = [(m[r["path"]], f[r["fold"]]) for m, f in zip((a, b), fitted)]
        far = any(float(row["far_score"]) > f["far_threshold"] for row, f in member_rows)
        unlike = far or any(float(row["ood_score"]) > f["ood_threshold"] for row, f in member_rows)
        flagged_by_a_member += unlike
        low = float(r["confidence"]) < thresholds[r["fold"]]
        assert (r["uncertain"] == "True") == (unlike or low), r
        assert r["state"] == ("not a chest CT" if far else "unlike the training images" if unlike else
                              "low confidence" if low else "confident")
    assert flagged_by_a_member and report["ood_flagged"] == pytest.approx(flagged_by_a_member / len(rows))
    card = json.loads((out / "model_card.json").read_text())
    assert card["members"] == ["run-a", "run-b"]
    assert report["split"] == "out-of-fold (3-fold cross-validation), mean of 2 members" and report["folds"] == 3
    accuracies = [report["per_fold"][k]["accuracy"] for k in "012"]
    assert report["fold_spread"]["accuracy"] == {"mean": pytest.approx(np.mean(accuracies)),
                                                 "std": pytest.approx(np.std(accuracies, ddof=1)), "folds": 3}
    assert (report["class_names"], report["display_names"]) == (["alpha", "beta"], ["Alpha", "Beta"])
    assert list(report["per_class"]) == ["alpha", "beta"]
    def compared(r: dict) -> dict:  # a row of the card's comparison, read from that model's own report
        return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "ece": r["ece"],
                "roc_auc_macro": r["roc_auc"]["macro"], "coverage": r["coverage"],
                "accuracy_when_confident": r["accuracy_when_confident"]}

    for member in ("a", "b"):
        own = json.loads((runs[member] / "eval_report.json").read_text())
        assert card["member_comparison"][f"run-{member}"] == compared(own)
    assert card["member_comparison"]["ensemble"] == compared(report)
    assert card["validation"] == card_figures(report)  # the headline the app and the README show
    assert card["validation"]["accuracy"] == report["accuracy"] and card["validation"]["images"] == 40
    assert card["size_bytes"] == sum(json.loads((runs[m] / "model_card.json").read_text())["size_bytes"]
                                     for m in ("a", "b")) > 0
    ensemble = load_model(out)
    assert [m.name for m in ensemble.members] == ["run-a", "run-b"]
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["members"] == ["../../run-a", "../../run-b"] and spec["temperature"] == report["temperature"]
    selective = card["selective_answers"]
    assert spec["confidence_threshold"] == card["confidence_threshold"] == selective["confidence_threshold"]
    assert ensemble.confidence_threshold == spec["confidence_threshold"] and ensemble.temperature == spec["temperature"]
    assert selective["coverage"] == report["coverage"] and selective["target_accuracy"] == 0.95
    assert selective["statement"] == selective_statement(selective)
    assert card["calibration"]["temperature"] == report["temperature"]
    assert (card["calibration"]["ece_before"], card["calibration"]["ece_after"]) == (report["ece_uncalibrated"],
                                                                                       report["ece"])
    assert card["cross_validation"] == {"folds": 3, "images": 40}
    assert card["architecture_title"] == "Ensemble of Baseline CNN + Baseline CNN" and card["task"] == "Alpha / Beta"
    assert card["classes"] == ["alpha", "beta"] and card["gradcam_layer"] == "mean of the members' maps"
    assert card["latency_ms"]["predict"] > 0
    assert report["arch"] == "ensemble" and report["members"] == ["run-a", "run-b"] and report["model"] == "ab"
    member_card = json.loads((runs["a"] / "model_card.json").read_text())
    for key in ("intended_use", "disclaimer", "display_names"):
        assert card[key] == member_card[key], key
    assert ensemble.confidence_threshold == pytest.approx(card["confidence_threshold"])
    assert ensemble.temperature == pytest.approx(report["temperature"]) != 1.0
    image = stored(runs, paths[0])  # the app's answer uses the same temperature
    member_probs = [[m.predict(image).probabilities[c] for c in ("alpha", "beta")] for m in ensemble.members]
    expected = calibrated(np.log(np.mean(member_probs, axis=0, keepdims=True)), ensemble.temperature)[0]
    assert ensemble.predict(image).probabilities["beta"] == pytest.approx(expected[1], abs=1e-6)


def test_evaluate_reports_the_test_split_with_the_apps_flags(runs, capsys):
    from training.evaluate import run as evaluate

    out = runs["root"] / "test-report.json"
    assert evaluate(["--model", str(runs["a"]), "--data", str(runs["first"]), "--split", "test", "--out", str(out),
                     "--workers", "1", "--quiet"]) == 0
    assert "6 images" in capsys.readouterr().out
    rows = read_rows(out.with_suffix(".csv"))
    report = json.loads(out.read_text())
    assert len(rows) == report["images"] == 6 and all("test" in Path(r["path"]).parts for r in rows)
    assert report["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in rows]))
    model = load_model(runs["a"])
    for r in rows:
        shown = model.predict(runs["first"] / r["path"])
        assert (r["uncertain"] == "True") == shown.uncertain and r["pred"] == shown.label
        assert float(r["ood_score"]) == pytest.approx(shown.ood_score, rel=1e-4)
    assert report["coverage"] == pytest.approx(np.mean([r["uncertain"] == "False" for r in rows]))
    answered = [r for r in rows if r["uncertain"] == "False"]
    if answered:
        assert report["accuracy_when_confident"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in answered]))
    flagged = [r["state"] in ("not a chest CT", "unlike the training images") for r in rows]
    assert report["ood_flagged"] == pytest.approx(np.mean(flagged))
    # The names a reader sees are the model's, class folder names aside ("alpha_stage_T1" reads "Alpha").
    assert (report["class_names"], report["display_names"]) == (model.class_names, model.display_names)
    assert report["display_names"] != report["class_names"]
    assert evaluate(["--model", str(runs["a"]), "--data", str(runs["root"] / "nowhere"), "--out", str(out)]) == 2


def test_audit_command_counts_the_planted_copy(runs, capsys):
    from training.audit import run as audit

    assert audit(["--data", str(runs["first"]), "--json", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 20 + 9 + 6
    assert report["cross_split_copies"] == 1 and report["duplicate_groups"] == 1
    assert report["class_balance"]["test"] == {"alpha": 3, "beta": 3}
    assert audit(["--data", str(runs["first"]), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "evaluation images also in training: 1" in text and "exact duplicates: 1 groups" in text


def test_an_ensemble_can_name_the_member_that_explains_it(runs):
    from training.ensemble import run as make_ensemble

    out = runs["root"] / "ensembles" / "explained-by-b"
    assert make_ensemble(["--members", str(runs["a"]), str(runs["b"]), "--out", str(out),
                          "--explain-with", "run-b"]) == 0
    assert json.loads((out / "ensemble.json").read_text())["explain_with"] == "run-b"
    assert load_model(out).explain_with == "run-b"
    assert json.loads((out / "model_card.json").read_text())["gradcam_layer"] == "run-b's"


def test_an_ensemble_needs_members_cross_validated_on_the_same_folds(runs, capsys):
    import shutil

    from training.ensemble import run as make_ensemble

    plain, moved = runs["root"] / "plain", runs["root"] / "moved"
    shutil.copytree(runs["b"], plain)
    report = json.loads((plain / "eval_report.json").read_text())
    (plain / "eval_report.json").write_text(json.dumps({**report, "out_of_fold": False}))
    assert make_ensemble(["--members", str(runs["a"]), str(plain), "--out", str(runs["root"] / "x")]) == 2
    assert f"{plain}: its report is not out-of-fold; train it with training.fit --cv" in capsys.readouterr().err
    shutil.copytree(runs["b"], moved)
    rows = read_rows(moved / "eval_report.csv")
    rows[0]["fold"] = str((int(rows[0]["fold"]) + 1) % 3)
    with open(moved / "eval_report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert make_ensemble(["--members", str(runs["a"]), str(moved), "--out", str(runs["root"] / "y")]) == 2
    assert capsys.readouterr().err == (f"error: {moved}: its out-of-fold images or folds differ from {runs['a']}'s; "
                                       "members must be cross-validated on the same folds\n")
    assert not (runs["root"] / "x").exists() and not (runs["root"] / "y").exists()


def _shape(value, root: str):
    """The card with every number (also inside its sentences) replaced by # and the run's folder by <tmp>:
    what it says, not what this run measured."""
    if isinstance(value, dict):
        return {k: _shape(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v, root) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return "#"
    if isinstance(value, float):
        return "#.#"
    return re.sub(r"\d+(\.\d+)?", "#", value.replace(root, "<tmp>"))


def test_the_model_card_says_what_it_always_says(runs):
    """Every key and every sentence of a cross-validated run's card (numbers aside)."""
    from snapshot import check

    card = json.loads((runs["a"] / "model_card.json").read_text())
    for volatile in ("created", "code_version", "weights_sha256"):
        card[volatile] = f"<{volatile}>"
    ood = card["out_of_distribution"]
    for measured in ("foreign_images", "foreign_states"):  # what this run's network made of each image
        ood[measured] = {name: "<measured>" for name in ood[measured]}
    check("model-card-cv-run", _shape(card, str(runs["root"])))
    assert (runs["a"] / "model_card.json").read_text().startswith('{\n  "')  # indented for people to read


def test_an_ensemble_card_says_what_it_always_says_and_is_rebuilt_in_place(runs):
    from snapshot import check

    from training.ensemble import run as make_ensemble

    out = runs["root"] / "ensembles" / "rebuilt"
    out.mkdir(parents=True)
    for _ in range(2):  # into an existing folder, and again over its own files
        assert make_ensemble(["--members", str(runs["a"]), str(runs["b"]), "--out", str(out)]) == 0
    for name in ("model_card.json", "ensemble.json"):
        assert (out / name).read_text().startswith('{\n  "'), name
    card = json.loads((out / "model_card.json").read_text())
    for volatile in ("created", "code_version"):
        card[volatile] = f"<{volatile}>"
    check("model-card-ensemble", _shape(card, str(runs["root"])))
