"""Ensembles as first-class models (issue 8): a folder with ``ensemble.json``
loads like any model, predicts the mean of its members' calibrated
probabilities, explains with the mean of their maps, evaluates, and its
evaluation CSV's ``uncertain`` column is exactly the app's flag."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fork_server import child_env
from PIL import Image
from tiny_models import sample_images, write_model_folder

from ctapp import CheckpointError, load_model
from ctapp.evaluation import evaluate_files
from ctapp.inference import EnsembleModel
from ctapp.model_folders import ENSEMBLE_FILE, list_models
from ctapp.ood import EnsembleGate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    write_model_folder(models / "a", seed=0)
    write_model_folder(models / "b", seed=7)
    folder = models / "ab"
    folder.mkdir()
    (folder / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../a", "../b"], "confidence_threshold": 0.7}))
    return folder


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("slices")
    paths = []
    for i, image in enumerate(sample_images(6)):
        paths.append(folder / f"s{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_an_ensemble_predicts_the_mean_of_its_members(ensemble, slices):
    model = load_model(ensemble)
    assert isinstance(model, EnsembleModel) and [m.name for m in model.members] == ["a", "b"]
    a, b = load_model(ensemble.parent / "a"), load_model(ensemble.parent / "b")
    differ = 0
    for path in slices:
        p, pa, pb = model.predict(path), a.predict(path), b.predict(path)
        for key in p.probabilities:
            assert p.probabilities[key] == pytest.approx((pa.probabilities[key] + pb.probabilities[key]) / 2)
        differ += abs(pa.confidence - pb.confidence) > 1e-3
        assert p.uncertain == (p.confidence < 0.7 or pa.out_of_distribution or pb.out_of_distribution)
    assert differ  # the members are different networks


def test_an_ensemble_is_named_by_its_folder(ensemble, tmp_path):
    assert load_model(ensemble).name == "ab"  # ensemble.json names no one
    spec = {"members": [str(ensemble.parent / "a"), str(ensemble.parent / "b")], "name": "old-name"}
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / ENSEMBLE_FILE).write_text(json.dumps(spec))
    assert load_model(tmp_path / "renamed").name == "renamed"  # a folder moved or copied goes by its new name


def test_an_ensembles_version_is_when_it_was_made(ensemble, tmp_path):
    assert load_model(ensemble).version == ""  # ensemble.json without a creation time
    spec = {"members": [str(ensemble.parent / "a"), str(ensemble.parent / "b")], "created": "2026-11-29T18:40:05.123"}
    (tmp_path / ENSEMBLE_FILE).write_text(json.dumps(spec))
    assert load_model(tmp_path).version == "2026-11-29T18:40:05"  # to the second, as the audit log keeps it


def assert_same_answer(a, b):
    a, b = a.to_dict(), b.to_dict()
    assert a.pop("probabilities") == pytest.approx(b.pop("probabilities"), abs=1e-6)
    assert a.pop("confidence") == pytest.approx(b.pop("confidence"), abs=1e-6)
    assert a == b


@pytest.fixture
def passes(monkeypatch) -> list[str]:
    """The names of the members whose ``scored_cam`` ran, in order."""
    from ctapp.inference import LoadedModel

    names = []
    scored_cam = LoadedModel.scored_cam
    monkeypatch.setattr(LoadedModel, "scored_cam", lambda self, *a, **k: names.append(self.name) or
                        scored_cam(self, *a, **k))
    return names


def test_an_ensemble_explains_its_own_answer_with_the_mean_of_its_members_maps(ensemble, slices, passes):
    model = load_model(ensemble)
    for path in slices[:3]:
        passes.clear()
        analysis = model.analyse(path)
        shown = model.predict(path)
        assert_same_answer(analysis.prediction, shown)
        assert analysis.cam_class == shown.label
        maps = [m.explain(path, target=shown.label) for m in model.members]
        np.testing.assert_allclose(analysis.cam, (maps[0] + maps[1]) / 2, atol=1e-6)
        assert analysis.cam.shape == (64, 64)
        # Member a leans the other way on these slices: its map is drawn again for the
        # ensemble's class; member b's first pass already explains that class.
        assert [m.predict(path).label for m in model.members] == ["class0", "class1"] == ["class0", shown.label]
        assert passes[:3] == ["a", "b", "a"]
    passes.clear()
    assert model.analyse(slices[0], target="class0").cam_class == "class0"
    assert passes[:2] == ["a", "b"]  # a named class: one pass each


def test_an_ensemble_can_explain_with_one_named_member(ensemble, slices, tmp_path, passes, monkeypatch):
    spec = {"members": [str(ensemble.parent / "a"), str(ensemble.parent / "b")], "explain_with": "b"}
    (tmp_path / ENSEMBLE_FILE).write_text(json.dumps(spec))
    model = load_model(tmp_path)
    analysis = model.analyse(slices[0])
    assert passes == ["b"]  # the other member only scores the slice
    monkeypatch.undo()
    assert_same_answer(analysis.prediction, model.predict(slices[0]))
    np.testing.assert_allclose(analysis.cam, model.members[1].explain(slices[0], target=analysis.cam_class),
                               atol=1e-6)


def test_an_ensemble_explains_a_slice_as_its_analysis_does(ensemble, slices):
    model = load_model(ensemble)
    np.testing.assert_array_equal(model.explain(slices[1]), model.analyse(slices[1]).cam)
    plus = model.explain(slices[1], method="Grad-CAM++")
    np.testing.assert_array_equal(plus, model.analyse(slices[1], method="Grad-CAM++").cam)
    assert not np.allclose(plus, model.explain(slices[1]))  # the method asked for is the one used


def test_a_slice_without_a_body_is_refused_by_the_ensemble(ensemble, slices):
    from ctapp.inference import NOT_CHEST_CT

    model = load_model(ensemble)
    white = np.full((64, 64), 255, np.uint8)
    assert [m.predict(white).state for m in model.members] == [NOT_CHEST_CT, NOT_CHEST_CT]
    shown = model.predict(white)
    assert shown.state == NOT_CHEST_CT and shown.uncertain
    for path in slices:  # slices with a body: the members' own confidence decides, no input flag
        assert model.predict(path).state != NOT_CHEST_CT


@pytest.mark.parametrize("gate, votes, ratios, expected", [
    (EnsembleGate("all", "mean"), [True, False], [3.0, 0.5], (False, True)),   # one member's 'not CT': unlike
    (EnsembleGate("all", "mean"), [True, True], [3.0, 0.5], (True, True)),
    (EnsembleGate("all", "mean"), [False, False], [1.6, 0.3], (False, False)),  # one member's false alarm
    (EnsembleGate("any", "max"), [False, False], [1.6, 0.3], (False, True)),    # the most severe member state
    (EnsembleGate("any", "max"), [True, False], [0.5, 0.5], (True, True)),
    (EnsembleGate("all", "max"), [True, False], [0.5, 0.5], (False, True)),     # a lone 'not CT': still flagged
    (EnsembleGate("majority", "geometric mean"), [True, False, True], [4.0, 0.25, 1.0], (True, True)),
    (EnsembleGate("majority", "geometric mean"), [False, False, False], [4.0, 0.25, 1.0], (False, False)),
    (EnsembleGate("all", "min"), [False, False], [1.2, float("nan")], (False, True)),  # a member without a check
])
def test_the_ensemble_gate_weighs_its_members_evidence(gate, votes, ratios, expected):
    assert gate.flags(votes, ratios) == expected


def test_an_unknown_ensemble_gate_is_refused():
    with pytest.raises(ValueError, match="unknown ensemble gate"):
        EnsembleGate("most", "mean")


def test_an_ensemble_evaluates_and_its_csv_flags_what_the_app_flags(ensemble, slices):
    model = load_model(ensemble)
    report, rows = evaluate_files(model, slices, [0, 1, 0, 1, 0, 1], workers=1)
    assert report["images"] == 6 and report["arch"] == "ensemble"
    for path, row in zip(slices, rows):
        shown = model.predict(path)
        assert row["uncertain"] == shown.uncertain and row["state"] == shown.state
        assert row["p_class0"] == pytest.approx(shown.probabilities["class0"], abs=1e-5)
    answered = [not r["uncertain"] for r in rows]
    assert report["coverage"] == pytest.approx(np.mean(answered))
    # The risk-coverage curve recounted from the rows: the k most confident answered, k = 1 .. 6.
    ranked = sorted(rows, key=lambda r: -r["confidence"])
    assert [point["coverage"] for point in report["risk_coverage"]] == pytest.approx([k / 6 for k in range(1, 7)])
    for k, point in enumerate(report["risk_coverage"], 1):
        assert point["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in ranked[:k]]))


def test_ensembles_are_listed_and_served_by_the_command_line(ensemble, slices, tmp_path):
    assert "ab" in [entry.name for entry in list_models([ensemble.parent])]
    out = subprocess.run([sys.executable, "-m", "ctapp.predict", "--model", str(ensemble), str(slices[0])],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(slices[0]) + "\t")


def test_a_broken_ensemble_is_refused_with_a_clear_message(tmp_path):
    write_model_folder(tmp_path / "two", num_classes=2)
    write_model_folder(tmp_path / "three", num_classes=3)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../two", "../three"]}))
    with pytest.raises(CheckpointError, match="not one task"):
        load_model(tmp_path / "mixed")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../two"]}))
    with pytest.raises(CheckpointError, match="at least two members"):
        load_model(tmp_path / "alone")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / ENSEMBLE_FILE).write_text("[1, 2")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(tmp_path / "junk")
    for name, spec, words in [
        ("listless", {"members": "../two"}, "needs a list of member folders under 'members'"),
        ("nested", {"members": ["../two", "../alone"]}, "member ../alone is an ensemble itself"),
        ("stranger", {"members": ["../two", "../two"], "explain_with": "three"},
         "explain_with names 'three', not a member")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / ENSEMBLE_FILE).write_text(json.dumps(spec))
        with pytest.raises(CheckpointError, match=words):
            load_model(tmp_path / name)


def test_model_folders_are_listed_once_with_their_cards(tmp_path):
    from ctapp.model_folders import model_stamp

    a = write_model_folder(tmp_path / "one" / "a", seed=0)
    (tmp_path / "one" / "b").mkdir()  # no model.pt and no ensemble.json: not a model
    (tmp_path / "one" / "b" / "model_card.json").write_text("{}")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a-again").symlink_to(a)
    (tmp_path / "two" / "odd").mkdir()
    (tmp_path / "two" / "odd" / ENSEMBLE_FILE).write_text("{}")
    (tmp_path / "two" / "odd" / "model_card.json").write_text("[broken")
    entries = list_models([tmp_path / "one", tmp_path / "two", tmp_path / "missing"])
    assert [(e.path.name, e.name) for e in entries] == [("a", "a"), ("odd", "odd")]
    assert entries[1].card == {} and entries[1].task == "unknown task"
    assert entries[0].report_path == a / "eval_report.json"
    assert model_stamp(a) == (a / "model.pt").stat().st_mtime
    assert model_stamp(tmp_path / "two" / "odd") == (tmp_path / "two" / "odd" / ENSEMBLE_FILE).stat().st_mtime
    assert model_stamp(tmp_path / "one" / "b") == 0.0


def test_the_models_table_row_headlines_out_of_fold_figures_with_their_spread(tmp_path):
    from training.models_table import table

    folder = write_model_folder(tmp_path / "lung-x", seed=0)
    card = json.loads((folder / "model_card.json").read_text())
    card.update(task="Lung cancer (4 classes)", architecture_title="VGG19-BN", cross_validation={"folds": 5},
                validation={"images": 577, "accuracy": 0.8412, "macro_f1": 0.8221, "roc_auc": {"macro": 0.9612},
                            "fold_spread": {"accuracy": {"std": 0.084}, "macro_f1": {"std": 0.0712}}},
                selective_answers={"coverage": 0.672, "accuracy_when_confident": 0.951},
                calibration={"ece_after": 0.0412}, size_bytes=20_400_000,
                latency_ms={"predict": 41.0, "predict_gradcam": 180.0},
                shift_simulation={"shifts": {"none": {"confident_mistakes": 0.03},
                                             "JPEG q20": {"confident_mistakes": 0.0633},
                                             "noise": {"confident_mistakes": 0.05}}})
    (folder / "model_card.json").write_text(json.dumps(card))
    row = table(tmp_path).splitlines()[2]
    assert row == ("| `lung-x` | Lung cancer (4 classes) | VGG19-BN | out-of-fold, 5-fold CV | 577 | 84.1% ± 8.4% | "
                   "0.822 ± 0.071 | 0.961 | 0.041 | 67.2% / 95.1% | 6.3% (JPEG q20) | 20.4 MB | 41.0 / 180.0 |")
    del card["cross_validation"], card["validation"]["fold_spread"], card["selective_answers"], card["latency_ms"]
    del card["shift_simulation"]
    del card["validation"]["accuracy"]
    card.pop("preprocessing", None)
    (folder / "model_card.json").write_text(json.dumps(card))
    text = table(tmp_path)
    assert text.splitlines()[2] == ("| `lung-x` | Lung cancer (4 classes) | VGG19-BN | validation split | 577 | n/a | "
                                    "0.822 | 0.961 | 0.041 | n/a | n/a | 20.4 MB | ? / ? |")
    assert "--crop none --intensity none" in text  # a card from before the crop trained without it


def test_the_models_table_gives_an_ensemble_its_own_command(tmp_path):
    from training.models_table import table

    write_model_folder(tmp_path / "a", seed=0)
    write_model_folder(tmp_path / "b", seed=7)
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../a", "../b"]}))
    # The members' folders come from ensemble.json, not from the names a card gives them.
    (tmp_path / "ab" / "model_card.json").write_text(json.dumps({"architecture": "ensemble",
                                                                 "members": ["model a", "model b"],
                                                                 "validation": {"macro_f1": 0.5},
                                                                 "selective_answers": {"target_accuracy": 0.9}}))
    commands = table(tmp_path).split("```bash\n")[1]
    assert "# ab\npython -m training.ensemble --members models/a models/b --out models/ab --target-accuracy 0.9\n" \
        in commands
    assert commands.count("python -m training.fit") == 2  # the members', not the ensemble's


def test_a_dicom_file_is_read_in_the_window_the_models_were_trained_with(ensemble, tmp_path):
    """A model trained on a mediastinal window reads a DICOM file it is given by
    path in that window, not in the default lung window; so does an ensemble."""
    from dataclasses import replace

    from app_fixtures import dicom_bytes

    from ctapp.imaging import LUNG_WINDOW, Window, decode

    path = tmp_path / "IM0001"
    path.write_bytes(dicom_bytes())
    mediastinal = Window(40, 400)
    ensemble_model = load_model(ensemble)
    for model in (*ensemble_model.members, ensemble_model):
        model.preprocess = replace(model.preprocess, window_center=mediastinal.center, window_width=mediastinal.width)
    for model in (ensemble_model.members[0], ensemble_model):
        given = model.predict(path).probabilities
        assert given == model.predict(decode(path, window=mediastinal)).probabilities
        assert given != model.predict(decode(path, window=LUNG_WINDOW)).probabilities


def test_an_ensembles_ood_score_is_its_members_largest_relative_to_their_thresholds():
    """The fixture's tiny members have no OOD detector: the shipped lung ensemble's members do."""
    from ctapp.model_folders import DEFAULT_MODELS_DIR

    model = load_model(DEFAULT_MODELS_DIR / "lung-ensemble")
    for image in sample_images(2):
        ratios = [m.predict(image).ood_score / m.ood.threshold for m in model.members]
        assert model.predict(image).ood_score == pytest.approx(max(ratios))


def test_reports_written_before_rows_named_their_images_get_names_and_hashes(tmp_path, monkeypatch):
    """training.identify_images (the migration of the shipped reports): each member's row
    is named below the data root, with its bytes' hash; an ensemble's rows take their
    members' (its report named no data folder); reports already named are left alone."""
    from ctapp.checkpoint import sha256_file
    from ctapp.evaluation import read_predictions, write_report
    from training.identify_images import main as identify

    root = tmp_path / "data"
    images = []
    for i, image in enumerate(sample_images(3)):
        images.append(root / "lung" / "Data" / "train" / f"c{i % 2}" / f"{i}.png")
        images[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(images[-1])
    data = root / "lung" / "Data"
    rows = [{"path": str(p.relative_to(data)), "true": "c0", "pred": "c0"} for p in images]
    member, ensemble = tmp_path / "models" / "a", tmp_path / "models" / "ab"
    write_report({"data": str(data)}, rows, member / "eval_report.json")
    write_report({}, list(reversed(rows)), ensemble / "eval_report.json")
    (ensemble / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../a"]}))
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(root))

    assert identify([str(ensemble / "eval_report.json"), str(member / "eval_report.json")]) == 0  # any order
    named = read_predictions(member / "eval_report.json")
    assert [(r["image"], r["sha256"]) for r in named] == \
        [(f"lung/Data/{r['path']}", sha256_file(p)) for r, p in zip(rows, images)]
    assert [r["path"] for r in named] == [r["path"] for r in rows]  # nothing else changes
    by_path = {r["path"]: r for r in named}
    copied = read_predictions(ensemble / "eval_report.json")
    assert all((r["image"], r["sha256"]) == (by_path[r["path"]]["image"], by_path[r["path"]]["sha256"])
               for r in copied)
    assert json.loads((ensemble / "eval_report.json").read_text())["data"] == str(data)
    before = (member / "eval_report.csv").read_text()
    images[0].write_bytes(b"changed")
    identify([str(member / "eval_report.json")])
    assert (member / "eval_report.csv").read_text() == before  # already named: left alone


SHIPPED_LUNG = ROOT / "models" / "lung-ensemble"


@pytest.mark.skipif(not (SHIPPED_LUNG / ENSEMBLE_FILE).is_file(), reason="no shipped lung ensemble")
def test_the_shipped_ensemble_still_refuses_foreign_images():
    """A document, a head CT and a coronal reformat (DICOM in Hounsfield units): not a chest CT for
    every member, so for the ensemble."""
    from ctapp.inference import NOT_CHEST_CT
    from training.foreign import foreign_set

    model = load_model(SHIPPED_LUNG)
    chosen = {"document/letter", "head_ct/dicom_0", "coronal_reformat/at_0.55"}
    for image in [f for f in foreign_set() if f.name in chosen]:
        states = [m.predict(image.data).state for m in model.members]
        shown = model.predict(image.data)
        assert states == [NOT_CHEST_CT, NOT_CHEST_CT] and shown.state == NOT_CHEST_CT, (image.name, states)
