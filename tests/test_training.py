"""training.fit and training.evaluate end to end on a tiny generated dataset."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from ctapp import load_model
from ctapp.checkpoint import safe_load
from ctapp.models import create_model, get_spec
from training import evaluate
from training.fit import get_args_parser, run
from training.trainer import set_trainable

TINY = ["--arch", "baseline", "--img-size", "48", "--batch-size", "8", "--quiet", "--workers", "1"]


def report_flagged(folder):
    return json.loads((folder / "eval_report.json").read_text())["ood_flagged"]


def test_fit_writes_a_complete_model_folder(tiny_model):
    names = {p.name for p in tiny_model.iterdir()}
    assert {"model.pt", "model_card.json", "eval_report.json", "eval_report.csv", "history.csv", "audit.json"} <= names
    assert not {"last.pt", "best.pt"} & names  # a finished run keeps no checkpoints unless asked to
    card = json.loads((tiny_model / "model_card.json").read_text())
    assert card["classes"] == ["alpha", "beta"] and card["architecture"] == "baseline"
    assert card["weights_origin"].startswith("from scratch")
    assert card["gradcam_layer"] == get_spec("baseline").cam_layer
    assert card["calibration"]["temperature"] > 0
    assert card["latency_ms"]["predict"] > 0 and card["latency_ms"]["predict_gradcam"] > 0
    ood = card["out_of_distribution"]
    assert 0 <= ood["foreign_flagged"] <= 1 and set(ood["foreign_images"]) >= {"white", "photo", "document"}
    assert ood["validation_flagged"] == report_flagged(tiny_model)
    assert "not a medical device" in card["disclaimer"].lower()
    report = json.loads((tiny_model / "eval_report.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "class_names", "roc_auc", "ece",
                "sensitivity", "specificity"):
        assert key in report
    assert report["images"] == 8 and report["split"] == "valid"
    assert report["data"] == card["training_data"]["root"]
    with open(tiny_model / "eval_report.csv") as f:  # rows name files relative to that root
        assert all(not Path(row["path"]).is_absolute() and (Path(report["data"]) / row["path"]).is_file()
                   for row in csv.DictReader(f))
    with open(tiny_model / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert card["validation"]["macro_f1"] == report["macro_f1"] and card["validation"]["roc_auc"] == report["roc_auc"]
    headline = ("images", "accuracy", "macro_f1", "ece", "sensitivity", "specificity", "positive_class")
    assert safe_load(tiny_model / "model.pt")["metrics"] == {**{k: report[k] for k in headline},
                                                           "roc_auc_macro": report["roc_auc"]["macro"]}


def test_resume_of_a_finished_run_finalises_it_again_from_the_checkpoints_it_kept(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "runs" / "run"  # a folder whose parent does not exist yet
    argv = ["--data", str(tiny_dataset), "--epochs", "1", "--out", str(out), *TINY, "--keep-checkpoints"]
    assert run(argv) == 0
    epochs = [line.split(":")[0] for line in capsys.readouterr().err.splitlines() if ": loss " in line]
    assert epochs == ["epoch 1"]  # one line per epoch, counted from 1
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    first = json.loads((out / "model_card.json").read_text())
    assert run([*argv, "--resume"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["created"] >= first["created"]
    assert load_model(out).card["weights_sha256"] == card["weights_sha256"]


def test_a_finished_run_drops_its_checkpoints_and_resuming_it_changes_nothing(tiny_dataset, tmp_path, capsys):
    """last.pt holds the optimiser state beside the weights (283 MB beside a 25 MB model.pt for ResNet-50):
    once model.pt is written it goes, with best.pt; --resume then says the run is finished and leaves it."""
    out = tmp_path / "run"
    argv = ["--data", str(tiny_dataset), "--epochs", "2", "--out", str(out), *TINY]
    assert run([*argv, "--stop-after", "1"]) == 0
    assert (out / "last.pt").is_file() and not (out / "model.pt").exists()  # interrupted: resumable
    assert run([*argv, "--resume"]) == 0
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    assert safe_load(out / "model.pt")["epoch"] in (1, 2)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert run([*argv, "--resume"]) == 0
    assert f"--resume: {out} holds a finished model and no checkpoint" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_run_shows_its_progress_in_images_while_caching_and_in_batches_while_training(tiny_dataset, tmp_path,
                                                                                       capsys):
    loud = [a for a in TINY if a != "--quiet"]
    assert run(["--data", str(tiny_dataset), "--epochs", "1", "--out", str(tmp_path / "m"), *loud]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^caching 24/24 images \| [\d.]+ image/s \| left ", err, re.M), err
    assert re.search(r"^epoch 1/1 3/3 batches \| [\d.]+ batch/s \| left ", err, re.M), err


def test_evaluate_cli_on_a_split_and_on_everything(tiny_model, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "reports" / "valid.json"
    argv = ["--model", str(tiny_model), "--data", str(tiny_dataset), "--quiet"]
    assert evaluate.run(argv + ["--split", "valid", "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert printed.out.startswith("8 images (0 unreadable, 0 duplicates skipped): accuracy ") and printed.err == ""
    report = json.loads(out.read_text())
    assert out.read_text().startswith('{\n  "')  # indented: read by people as well as by programs
    assert report["images"] == 8 and report["split"] == "valid"
    age = datetime.now(timezone.utc) - datetime.fromisoformat(report["created"])  # when it was evaluated
    assert timedelta(0) <= age < timedelta(minutes=10)
    assert Path(report["data"]) == tiny_dataset.resolve()  # the folder its rows' paths are relative to
    # the model folder's own report was computed the same way
    own = json.loads((tiny_model / "eval_report.json").read_text())
    assert report["accuracy"] == own["accuracy"] and report["ece"] == pytest.approx(own["ece"])
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"path", "true", "pred", "p_alpha", "p_beta"} <= set(rows[0])
    assert not (tiny_model / "valid.csv").exists()

    everything = tmp_path / "all.json"
    shutil.copy(next((tiny_dataset / "train" / "beta").iterdir()), tiny_dataset / "valid" / "beta" / "again.png")
    try:
        assert evaluate.run([*argv[:-1], "--out", str(everything), "--dedupe"]) == 0  # not --quiet
    finally:
        (tiny_dataset / "valid" / "beta" / "again.png").unlink()
    report = json.loads(everything.read_text())
    assert report["images_found"] == 33 and report["duplicates_skipped"] == 1 and report["images"] == 32
    assert report["split"] == "all"
    printed = capsys.readouterr()
    assert printed.err.startswith("evaluating 33/33 images | ")
    # A two-class task also prints the positive class's sensitivity and specificity.
    assert f" sensitivity {report['sensitivity']:.4f} specificity {report['specificity']:.4f}\n" in printed.out

    assert evaluate.run(argv + ["--split", "test", "--out", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err == (f"error: {tiny_dataset}: no images in a 'test' split "
                                       "(found splits: train, valid)\n")


@pytest.mark.parametrize("command", ["ctapp.predict", "training.fit", "training.evaluate", "training.audit",
                                     "training.ensemble", "training.models_table"])
def test_each_commands_options_can_join_a_larger_parser(command):
    """torchvision's references convention: ``get_args_parser(add_help=False)`` as a parent parser."""
    import argparse
    import importlib

    module = importlib.import_module(command)
    assert "-h" in module.get_args_parser().format_help()
    parent = module.get_args_parser(add_help=False)
    assert "-h" not in parent._option_string_actions
    wrapper = argparse.ArgumentParser(parents=[parent])  # would clash over -h if the parent had its own
    assert {a.dest for a in parent._actions} <= {a.dest for a in wrapper._actions}


