"""Checkpoint format: round trips in every storage, refusals, atomic writes."""
import os
import pickle

import pytest
import torch
from bad_inputs import TouchMarker

from ctapp.checkpoint import (
    CheckpointError,
    atomic_save,
    load_model_file,
    pack_state,
    safe_load,
    save_model_file,
    sha256_file,
    unpack_state,
)
from ctapp.models import create_model
from ctapp.preprocess import PreprocessConfig

META = {"arch": "baseline", "class_names": ["a", "b", "c"], "preprocess": PreprocessConfig(img_size=48).to_dict()}


def trained_like_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("baseline", 3)
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("storage, tolerance", [("fp32", 0.0), ("fp16", 1e-2), ("int8", 5e-2)])
def test_round_trip(tmp_path, storage, tolerance):
    model = trained_like_model()
    path = tmp_path / "model.pt"
    save_model_file(path, model, {**META, "temperature": 1.5}, storage=storage)
    loaded, meta = load_model_file(path)
    assert meta["arch"] == "baseline" and meta["class_names"] == ["a", "b", "c"] and meta["temperature"] == 1.5
    assert meta["weight_storage"] == storage
    # The metadata is what the card and the app show: the tensors stay in the model.
    assert sorted(meta) == ["arch", "class_names", "format", "format_version", "preprocess", "temperature",
                            "weight_storage"]
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        expected, actual = torch.softmax(model(x), 1), torch.softmax(loaded(x), 1)
    assert (expected - actual).abs().max().item() <= tolerance + 1e-6


def test_a_distributed_wrapper_is_saved_as_the_network_inside_it(tmp_path):
    """Under torchrun the model is wrapped (DistributedDataParallel, like
    DataParallel, holds it as ``.module``); the file holds the bare network."""
    model = trained_like_model()
    save_model_file(tmp_path / "model.pt", torch.nn.DataParallel(model), META)
    loaded, _ = load_model_file(tmp_path / "model.pt")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_checkpoint_without_int8_scales_loads_as_fp16(tmp_path):
    """Only int8 storage needs the scales table: a file written without one (fp16 or fp32) loads the same."""
    model = trained_like_model()
    path = tmp_path / "model.pt"
    save_model_file(path, model, META, storage="fp16")
    payload = safe_load(path)
    assert payload.pop("quant_scales") == {}
    torch.save(payload, path)
    loaded, _ = load_model_file(path)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (torch.softmax(model(x), 1) - torch.softmax(loaded(x), 1)).abs().max().item() <= 1e-2


@pytest.mark.parametrize("storage, weights", [("fp16", torch.float16), ("int8", torch.int8)])
def test_every_weight_matrix_and_kernel_is_packed_and_small_tensors_kept_in_fp32(storage, weights):
    """Linear layers (2-D) are packed like convolution kernels (4-D); biases and
    batch-norm statistics (1-D) stay fp32; integer buffers stay as they are."""
    from ctapp.checkpoint import pack_state

    state = trained_like_model().state_dict()
    packed, scales = pack_state(state, storage)
    assert any(t.ndim == 2 for t in state.values()) and any(t.ndim == 4 for t in state.values())
    for name, tensor in state.items():
        expected = tensor.dtype if not tensor.is_floating_point() else weights if tensor.ndim >= 2 else torch.float32
        assert packed[name].dtype == expected, name
        assert (name in scales) == (storage == "int8" and tensor.is_floating_point() and tensor.ndim >= 2), name


def test_fp32_storage_stores_every_float_tensor_in_fp32():
    from ctapp.checkpoint import pack_state

    state = {"weight": torch.randn(4, 3, dtype=torch.float64), "bias": torch.randn(4).half(),
             "num_batches_tracked": torch.tensor(7)}
    packed, scales = pack_state(state, "fp32")
    assert {k: v.dtype for k, v in packed.items()} == {"weight": torch.float32, "bias": torch.float32,
                                                      "num_batches_tracked": torch.int64}
    assert scales == {} and torch.equal(packed["weight"], state["weight"].float())


def test_int8_is_about_a_quarter_of_fp32(tmp_path):
    model = create_model("resnet50", 4)
    save_model_file(tmp_path / "fp32.pt", model, {**META, "arch": "resnet50", "class_names": list("abcd")})
    save_model_file(tmp_path / "int8.pt", model, {**META, "arch": "resnet50", "class_names": list("abcd")},
                    storage="int8")
    ratio = (tmp_path / "int8.pt").stat().st_size / (tmp_path / "fp32.pt").stat().st_size
    assert 0.24 < ratio < 0.30


