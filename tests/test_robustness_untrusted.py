"""Issue 5, untrusted files: checkpoints carrying code, tampered or mismatched
weights and hostile folder paths are refused with a clear message, and the
code in a checkpoint never runs."""
from __future__ import annotations

import json
import os
import pathlib
import pickle

import pytest
import torch
from bad_inputs import TouchMarker
from tiny_models import tiny_network, write_model_folder

from ctapp.checkpoint import CheckpointError, load_model_file, safe_load, save_model_file, sha256_file
from ctapp.model_folders import load_model
from ctapp.paths import PathNotAllowed, resolve_data_folder


class ShellMarker:
    """Unpickling this object runs a shell command that creates the marker."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _payloads(marker: pathlib.Path, good: dict) -> dict[str, object]:
    return {
        "bare object": TouchMarker(marker),
        "shell command": ShellMarker(marker),
        # A real checkpoint with the code hidden in its metadata: the header
        # and the weights are fine, only one value is not plain data.
        "inside a valid checkpoint": {**good, "name": TouchMarker(marker)},
        "inside the state dict": {**good, "state_dict": {**good["state_dict"], "extra": ShellMarker(marker)}},
    }


@pytest.fixture
def good_payload(tmp_path):
    model, meta = tiny_network()
    save_model_file(tmp_path / "good.pt", model, meta)
    return safe_load(tmp_path / "good.pt")


@pytest.mark.parametrize("kind", ["bare object", "shell command", "inside a valid checkpoint", "inside the state dict"])
@pytest.mark.parametrize("pickles_allowed", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, good_payload, kind, pickles_allowed, monkeypatch):
    if pickles_allowed:  # torch honours it only where a caller left weights_only unset
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER"
    payload = _payloads(marker, good_payload)[kind]
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save(payload, folder / "model.pt")
    # The attacker controls the card too: a matching SHA-256 must not help.
    (folder / "model_card.json").write_text(json.dumps({"weights_sha256": sha256_file(folder / "model.pt")}))
    assert not marker.exists()

    with pytest.raises(CheckpointError, match="refused") as info:
        safe_load(folder / "model.pt")
    assert "code" in str(info.value)
    with pytest.raises(CheckpointError, match="refused"):
        load_model_file(folder / "model.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(folder / "model.pt")
    assert not marker.exists(), "the pickled code ran"

    # Control: the file really carries code (a plain torch.load runs it), so
    # the refusal above is what kept the marker away.
    torch.load(folder / "model.pt", weights_only=False)
    assert marker.exists()


def test_plain_pickle_with_code_is_refused(tmp_path):
    """A legacy (non-zip) pickle file, not written by torch.save."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"format": "ctapp.model", "x": TouchMarker(marker)}))
    with pytest.raises(CheckpointError):
        load_model_file(path)
    assert not marker.exists()


def test_tampered_weights_are_refused(tmp_path):
    folder = write_model_folder(tmp_path / "model")
    load_model(folder)  # as written: loads
    model, meta = tiny_network(seed=1)  # other weights, same architecture
    save_model_file(folder / "model.pt", model, meta)
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert "SHA-256" in message and "does not match the model card" in message and "changed or corrupted" in message


