"""Training pinned by hand: the best checkpoint is the epoch with the best
validation macro-F1 (not the last one), and the balanced loss weighs each class
by n / (k * n_c), which changes the gradient.

One short run of the baseline CNN on 32 px slices, with the validation macro-F1
scripted (0.4, 0.9, 0.6) so that the best epoch is known in advance: 2 of 3.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from synthetic import write_classes
from torch import nn

from ctapp.checkpoint import load_model_file, safe_load

SCRIPTED_F1 = [0.4, 0.9, 0.6]
BEST_EPOCH = 2
# 9 alpha and 3 beta training slices: weights 12 / (2 * 9) and 12 / (2 * 3)
TRAIN_COUNTS = {"alpha": 9, "beta": 3}
WEIGHTS_BY_HAND = [12 / 18, 12 / 6]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced") / "data"
    for i, (name, count) in enumerate(TRAIN_COUNTS.items()):
        paths = write_classes(root / "train", ["alpha", "beta"], count, seed=10 + i, size=32, start=100 * i)
        for path in paths:  # write_classes writes both classes; keep only this one's
            if path.parent.name != name:
                path.unlink()
    write_classes(root / "valid", ["alpha", "beta"], 2, seed=3, size=32, start=1000)
    return root


class Spy:
    """Wraps training.trainer's train_one_epoch (records the criterion and the weights
    after each epoch) and evaluation_report (replaces the macro-F1 with a script)."""

    def __init__(self, monkeypatch, scripted: list[float] | None):
        from training import trainer

        self.criteria: list[nn.Module] = []
        self.states: list[dict[str, torch.Tensor]] = []
        real_epoch, real_report = trainer.train_one_epoch, trainer.evaluation_report
        scores = iter(scripted or [])

        def train_one_epoch(*args, **kwargs):
            out = real_epoch(*args, **kwargs)
            self.criteria.append(args[2])
            self.states.append({k: v.detach().clone() for k, v in args[0].state_dict().items()})
            return out

        def evaluation_report(*args, **kwargs):
            report = real_report(*args, **kwargs)
            if scripted is not None:
                report["macro_f1"] = next(scores)
            return report

        monkeypatch.setattr(trainer, "train_one_epoch", train_one_epoch)
        monkeypatch.setattr(trainer, "evaluation_report", evaluation_report)


def fit_run(data: Path, out: Path, *extra: str) -> int:
    from training.fit import run

    return run(["--data", str(data), "--arch", "baseline", "--img-size", "32", "--batch-size", "4", "--epochs", "3",
                "--augment", "none", "--weight-storage", "fp32", "--out", str(out), "--quiet", "--workers", "1",
                "--keep-checkpoints", *extra])


@pytest.fixture(scope="module")
def scripted_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = Spy(monkeypatch, SCRIPTED_F1)
        assert fit_run(data, out) == 0
    return out, spy


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_best_checkpoint_is_the_epoch_with_the_best_validation_macro_f1_not_the_last(scripted_run):
    out, spy = scripted_run
    assert len(spy.states) == 3
    assert not _same_weights(spy.states[BEST_EPOCH - 1], spy.states[-1])  # the epochs really differ
    best, meta = load_model_file(out / "best.pt")
    assert meta["epoch"] == BEST_EPOCH and meta["metrics"]["macro_f1"] == 0.9
    assert _same_weights(best.state_dict(), spy.states[BEST_EPOCH - 1])
    last = safe_load(out / "last.pt")
    assert last["state"]["best_epoch"] == BEST_EPOCH and last["state"]["epoch"] == 3
    assert _same_weights(last["model"], spy.states[-1])


def test_shipped_model_and_card_come_from_the_best_epoch(scripted_run):
    import json

    out, spy = scripted_run
    shipped, meta = load_model_file(out / "model.pt")
    assert meta["epoch"] == BEST_EPOCH
    assert _same_weights(shipped.state_dict(), spy.states[BEST_EPOCH - 1])  # fp32 storage: exact
    card = json.loads((out / "model_card.json").read_text())
    assert card["training"]["best_epoch"] == BEST_EPOCH and card["training"]["epochs_run"] == 3
    with open(out / "history.csv", newline="") as f:
        history = [float(row["val_macro_f1"]) for row in csv.DictReader(f)]
    assert history == SCRIPTED_F1


def test_balanced_loss_weighs_classes_by_n_over_k_times_n_c(scripted_run):
    _, spy = scripted_run
    criterion = spy.criteria[0]
    assert isinstance(criterion, nn.CrossEntropyLoss)
    assert criterion.weight.tolist() == pytest.approx(WEIGHTS_BY_HAND)


def test_class_weights_change_the_gradient(scripted_run):
    _, spy = scripted_run
    criterion = spy.criteria[0]
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.8]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])

    def gradient(loss_fn) -> torch.Tensor:
        logits.grad = None
        loss_fn(logits, labels).backward()
        return logits.grad.clone()

    smoothing = criterion.label_smoothing
    by_hand = gradient(nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS_BY_HAND), label_smoothing=smoothing))
    unweighted = gradient(nn.CrossEntropyLoss(label_smoothing=smoothing))
    used = gradient(criterion)
    assert torch.allclose(used, by_hand, atol=1e-7)
    assert not torch.allclose(used, unweighted, atol=1e-3)


def test_class_weights_none_gives_an_unweighted_loss(data, tmp_path, monkeypatch):
    spy = Spy(monkeypatch, None)
    assert fit_run(data, tmp_path / "model", "--class-weights", "none", "--epochs", "2", "--stop-after", "1") == 0
    assert spy.criteria[0].weight is None