def test_int8_scales_are_per_output_channel():
    weight = torch.stack([torch.full((3, 3, 3), 0.001), torch.full((3, 3, 3), 10.0)])
    packed, scales = pack_state({"w": weight}, "int8")
    assert packed["w"].dtype == torch.int8 and scales["w"].shape == (2,)
    torch.testing.assert_close(unpack_state(packed, scales)["w"], weight, rtol=1e-2, atol=0)


def test_mismatched_architecture_or_classes_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_model_file(path, trained_like_model(), META)
    with pytest.raises(CheckpointError, match="is a baseline model, not resnet50"):
        load_model_file(path, arch="resnet50")
    with pytest.raises(CheckpointError, match="has 3 classes, not 4"):
        load_model_file(path, num_classes=4)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_model_file(path, create_model("baseline", 2), META)  # 2-class weights, 3 class names
    with pytest.raises(CheckpointError, match="do not fit a baseline with 3 classes"):
        load_model_file(path)


def test_other_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"hello": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_model_file(plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model_file(garbage)


def test_a_checkpoint_from_a_newer_format_or_a_missing_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_model_file(path, trained_like_model(), META)
    payload = safe_load(path)
    torch.save({**payload, "format_version": payload["format_version"] + 1}, path)
    with pytest.raises(CheckpointError, match=f"written by a newer version of this project \\(format "
                                              f"{payload['format_version'] + 1}\\)"):
        load_model_file(path)
    with pytest.raises(CheckpointError, match="gone.pt: no such checkpoint file"):
        load_model_file(tmp_path / "gone.pt")


@pytest.mark.parametrize("missing", ["arch", "class_names", "preprocess"])
def test_checkpoint_metadata_must_say_what_the_network_is(tmp_path, missing):
    with pytest.raises(ValueError, match=f"checkpoint metadata needs '{missing}'"):
        save_model_file(tmp_path / "model.pt", trained_like_model(), {k: v for k, v in META.items() if k != missing})
    assert not (tmp_path / "model.pt").exists()
    with pytest.raises(ValueError, match="weight storage must be one of"):
        pack_state(trained_like_model().state_dict(), "int4")


class ShellCommand:
    """Unpickling this object runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    refused = ("{}: refused: the file asks to load Python code or objects ({}), not just tensors and plain data; "
               "only checkpoints written by this project's training are loaded")
    for name, payload, words in [("touch.pt", TouchMarker(marker), "getattr"),
                                 ("shell.pt", ShellCommand(f"touch {marker}"), f"{os.system.__module__}.system")]:
        path = tmp_path / "evil" / name
        path.parent.mkdir(exist_ok=True)
        torch.save({"format": "ctapp.model", "payload": payload}, path)
        for load in (safe_load, load_model_file):
            with pytest.raises(CheckpointError) as refusal:
                load(path)
            assert str(refusal.value) == refused.format(path, words)
    # A newer pickle protocol is not read at all: refused before any object is built.
    path = tmp_path / "evil" / "protocol5.pt"
    torch.save({"format": "ctapp.model", "payload": ShellCommand(f"touch {marker}")}, path,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError) as refusal:
        load_model_file(path)
    assert str(refusal.value) == (f"{path}: not a readable checkpoint (corrupt, or not written by torch.save with its "
                                  "default settings: Unsupported operand 149)")
    assert not marker.exists()


def test_a_checkpoint_written_on_a_gpu_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    import torch.serialization

    path = tmp_path / "model.pt"
    model = trained_like_model()
    with monkeypatch.context() as gpu:  # torch.save records each tensor's device: as on a CUDA machine
        gpu.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_model_file(path, model, META)
    loaded, _ = load_model_file(path)  # without a GPU here, unless the load maps the tensors to the CPU
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_sha256_mismatch_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_model_file(path, trained_like_model(), META)
    load_model_file(path, expected_sha256=sha256_file(path))
    with pytest.raises(CheckpointError) as refusal:
        load_model_file(path, expected_sha256="0" * 64)
    assert str(refusal.value) == (f"{path}: refused: its SHA-256 ({sha256_file(path)}) does not match the model card "
                                  f"({'0' * 64}); the weights were changed or corrupted")
    # A card whose weights file is gone is refused the same way, not with an OSError.
    with pytest.raises(CheckpointError, match=r"its SHA-256 \(None\) does not match the model card"):
        load_model_file(tmp_path / "gone.pt", expected_sha256="0" * 64)


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"epoch": 2, "bad": Unsaveable()}, path)
    assert safe_load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
