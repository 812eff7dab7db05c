"""Self-supervised pretraining writes a backbone that training.fit starts from."""
from __future__ import annotations

import csv

import pytest
import torch
from synthetic import write_classes

from ctapp.models import create_model
from training.pretrain import BACKBONE_FILE, STATE_FILE, run

TINY = ["--img-size", "32", "--batch-size", "4", "--hidden", "32", "--workers", "1", "--warmup-epochs", "0",
        "--quiet"]


@pytest.mark.slow
def test_pretraining_writes_weights_that_fit_loads_and_starts_from(tmp_path):
    from training.fit import run as fit

    data = tmp_path / "data"
    write_classes(data, ["covid", "normal"], 4, size=40)
    out = tmp_path / "pretrained"
    assert run(["--data", str(data), "--arch", "resnet50", "--epochs", "2", "--stop-after", "1", "--out", str(out),
                *TINY]) == 0
    assert (out / STATE_FILE).is_file() and not (out / BACKBONE_FILE).exists()  # half done: nothing to load yet
    assert run(["--data", str(data), "--arch", "resnet50", "--epochs", "2", "--out", str(out), "--resume",
                *TINY]) == 0
    with open(out / "history.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    weights = torch.load(out / BACKBONE_FILE, weights_only=True)
    torch.manual_seed(0)
    initial = create_model("resnet50", 2).state_dict()  # pretraining's own start (seed 0)
    assert not torch.equal(weights["layer4.2.conv3.weight"], initial["layer4.2.conv3.weight"])  # it learnt
    assert not any(k.startswith("fc.") for k in weights)  # the backbone only: fit puts its own head on

    model = tmp_path / "model"
    assert fit(["--data", str(data), "--arch", "resnet50", "--weights", str(out / BACKBONE_FILE), "--epochs", "1",
                "--img-size", "64", "--batch-size", "4", "--val-fraction", "0.5", "--weight-storage", "fp32",
                "--workers", "1", "--quiet", "--out", str(model)]) == 0
    from ctapp.checkpoint import load_model_file

    trained, meta = load_model_file(model / "model.pt")
    # One epoch with the backbone frozen (the default with pretrained weights): its convolutions are the
    # pretrained ones, so fit loaded them rather than starting from a fresh initialisation.
    assert torch.equal(trained.state_dict()["layer4.2.conv3.weight"], weights["layer4.2.conv3.weight"])
    assert meta["train_args"]["weights"] == str(out / BACKBONE_FILE)


def test_a_fold_left_out_is_the_fits_evaluation_split_and_its_copies(tmp_path):
    from training.pretrain import get_args_parser, pretraining_images

    data = tmp_path / "data"
    write_classes(data, ["covid", "normal"], 6, size=40)
    copy = data / "normal" / "normal (0) copy.png"
    copy.write_bytes((data / "normal" / "normal (0).png").read_bytes())
    args = get_args_parser().parse_args(["--data", str(data), "--out", str(tmp_path / "p"), "--exclude-fold", "1",
                                         "--cv", "3", "--workers", "1"])
    from ctapp.preprocess import PreprocessConfig

    config = PreprocessConfig(img_size=32, crop="body", intensity="equalise")
    images, seen = pretraining_images(args, config, tmp_path / "p", lambda msg: None)
    with open(tmp_path / "p" / "folds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    held = [r for r in rows if r["fold"] == "1"]
    copies = any(r["path"].endswith("normal (0).png") for r in held)
    assert seen["evaluation_images_left_out"] == len(held) + copies  # the audit dropped the copy from the folds
    assert seen["slices"] == len(images) == 13 - len(held) - copies
    args.exclude_fold = 3
    with pytest.raises(Exception, match="needs --cv N with N >= 2 and 0 <= K < N"):
        pretraining_images(args, config, tmp_path / "p", lambda msg: None)


@pytest.mark.slow
def test_each_fold_of_a_cross_validation_starts_from_its_own_pretraining(tmp_path):
    from ctapp.checkpoint import load_model_file
    from training.fit import run as fit

    data = tmp_path / "data"
    write_classes(data, ["covid", "normal"], 6, size=48)
    for value, run_name in ((0.01, "fold-0"), (0.02, "fold-1"), (0.03, "full")):
        state = create_model("resnet50", 2).state_dict()
        state["conv1.weight"] = torch.full_like(state["conv1.weight"], value)  # marks the file
        (tmp_path / "pre" / run_name).mkdir(parents=True)
        torch.save({k: v for k, v in state.items() if not k.startswith("fc.")},
                   tmp_path / "pre" / run_name / BACKBONE_FILE)
    out = tmp_path / "model"
    # One epoch with the backbone frozen: each run's first convolution is still the one it started from.
    assert fit(["--data", str(data), "--cv", "2", "--arch", "resnet50", "--weights",
                str(tmp_path / "pre" / "{fold}" / BACKBONE_FILE), "--epochs", "1", "--img-size", "64",
                "--batch-size", "4", "--workers", "1", "--quiet", "--out", str(out)]) == 0
    for value, run_name in ((0.01, "fold-0"), (0.02, "fold-1"), (0.03, "full")):
        model, _ = load_model_file(out / "cv" / run_name / "model.pt")
        assert torch.allclose(model.conv1.weight, torch.full_like(model.conv1.weight, value), atol=1e-4), run_name