def test_one_flipped_byte_is_refused(tmp_path):
    folder = write_model_folder(tmp_path / "model")
    data = bytearray((folder / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the model card"):
        load_model(folder)


def test_truncated_checkpoint_is_refused(tmp_path):
    folder = write_model_folder(tmp_path / "model")
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model_file(folder / "model.pt")


def test_other_architecture_or_class_count_is_refused(tmp_path):
    model, meta = tiny_network(num_classes=2)
    save_model_file(tmp_path / "model.pt", model, meta)
    load_model_file(tmp_path / "model.pt", arch="baseline", num_classes=2)
    with pytest.raises(CheckpointError, match="is a baseline model, not resnet50"):
        load_model_file(tmp_path / "model.pt", arch="resnet50")
    with pytest.raises(CheckpointError, match="has 2 classes, not 4"):
        load_model_file(tmp_path / "model.pt", num_classes=4)


def test_weights_of_another_shape_are_refused(tmp_path):
    """Metadata claiming 2 classes over the weights of a 3-class model."""
    model3, _ = tiny_network(num_classes=3)
    _, meta2 = tiny_network(num_classes=2)
    save_model_file(tmp_path / "model.pt", model3, meta2)
    with pytest.raises(CheckpointError, match="do not fit a baseline with 2 classes") as refused:
        load_model_file(tmp_path / "model.pt")
    # torch's own first lines say which weight does not fit
    assert "size mismatch for classifier" in str(refused.value) and "torch.Size([3" in str(refused.value)


@pytest.mark.parametrize("damage", ["no arch", "format version text", "class names number", "one class",
                                    "state dict list", "non-tensor weight", "bad scales", "bad preprocess",
                                    "no preprocess", "unknown arch"])
def test_damaged_checkpoint_metadata_is_a_checkpoint_error(tmp_path, good_payload, damage):
    """Anything wrong inside a checkpoint is a CheckpointError, never a
    KeyError/TypeError from deep inside the loader."""
    good = good_payload
    payload = {
        "no arch": {k: v for k, v in good.items() if k != "arch"},
        "format version text": {**good, "format_version": "2"},
        "class names number": {**good, "class_names": 5},
        "one class": {**good, "class_names": ["only"]},
        "state dict list": {**good, "state_dict": [1, 2]},
        "non-tensor weight": {**good, "state_dict": {**good["state_dict"], "extra": 3}},
        "bad scales": {**good, "quant_scales": {"classifier.1.weight": torch.ones(7)}},
        "bad preprocess": {**good, "preprocess": {"img_size": 8}},
        "no preprocess": {k: v for k, v in good.items() if k != "preprocess"},
        "unknown arch": {**good, "arch": "alexnet"},
    }[damage]
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(CheckpointError):
        load_model_file(tmp_path / "model.pt")
    with pytest.raises(CheckpointError):
        load_model(tmp_path)


@pytest.mark.parametrize("card", ["[1, 2]", '"text"'])
def test_model_card_not_an_object_is_a_checkpoint_error(tmp_path, card):
    folder = write_model_folder(tmp_path / "model")
    (folder / "model_card.json").write_text(card)
    with pytest.raises(CheckpointError):
        load_model(folder)


def test_unreadable_model_card_is_refused(tmp_path):
    folder = write_model_folder(tmp_path / "model")
    (folder / "model_card.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable model card"):
        load_model(folder)


# ------------------------------------------------------------------ data folders


@pytest.fixture
def tree(tmp_path):
    """roots A and B; B/cases; outside/secret; A/escape -> outside; A/inner ->
    B/cases (a symlink that stays inside the roots); a symlink loop."""
    a, b, outside = tmp_path / "A", tmp_path / "B", tmp_path / "outside"
    (a / "sub").mkdir(parents=True)
    (b / "cases").mkdir(parents=True)
    (outside / "secret").mkdir(parents=True)
    (tmp_path / "A2").mkdir()  # a sibling whose name starts like root A
    (a / "escape").symlink_to(outside)
    (a / "inner").symlink_to(b / "cases")
    (a / "loop1").symlink_to(a / "loop2")
    (a / "loop2").symlink_to(a / "loop1")
    (a / "file.png").write_bytes(b"x")
    return tmp_path, [a, b]


@pytest.mark.parametrize("user_path, expected", [
    ("sub", "A/sub"),
    ("cases", "B/cases"),  # found under the second root
    (".", "A"),
    ("sub/../sub", "A/sub"),
    ("inner", "B/cases"),  # a symlink leading to another root is fine
    ("{root}/A/sub", "A/sub"),  # absolute, inside
])
def test_folder_inside_the_roots_is_accepted(tree, user_path, expected):
    base, roots = tree
    assert resolve_data_folder(user_path.format(root=base), roots) == (base / expected).resolve()


@pytest.mark.parametrize("user_path, words", [
    ("..", "outside the data folders"),
    ("../outside", "outside the data folders"),
    ("sub/../../outside/secret", "outside the data folders"),
    ("../A2", "outside the data folders"),  # same prefix, not inside
    ("escape", "outside the data folders"),  # symlink out of the root
    ("escape/secret", "outside the data folders"),
    ("{root}/outside/secret", "outside the data folders"),  # absolute, outside
    ("/etc", "outside the data folders"),
    ("missing", "no such folder"),
    ("file.png", "no such folder"),
    ("loop1", "loop1: not a usable folder path (a symbolic link loop)"),  # no server path, no errno
    ("a" * 5000, "not a usable folder path (File name too long)"),
    ("", "enter a folder path"),
    ("sub\x00", "enter a folder path"),
])
def test_folder_outside_the_roots_is_refused(tree, user_path, words):
    base, roots = tree
    with pytest.raises(PathNotAllowed) as info:
        resolve_data_folder(user_path.format(root=base), roots)
    assert words in str(info.value)
    assert str(base / "outside") not in str(info.value).split("(")[0] or user_path.startswith("{root}")
    if "not a usable" in words:  # the exception's own text (the server's real path) is not passed on
        assert str(base) not in str(info.value)


@pytest.mark.parametrize("length, shown", [(200, 200), (201, 200), (300, 200)])
def test_a_very_long_path_is_shortened_in_the_message(tmp_path, length, shown):
    path = ("ab/" * 100)[:length]
    with pytest.raises(PathNotAllowed) as err:
        resolve_data_folder(path, [tmp_path])
    assert str(err.value) == path[:shown] + ("..." if length > 200 else "") + ": no such folder"


def test_no_roots_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(tmp_path / "nonexistent"))
    with pytest.raises(PathNotAllowed, match="no data folders are configured"):
        resolve_data_folder("anything")


def test_roots_from_environment(tree, monkeypatch):
    base, roots = tree
    monkeypatch.setenv("CTAPP_DATA_ROOTS", os.pathsep.join(map(str, roots)))
    assert resolve_data_folder("cases") == (base / "B" / "cases").resolve()
    with pytest.raises(PathNotAllowed):
        resolve_data_folder(str(base / "outside"))


def test_without_configured_roots_the_shared_data_folder_beside_the_project_is_the_root(tmp_path, monkeypatch):
    from ctapp import paths

    monkeypatch.delenv("CTAPP_DATA_ROOTS", raising=False)
    monkeypatch.setattr(paths, "DEFAULT_DATA_ROOT", tmp_path)
    assert paths.data_roots() == [tmp_path.resolve()]
    monkeypatch.setattr(paths, "DEFAULT_DATA_ROOT", tmp_path / "missing")
    assert paths.data_roots() == []


def test_a_path_that_cannot_be_resolved_is_never_inside_the_roots(tree):
    from ctapp.paths import is_inside

    base, roots = tree
    assert not is_inside(base / "A" / "loop1", roots)  # a symlink loop: where it leads is unknown
    assert is_inside(base / "A" / "sub", roots)