def test_evaluate_labels_a_folder_holding_some_of_the_models_classes_by_the_models_order(
        tiny_model, tiny_dataset, tmp_path, capsys):
    """A test folder with only the 'beta' images must score them as beta, the
    model's second class, not as the first class of the folder's own list; with
    one class only, sensitivity or specificity is undefined and printed n/a."""
    shutil.copytree(tiny_dataset / "valid" / "beta", tmp_path / "data" / "beta")
    out = tmp_path / "beta-only.json"
    assert evaluate.run(["--model", str(tiny_model), "--data", str(tmp_path / "data"), "--out", str(out),
                         "--quiet"]) == 0
    printed = capsys.readouterr().out
    # One class only: no AUC, and no sensitivity or no specificity (whichever needs the absent class).
    assert re.search(r" AUC n/a ECE \d\.\d{4} sensitivity (n/a specificity \d\.\d{4}|\d\.\d{4} specificity n/a)\n",
                     printed), printed
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {row["true"] for row in rows} == {"beta"}
    right = sum(row["pred"] == "beta" for row in rows)
    assert json.loads(out.read_text())["accuracy"] == right / 4


@pytest.mark.parametrize("schedule", [[], ["--schedule", "plateau", "--plateau-patience", "0"]],
                         ids=["cosine", "plateau"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_dataset, tmp_path, schedule):
    """Weights, optimiser and schedule all continue where they stopped (the
    plateau schedule's memory of its best epoch included)."""
    common = ["--data", str(tiny_dataset), *TINY, "--epochs", "3", "--seed", "7", "--keep-checkpoints", *schedule]
    assert run([*common, "--out", str(tmp_path / "straight")]) == 0
    assert run([*common, "--out", str(tmp_path / "resumed"), "--stop-after", "1"]) == 0
    assert not (tmp_path / "resumed" / "model.pt").exists()
    assert safe_load(tmp_path / "resumed" / "last.pt")["state"]["epoch"] == 1
    assert run([*common, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    a = safe_load(tmp_path / "straight" / "last.pt")
    b = safe_load(tmp_path / "resumed" / "last.pt")
    assert a["state"]["epoch"] == b["state"]["epoch"] == 3
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    def history(d):
        return [(r["epoch"], r["lr"], r["val_macro_f1"], r["train_loss"]) for r in d["state"]["history"]]

    assert history(a) == history(b)
    assert a["scheduler"] == b["scheduler"]


def test_history_csv_holds_each_epochs_figures_to_six_significant_digits(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert run(["--data", str(tiny_dataset), "--epochs", "2", "--out", str(out), *TINY, "--keep-checkpoints"]) == 0
    lines = (out / "history.csv").read_text().splitlines()
    saved = safe_load(out / "last.pt")["state"]["history"]
    assert lines[0].split(",") == list(saved[0]) and len(lines) == 1 + len(saved) == 3
    for line, epoch in zip(lines[1:], saved):
        for cell, value in zip(line.split(","), epoch.values()):
            assert float(cell) == pytest.approx(value, rel=1e-5)
            assert len(cell.lstrip("-").split("e")[0].replace(".", "").lstrip("0")) <= 6, cell


def test_the_plateau_schedule_follows_the_optimiser_of_the_unfrozen_network(tiny_dataset, tmp_path):
    """Unfreezing builds a new optimiser (the backbone at the fine-tuning rate); the plateau rule starts
    again on it."""
    out = tmp_path / "m"
    assert run(["--data", str(tiny_dataset), *TINY, "--epochs", "3", "--freeze-epochs", "1", "--schedule", "plateau",
                "--plateau-patience", "0", "--lr", "0.01", "--finetune-lr-scale", "0.1", "--out", str(out),
                "--keep-checkpoints"]) == 0
    saved = safe_load(out / "last.pt")
    assert [r["epoch"] for r in saved["state"]["history"]] == [1, 2, 3]
    assert saved["scheduler"]["last_epoch"] == 2  # stepped after each fine-tuning epoch, from its start


@pytest.mark.parametrize("asked, local_rank, expected", [("cuda", "0", "cuda:0"), ("cuda", "1", "cuda:1"),
                                                          ("cuda:1", "0", "cuda:1"), ("auto", "1", "cuda:1")])
def test_a_cuda_device_is_given_its_index_before_it_is_selected(monkeypatch, asked, local_rank, expected):
    """torch.cuda.set_device refuses a device without an index: plain "cuda" (and "auto") mean the GPU of
    this process's local rank under torchrun, GPU 0 otherwise. (Found on an H200: --device cuda failed.)"""
    from training.trainer import setup_distributed

    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: selected.append(device))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr("training.trainer.configure_threads", lambda n: None)
    device, rank, world = setup_distributed(asked)
    assert device == torch.device(expected) and selected == [torch.device(expected)] and (rank, world) == (0, 1)


def test_transfer_learning_phases_freeze_the_right_parameters():
    model = create_model("resnet50", 3)
    spec = get_spec("resnet50")
    set_trainable(model, spec, "head", 0)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"fc"}
    set_trainable(model, spec, "finetune", 1)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"fc", "layer4"}
    set_trainable(model, spec, "finetune", 0)
    assert all(p.requires_grad for p in model.parameters())
    # The stem (conv1 and bn1) is the first of five stages: all five unfreeze everything.
    set_trainable(model, spec, "finetune", 4)
    assert {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad} == {"conv1", "bn1"}
    set_trainable(model, spec, "finetune", 5)
    assert all(p.requires_grad for p in model.parameters())
    # VGG-style stages end at each max-pool: the last stage is what follows the 4th one.
    vgg = create_model("vgg19_bn", 3)
    pools = [i for i, layer in enumerate(vgg.features) if isinstance(layer, torch.nn.MaxPool2d)]
    set_trainable(vgg, get_spec("vgg19_bn"), "finetune", 1)
    trainable = {n.rsplit(".", 1)[0] for n, p in vgg.named_parameters() if p.requires_grad}
    expected = {f"features.{i}" for i in range(pools[-2] + 1, pools[-1]) if list(vgg.features[i].parameters())}
    assert trainable == expected | {n.rsplit(".", 1)[0] for n, _ in vgg.classifier.named_parameters(prefix="classifier")}


def test_one_class_dataset_stops_with_a_clear_message(tmp_path, capsys):
    from synthetic import write_classes

    write_classes(tmp_path / "data", ["normal"], 8, size=32)
    assert run(["--data", str(tmp_path / "data"), *TINY, "--epochs", "1", "--out", str(tmp_path / "m")]) == 2
    assert "two classes" in capsys.readouterr().err


def test_every_option_is_explained():
    for action in get_args_parser()._actions:
        assert action.help, f"--{action.dest} has no help text"


def test_help_names_the_module_and_says_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    text = get_args_parser().format_help()
    assert text.startswith("usage: python -m training.fit [-h] --data DIR")
    assert "(default: None)" not in text and "(default: False)" not in text
    options = {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n(?=  --)", text)[1:]}
    assert len(options) == len(get_args_parser()._actions) - 1  # all but -h
    assert [o for o in options.values() if o.count("(default") > 1] == []
    assert options["--freeze-epochs"].endswith("(default: 3 with pretrained weights, 0 from scratch)")
    assert options["--augment"].endswith("(default: detail)")


def test_the_models_table_commands_retrain_each_shipped_model_with_its_cards_settings():
    """Options at fit's default are left out of the printed command: parsed back, every command must give
    the settings its card recorded (the augmentation level included, whichever is now the default)."""
    import shlex

    from training.models_table import RUN_ONLY, table
    from training.trainer import default_freeze_epochs

    lines = [line for line in table(ROOT / "models").splitlines() if line.startswith("python -m training.fit")]
    assert len(lines) == 4
    for line in lines:
        assert " --augment " in line  # a recipe always says its augmentation
        parsed = vars(get_args_parser().parse_args(shlex.split(line)[3:]))
        folder = ROOT / "models" / Path(parsed["out"]).name
        settings = json.loads((folder / "model_card.json").read_text())["training"]["settings"]
        if parsed["freeze_epochs"] is None:  # as the run resolves it
            parsed["freeze_epochs"] = default_freeze_epochs(parsed["weights"])
        for key, value in settings.items():
            if key not in RUN_ONLY | {"out"}:
                given = list(parsed[key]) if isinstance(parsed[key], tuple) else parsed[key]
                assert given == value, (folder.name, key, given, value)


@pytest.mark.slow
def test_distributed_training_with_two_cpu_processes(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.fit",
           "--data", str(tiny_dataset), *TINY, "--epochs", "2", "--out", str(out), "--keep-checkpoints"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr
    model = load_model(out)
    assert model.class_names == ["alpha", "beta"]
    history = safe_load(out / "last.pt")["state"]["history"]
    assert len(history) == 2


def test_the_readme_models_table_is_the_one_the_shipped_cards_give(tmp_path):
    """`python -m training.models_table --readme README.md` with no folder reads the shipped models; the
    committed README must already hold its output (regenerate it after reshipping a model)."""
    from training.models_table import main

    readme = tmp_path / "README.md"
    committed = (ROOT / "README.md").read_text(encoding="utf-8")
    readme.write_text(committed, encoding="utf-8")
    main(["--readme", str(readme)])
    assert readme.read_text(encoding="utf-8") == committed


def test_the_models_table_shows_a_figure_a_card_lacks_as_missing_never_as_zero(tmp_path):
    from tiny_models import write_model_folder

    from training.models_table import table

    write_model_folder(tmp_path / "bare")  # a card with its classes and weights' hash only
    row = table(tmp_path).splitlines()[2]
    assert row == ("| `bare` | class0/class1 | n/a | validation split | n/a | n/a | n/a | n/a | n/a | n/a | n/a | "
                   "n/a | ? / ? |")
    card_path = write_model_folder(tmp_path / "sized") / "model_card.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "size_bytes": 2_350_000}))
    assert "| 2.4 MB |" in table(tmp_path).splitlines()[3]  # 2.35 million bytes: megabytes of 10^6 bytes


def test_models_table_command_reproduces_the_training_settings(tiny_model, tmp_path, capsys):
    import shlex

    from training.models_table import command, main, table

    card = json.loads((tiny_model / "model_card.json").read_text())
    text = table(tiny_model.parent)
    line = next(line for line in text.splitlines() if line.startswith("python -m training.fit"))
    args = vars(get_args_parser().parse_args(shlex.split(line)[3:]))
    settings = card["training"]["settings"]
    for key in ("data", "arch", "epochs", "img_size", "batch_size", "weights", "lr"):
        assert args[key] == settings[key], key
    assert args["out"] == f"models/{tiny_model.name}"
    assert f"`{tiny_model.name}`" in text
    # Only what differs from fit's defaults is spelled out, beside the options a reader looks for first.
    assert settings["seed"] == 0 and settings["schedule"] == "cosine" and settings["epochs"] == 2
    assert "--seed" not in line and "--schedule" not in line and "--epochs 2" in line
    assert "--window" not in line  # a two-number default, read back from JSON as a list
    assert " --window 40.0 400.0" in command({**settings, "window": [40.0, 400.0]})
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- models-table: x -->\nold\n<!-- /models-table -->\nrest\n")
    for _ in range(2):  # the second run replaces the first table, markers kept
        main([str(tiny_model.parent), "--readme", str(readme)])
        assert readme.read_text() == f"intro\n<!-- models-table: x -->\n{text}\n<!-- /models-table -->\nrest\n"
    assert capsys.readouterr().out == ""
    main([str(tiny_model.parent)])
    assert capsys.readouterr().out == text + "\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- models-table -->"):
        main([str(tiny_model.parent), "--readme", str(readme)])


@pytest.mark.parametrize("level", ["light", "medium", "strong", "acquisition", "detail", "export"])
def test_augmentations_keep_shape_and_range(level):
    from ctapp.preprocess import train_augment
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 48 * 48).reshape(1, 48, 48)
    out = train_augment(level)(ramp)
    assert out.shape == ramp.shape and out.dtype == torch.float32
    assert not torch.equal(out, ramp)
    edges = (ramp > 0.5).float()  # all 0 or 1: brightening and sharpening push hardest past the range
    for image in [ramp, edges] * 10:
        out = train_augment(level)(image)
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_no_augmentation_leaves_every_pixel_as_it_was():
    from ctapp.preprocess import train_augment

    image = torch.rand(1, 48, 48)
    assert torch.equal(train_augment("none")(image), image)  # not resampled at an identity transform


def test_acquisition_shift_is_nonlinear_and_seeded():
    from ctapp.preprocess import AcquisitionShift
    ramp = torch.linspace(0, 1, 64 * 64).reshape(1, 64, 64)
    shift = AcquisitionShift(p=1.0)
    torch.manual_seed(3)
    first = shift(ramp)
    torch.manual_seed(3)
    assert torch.equal(first, shift(ramp))
    # Not a brightness/contrast change that percentile standardisation would undo: no straight
    # line through (input, output) fits the shifted ramp.
    a, b = torch.linalg.lstsq(torch.stack([ramp.flatten(), torch.ones(ramp.numel())], 1),
                              first.flatten()[:, None]).solution.flatten()
    assert (first.flatten() - (a * ramp.flatten() + b)).abs().max() > 0.05
    assert AcquisitionShift(p=0.0)(ramp).equal(ramp)


def test_each_acquisition_shift_alone_does_what_it_is_named_for():
    from ctapp.preprocess import AcquisitionShift

    ramp = torch.linspace(0, 1, 32 * 32).reshape(1, 32, 32)
    grey = torch.full((1, 32, 32), 0.98)

    def alone(kind, image, seed=0):
        torch.manual_seed(seed)
        return AcquisitionShift(p=1.0, kinds=(kind,))(image)

    for seed in range(4):
        gamma = alone("gamma", ramp, seed)  # a curve through (0, 0) and (1, 1), order kept
        assert gamma[0, 0, 0] == 0 and gamma[0, -1, -1] == pytest.approx(1.0)
        assert (gamma.flatten().diff() >= 0).all() and (gamma - ramp).abs().max() > 0.02
        window = alone("window", ramp, seed)  # a narrower window: the ends clip to black and white
        assert window.min() == 0 and window.max() == 1 and (window == 0).sum() > 1 and (window == 1).sum() > 1
        noise = alone("noise", grey, seed + 10)  # kept inside 0..1 near white
        assert noise.max() <= 1.0 and noise.min() >= 0.0
    assert any((alone("noise", grey, s) != grey).any() for s in range(4))
    jpeg = alone("jpeg", ramp)
    assert (jpeg * 255 - torch.round(jpeg * 255)).abs().max() < 1e-4 and not torch.equal(jpeg, ramp)


def test_detail_augmentation_changes_fine_detail_only():
    """The ``detail`` level's shifts (sharpening or blur, noise, JPEG) leave the coarse picture alone:
    away from an edge nothing changes and the mean stays, while the edge itself gains or loses detail."""
    from ctapp.preprocess import AUGMENT_LEVELS, AcquisitionShift, train_augment

    assert AUGMENT_LEVELS["detail"][-1] == (("detail", "noise", "jpeg"), 0.4)
    shifts = [t for t in train_augment("detail").transforms if isinstance(t, AcquisitionShift)]
    assert [(t.kinds, t.p) for t in shifts] == [(("detail", "noise", "jpeg"), 0.4)]
    assert not any(isinstance(t, AcquisitionShift) for t in train_augment("medium").transforms)
    with pytest.raises(ValueError, match="unknown acquisition shifts"):
        AcquisitionShift(kinds=("detail", "contrast"))
    edge = torch.zeros(1, 64, 64)
    edge[:, :, 32:] = 0.8
    only_detail = AcquisitionShift(p=1.0, kinds=("detail",))
    changed, sharpened = 0, 0
    for seed in range(6):
        torch.manual_seed(seed)
        out = only_detail(edge)
        sharpened += out.max().item() > 0.8 + 1e-3  # sharpening overshoots the edge; blur never does
        assert out.mean().item() == pytest.approx(edge.mean().item(), abs=0.03)  # no brightness or window change
        assert torch.allclose(out[:, :, :20], edge[:, :, :20], atol=1e-5)  # flat regions stay flat
        assert torch.allclose(out[:, :, 44:], edge[:, :, 44:], atol=1e-5)
        changed += (out - edge).abs().max().item() > 0.02
    assert changed == 6  # every draw alters the edge
    assert 0 < sharpened < 6  # sometimes sharper, sometimes blurred
    torch.manual_seed(0)
    assert torch.equal(AcquisitionShift(p=1.0, kinds=())(edge), edge)


def test_export_augmentation_is_detail_with_narrower_windows():
    """``export`` is ``detail`` plus the window shift: the same geometry and chance, and a drawn window
    clips the darkest grey levels together, the one export change that equalisation cannot undo."""
    import numpy as np

    from ctapp.preprocess import AUGMENT_LEVELS, AcquisitionShift, equalise_intensity, train_augment

    assert AUGMENT_LEVELS["export"][:-1] == AUGMENT_LEVELS["detail"][:-1]
    (shift,) = [t for t in train_augment("export").transforms if isinstance(t, AcquisitionShift)]
    assert set(shift.kinds) == {"window", "detail", "noise", "jpeg"} and shift.p == 0.4
    ramp = torch.linspace(0, 1, 64 * 64).reshape(1, 64, 64)
    torch.manual_seed(1)
    windowed = AcquisitionShift(p=1.0, kinds=("window",))(ramp)
    merged = int((windowed == 0).sum())
    assert merged > 64  # every window starts above 0: the darkest levels all become black
    levels = np.unique(equalise_intensity(windowed[0].numpy()))
    assert len(levels) < len(np.unique(equalise_intensity(ramp[0].numpy())))


# --------------------------------------------------------------------------- schedules, optimisers, stopping


def _schedule_args(**kw):
    return get_args_parser().parse_args(["--data", "x", "--out", "y", "--epochs", "10", "--warmup-epochs", "2",
                                         *[str(a) for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", v)]])


def test_learning_rate_schedules_by_hand():
    from training.trainer import schedule_factor

    cosine = _schedule_args(schedule="cosine")
    assert [schedule_factor(cosine, e) for e in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert schedule_factor(cosine, 6) == pytest.approx(0.5 * 0.99 + 0.01)  # halfway through the decay
    assert schedule_factor(cosine, 10) == pytest.approx(0.01)
    step = _schedule_args(schedule="step", step_size=3, gamma=0.5)
    assert [schedule_factor(step, e) for e in (1, 2, 4, 5, 8)] == pytest.approx([2 / 3, 1.0, 1.0, 0.5, 0.25])
    assert [schedule_factor(_schedule_args(schedule="constant"), e) for e in (0, 5)] == pytest.approx([1 / 3, 1.0])
    assert schedule_factor(_schedule_args(schedule="plateau"), 0) == 1.0  # no warm-up: the plateau rule owns the rate


def test_optimisers_and_the_backbone_learning_rate():
    from training.trainer import build_optimizer

    model = create_model("baseline", 2)
    sgd = build_optimizer(_schedule_args(opt="sgd", lr=0.02, momentum=0.8, weight_decay=0.01), model,
                          get_spec("baseline").head, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    head, backbone = sgd.param_groups
    assert (head["lr"], backbone["lr"], backbone["base_lr"]) == pytest.approx((0.02, 0.002, 0.002))
    assert sgd.defaults["weight_decay"] == 0.01
    assert sum(p.numel() for p in head["params"]) == sum(
        p.numel() for p in model.get_submodule(get_spec("baseline").head).parameters())
    adamw = build_optimizer(_schedule_args(lr=0.003), model, get_spec("baseline").head, 1.0)
    assert isinstance(adamw, torch.optim.AdamW) and [g["lr"] for g in adamw.param_groups] == [0.003, 0.003]


def test_step_schedule_and_sgd_in_a_run(tiny_dataset, tmp_path):
    out = tmp_path / "step"
    assert run(["--data", str(tiny_dataset), *TINY, "--epochs", "3", "--opt", "sgd", "--schedule", "step",
                "--step-size", "1", "--gamma", "0.5", "--warmup-epochs", "0", "--lr", "0.01", "--out", str(out)]) == 0
    with open(out / "history.csv") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == pytest.approx([0.01, 0.005, 0.0025])


def test_early_stopping_when_validation_macro_f1_stalls(tiny_dataset, tmp_path):
    out = tmp_path / "stalled"
    # A learning rate of zero: the first epoch's macro-F1 is never beaten.
    assert run(["--data", str(tiny_dataset), *TINY, "--epochs", "6", "--lr", "0", "--patience", "2",
                "--schedule", "constant", "--out", str(out), "--keep-checkpoints"]) == 0
    with open(out / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert safe_load(out / "last.pt")["state"]["early_stopped"]
    assert safe_load(out / "best.pt")["epoch"] == 1


@pytest.fixture(scope="module")
def interrupted_run(tiny_dataset, tmp_path_factory) -> Path:
    """A baseline run stopped after the first of two epochs: its last.pt is there to resume."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    assert run(["--data", str(tiny_dataset), *TINY, "--epochs", "2", "--stop-after", "1", "--out", str(out)]) == 0
    return out


def test_a_run_of_another_architecture_is_not_resumed(interrupted_run, tiny_dataset, capsys):
    out = interrupted_run
    other = [a if a != "baseline" else "resnet50" for a in TINY]
    assert run(["--data", str(tiny_dataset), *other, "--epochs", "2", "--resume", "--out", str(out)]) == 2
    assert "is a baseline run on classes ['alpha', 'beta']; it cannot resume this resnet50 run" in \
        capsys.readouterr().err


def test_without_a_validation_split_part_of_the_training_split_is_held_out(tmp_path, capsys):
    from synthetic import write_classes

    write_classes(tmp_path / "data" / "train", ["alpha", "beta"], 10)
    out = tmp_path / "run"
    assert run(["--data", str(tmp_path / "data"), *[a for a in TINY if a != "--quiet"], "--epochs", "1",
                "--val-fraction", "0.2", "--out", str(out)]) == 0
    assert "no validation split found: holding out part of the training split" in capsys.readouterr().err
    report = json.loads((out / "eval_report.json").read_text())
    assert report["images"] == 4  # 20% of each class


def test_a_class_without_training_images_is_refused(tmp_path, capsys):
    from synthetic import write_classes

    write_classes(tmp_path / "data" / "train", ["alpha"], 6)
    write_classes(tmp_path / "data" / "valid", ["alpha", "beta"], 3, start=50)
    assert run(["--data", str(tmp_path / "data"), *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "class(es) ['beta'] have no readable training images" in capsys.readouterr().err


def test_far_threshold_is_twice_the_99th_percentile():
    from training.foreign import far_threshold

    assert far_threshold(list(range(101))) == pytest.approx(2 * 99.0)


def test_patience_counts_epochs_since_the_last_improvement(tiny_dataset, tmp_path, monkeypatch):
    """Scripted validation macro-F1 0.5, 0.4, 0.6, 0.55, 0.5, 0.45 with patience 2: the improvement at epoch 3
    restarts the count, so the run stops after epoch 5, keeping epoch 3."""
    import training.trainer as trainer

    scripted = iter([0.5, 0.4, 0.6, 0.55, 0.5, 0.45])
    real = trainer.evaluation_report

    def report(*args, **kwargs):
        result = real(*args, **kwargs)
        return {**result, "macro_f1": next(scripted, result["macro_f1"])}

    monkeypatch.setattr(trainer, "evaluation_report", report)
    out = tmp_path / "run"
    assert run(["--data", str(tiny_dataset), *TINY, "--epochs", "6", "--patience", "2", "--out", str(out),
                "--keep-checkpoints"]) == 0
    state = safe_load(out / "last.pt")["state"]
    assert (state["epoch"], state["best_epoch"], state["early_stopped"]) == (5, 3, True)


def test_precision_and_memory_format_for_each_device():
    from training.engine import Precision, TrainingError, choose_precision

    cpu = torch.device("cpu")
    assert choose_precision("off", cpu).autocast_dtype is None
    assert choose_precision("bf16", cpu).autocast_dtype == torch.bfloat16
    assert choose_precision("bf16", cpu).describe() == "cpu, bf16 autocast, channels_last"
    assert Precision(cpu, None, channels_last=False).describe() == "cpu, fp32, contiguous"
    assert Precision(torch.device("cuda", 0), torch.float16).describe() == "cuda, fp16 autocast, channels_last"
    with pytest.raises(TrainingError, match=r"^fp16 autocast is for CUDA devices; use --amp bf16 or off on a CPU$"):
        choose_precision("fp16", cpu)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_precision_on_a_cpu_uses_bf16_only_where_it_is_fast(fast_bf16, monkeypatch):
    from training import engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert engine.choose_precision("auto", cpu) == engine.Precision(cpu, torch.bfloat16 if fast_bf16 else None)


def test_trained_weights_are_kept_channels_last(interrupted_run):
    state = safe_load(interrupted_run / "last.pt")["model"]
    convs = [t for t in state.values() if t.dim() == 4 and t.shape[-1] > 1]
    assert convs and all(t.is_contiguous(memory_format=torch.channels_last) for t in convs)


def test_slice_dataset_labels_are_class_indices_whatever_their_type():
    import numpy as np

    from training.engine import SliceDataset

    dataset = SliceDataset(torch.zeros(3, 1, 8, 8), np.array([0, 1, 1], np.int32))
    assert dataset.labels.dtype == torch.long and len(dataset) == 3 and dataset[2][1].item() == 1


@pytest.mark.parametrize("level", ["light", "medium", "strong"])
def test_augmentation_levels_jitter_brightness_and_contrast(level):
    from torchvision.transforms import v2

    from ctapp.preprocess import AUGMENT_LEVELS, train_augment

    (jitter,) = [t for t in train_augment(level).transforms if isinstance(t, v2.ColorJitter)]
    amount = AUGMENT_LEVELS[level][3]
    assert jitter.brightness == pytest.approx((1 - amount, 1 + amount))
    assert jitter.contrast == pytest.approx((1 - amount, 1 + amount))


@pytest.mark.parametrize("level", ["light", "medium", "strong", "acquisition", "detail", "export"])
def test_augmentation_levels_rotate_shift_zoom_and_flip_by_their_table(level):
    from torchvision.transforms import v2

    from ctapp.preprocess import AUGMENT_LEVELS, train_augment

    degrees, shift, zoom, _, flip, _ = AUGMENT_LEVELS[level]
    steps = train_augment(level).transforms
    (affine,) = [t for t in steps if isinstance(t, v2.RandomAffine)]
    (mirror,) = [t for t in steps if isinstance(t, v2.RandomHorizontalFlip)]
    assert list(affine.degrees) == [-degrees, degrees] and list(affine.translate) == [shift, shift]
    assert list(affine.scale) == list(zoom) and mirror.p == flip
    # The shift moves the picture: a bright dot's centre lands somewhere else, by at most the fraction.
    dot = torch.zeros(1, 65, 65)
    dot[0, 30:35, 30:35] = 1.0
    torch.manual_seed(1)
    centres = []
    for _ in range(20):
        out = v2.RandomAffine(degrees=0, translate=affine.translate)(dot)[0]
        ys, xs = torch.nonzero(out > 0.5, as_tuple=True)
        centres.append((ys.float().mean().item() - 32, xs.float().mean().item() - 32))
    assert max(max(abs(y), abs(x)) for y, x in centres) > 1 and all(
        abs(y) <= shift * 65 + 1 and abs(x) <= shift * 65 + 1 for y, x in centres)


def test_cuda_precision_follows_the_devices_bf16_support(monkeypatch):
    """No GPU needed: the choice reads only what the device supports."""
    from training.engine import Precision, choose_precision

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", cuda) == choose_precision("bf16", cuda) == Precision(cuda, torch.bfloat16)
    assert choose_precision("fp16", cuda) == Precision(cuda, torch.float16)  # asked for, even where bf16 runs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("auto", cuda).autocast_dtype == torch.float16
    assert choose_precision("bf16", cuda).autocast_dtype == torch.float16


def test_cores_are_shared_between_local_processes_unless_the_user_chose(monkeypatch):
    from training.engine import configure_threads

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    configure_threads(2)
    configure_threads(16)
    assert calls == [4, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    configure_threads(2)
    assert calls == [4, 1]


def one_epoch(model, images, labels, *, batch_size: int, lr: float, device=torch.device("cpu"), **kwargs) -> dict:
    """``train_one_epoch`` over (N, 1, 32, 32) images with SGD, fp32 and contiguous memory on a CPU device."""
    from torch.utils.data import DataLoader, TensorDataset

    from ctapp.preprocess import PreprocessConfig
    from training.engine import Precision, train_one_epoch

    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
    return train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=lr),
                           PreprocessConfig(img_size=32), Precision(device, None, channels_last=False), **kwargs)


def linear_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))  # normalize gives 3 channels


def test_an_epoch_reports_its_own_speed_and_loss():
    """A short epoch (well under a second) still gives images / its seconds."""
    torch.manual_seed(0)
    shown = []

    class Shown:
        def update(self, step, **values):
            shown.append((step, values))

    stats = one_epoch(create_model("baseline", 2), torch.rand(8, 1, 32, 32), torch.tensor([0, 1] * 4), batch_size=4,
                      lr=0.01, progress=Shown())
    # The status line shows the running mean loss per image; after the last batch, the epoch's.
    assert [step for step, _ in shown] == [1, 2]
    assert shown[-1][1]["loss"] == pytest.approx(stats["train_loss"]) and 0 < shown[0][1]["loss"] < 5
    assert 0 < stats["seconds"] < 1
    assert stats["images_per_second"] == pytest.approx(8 / stats["seconds"])
    assert stats["train_loss"] > 0 and 0 <= stats["train_accuracy"] <= 1


def test_an_epochs_labels_go_to_the_training_device():
    moved = []

    class Labels(torch.Tensor):
        def to(self, *args, **kwargs):
            moved.append(args[0])
            return self.as_subclass(torch.Tensor).to(*args, **kwargs)

    labels = torch.tensor([0, 1, 1, 0]).as_subclass(Labels)
    one_epoch(linear_model(), torch.rand(4, 1, 32, 32), labels, batch_size=4, lr=0.01, device=torch.device("cpu", 0))
    assert moved == [torch.device("cpu", 0)]


def test_a_batch_goes_to_the_training_device_in_its_memory_format():
    from ctapp.preprocess import PreprocessConfig
    from training.engine import Precision, to_input

    grey = torch.rand(2, 1, 32, 32)
    x = to_input(grey, PreprocessConfig(img_size=32), Precision(torch.device("meta"), None))  # any device but the CPU
    assert x.device.type == "meta" and x.shape == (2, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x = to_input(grey, PreprocessConfig(img_size=32), Precision(torch.device("cpu"), None, channels_last=False))
    assert x.device.type == "cpu" and x.is_contiguous()


def test_an_epochs_training_accuracy_and_loss_count_every_image():
    model = linear_model()
    torch.nn.init.zeros_(model[1].weight)
    model[1].bias.data = torch.tensor([1.0, 0.0])  # always class 0; lr 0 keeps it so
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])  # 3 of 4 right in the first batch, 1 of 4 in the second
    stats = one_epoch(model, torch.rand(8, 1, 32, 32), labels, batch_size=4, lr=0.0)
    assert stats["train_accuracy"] == 0.5
    # Batches of 3, 3 and 2: the epoch's loss is the mean over its 8 images, not over its 3 batches.
    stats = one_epoch(model, torch.rand(8, 1, 32, 32), labels, batch_size=3, lr=0.0)
    every_image = torch.nn.functional.cross_entropy(torch.tensor([[1.0, 0.0]]).repeat(8, 1), labels)
    assert stats["train_loss"] == pytest.approx(every_image.item(), rel=1e-6)


def test_an_epoch_with_a_gradient_scaler_steps_the_optimizer_through_it():
    """fp16 autocast on CUDA trains through a GradScaler; the CPU's scaler takes the same path."""
    torch.manual_seed(0)
    model = linear_model()
    before = model[1].weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    one_epoch(model, torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 0, 1]), batch_size=2, lr=0.1, scaler=scaler)
    assert not torch.equal(model[1].weight, before) and torch.isfinite(model[1].weight).all()
    assert scaler.get_scale() == 8.0  # no overflow: the scale held, the steps were taken unscaled


@pytest.mark.parametrize("tty", [False, True], ids=["log", "terminal"])
def test_the_status_line_shows_speed_and_time_left_of_a_slow_run(tty, monkeypatch, capsys):
    from training import engine

    clock = iter([1000.0, 1010.0, 1040.0, 1200.0])
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(engine.sys.stderr, "isatty", lambda: tty, raising=False)
    progress = engine.Progress(total=10, label="fold 2", every=30.0, initial=2)  # resumed after 2 batches
    progress.update(3, loss=0.75)  # 10 s in: a log only gets a line every 30 s
    progress.update(4, loss=0.5)  # 40 s in: 2 batches in 40 s, 6 left
    progress.update(10, loss=0.25)  # the last: always shown
    lines = [
        "fold 2 3/10 batches | 0.10 batch/s | left 1:10 loss 0.7500",
        "fold 2 4/10 batches | 0.05 batch/s | left 2:00 loss 0.5000",
        "fold 2 10/10 batches | 0.04 batch/s | left 0:00 loss 0.2500",
    ]
    err = capsys.readouterr().err
    if tty:  # redrawn in place, one line, ended when done
        assert err == "".join("\r" + line.ljust(100) for line in lines) + "\n"
    else:
        assert err == lines[1] + "\n" + lines[2] + "\n"


def test_a_diverging_loss_stops_training_with_where_and_what_to_change():
    from training.engine import TrainingError

    model = linear_model()
    model[1].bias.data = torch.tensor([float("nan"), 0.0])
    with pytest.raises(TrainingError) as stop:
        one_epoch(model, torch.rand(2, 1, 32, 32), torch.tensor([0, 1]), batch_size=2, lr=0.1, epoch=2)
    assert str(stop.value) == ("the loss became nan at epoch 3, batch 1: training diverged. Lower the learning rate "
                               "(--lr), or check the data for corrupt images")


def test_a_fast_runs_speed_counts_fractions_of_a_second(monkeypatch, capsys):
    from training import engine

    clock = iter([1000.0, 1000.25])
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(engine.sys.stderr, "isatty", lambda: False, raising=False)
    engine.Progress(total=200, label="evaluating", unit="image").update(200)
    assert capsys.readouterr().err == "evaluating 200/200 images | 800.00 image/s | left 0:00\n"


def test_a_resumed_runs_first_line_has_no_speed_yet(monkeypatch, capsys):
    from training import engine

    monkeypatch.setattr(engine.sys.stderr, "isatty", lambda: False, raising=False)
    engine.Progress(total=4, label="epochs", unit="epoch", initial=4).update(4)  # all done before the restart
    assert capsys.readouterr().err == "epochs 4/4 epochs | 0.00 epoch/s | left ?\n"


def test_autocast_runs_in_the_precision_it_was_given():
    from training.engine import Precision

    for dtype in (torch.bfloat16, torch.float16):
        with Precision(torch.device("cpu"), dtype).autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with Precision(torch.device("cpu"), None).autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_latency_is_the_median_over_repeats_on_one_512_px_slice():
    from training.card import measure_latency

    seen = []

    class Timed:
        def predict(self, image):
            seen.append(("predict", image.shape))

        def analyse(self, image):
            seen.append(("analyse", image.shape))

    latency = measure_latency(Timed(), repeat=3)
    assert seen == [("predict", (512, 512))] * 4 + [("analyse", (512, 512))] * 4  # one warm-up call each
    assert latency["image"] == "512x512" and latency["threads"] == torch.get_num_threads()
    assert 0 <= latency["predict"] < 1000 and 0 <= latency["predict_gradcam"] < 1000


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the project's git checkout")
def test_a_card_names_the_commit_of_the_code_that_trained_it():
    from ctapp import __version__
    from training.card import code_version

    version = code_version()
    assert version.startswith(f"ctapp {__version__} (") and version.endswith(")")
    sha = version.split("(")[1].rstrip(")")
    head = subprocess.run(["git", "log", "-1", "--format=%H"], cwd=ROOT, capture_output=True, text=True).stdout
    assert len(sha) >= 7 and head.startswith(sha)


def test_training_times_are_shown_as_minutes_or_hours():
    from training.engine import _duration

    assert [_duration(s) for s in (0, 59.9, 3599, 3600, 3725, float("inf"))] == \
        ["0:00", "0:59", "59:59", "1:00:00", "1:02:05", "?"]


def test_evaluating_files_counts_every_copy_unless_asked_to_dedupe(tiny_model, tiny_dataset, tmp_path):
    from ctapp.evaluation import evaluate_files

    image = next((tiny_dataset / "valid" / "beta").iterdir())
    shutil.copy(image, tmp_path / "copy.png")
    model = load_model(tiny_model)
    report, rows = evaluate_files(model, [image, tmp_path / "copy.png"], [1, 1], workers=1, root=tiny_dataset)
    assert report["images"] == 2 and report["duplicates_skipped"] == 0 and len(rows) == 2
    assert (report["model"], report["model_version"], report["arch"]) == (model.name, model.version, "baseline")
    assert model.version and report["states"] == Counter(row["state"] for row in rows)
    # Rows name files relative to the root; one outside it keeps its whole path.
    assert [row["path"] for row in rows] == [str(image.relative_to(tiny_dataset)), str(tmp_path / "copy.png")]
    report, rows = evaluate_files(model, [image, tmp_path / "copy.png"], [1, 1], workers=1, dedupe=True)
    assert report["images"] == 1 and report["duplicates_skipped"] == 1 and len(rows) == 1


def test_a_validation_split_of_one_image_still_validates_every_epoch(tmp_path):
    from synthetic import make_split_dataset

    data = make_split_dataset(tmp_path / "data", ["alpha", "beta"], train=8, valid=1)
    for extra in sorted((data / "valid").rglob("*.png"))[1:]:
        extra.unlink()
    out = tmp_path / "model"
    assert run(["--data", str(data), "--arch", "baseline", "--epochs", "2", "--img-size", "32", "--batch-size", "8",
                "--out", str(out), "--quiet", "--workers", "1"]) == 0
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [row["epoch"] for row in history] == ["1", "2"] and all(row["val_loss"] for row in history)
    assert json.loads((out / "eval_report.json").read_text())["images"] == 1
