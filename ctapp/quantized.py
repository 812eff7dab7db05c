"""An int8 copy of a network for CPUs without fast bf16 kernels, built at load
time from the shipped fp32 weights and the model folder's calibration file.

The calibration file (``quantization.json``, written by ``python -m
training.quantize``) holds the range of every activation the int8 network
quantizes, fitted on training slices of the model's own task through its own
preprocessing, and how far the int8 answers landed from fp32 on the slices of
its evaluation report (``agreement``). Weights are quantized per output
channel when the network is built, so no second copy of them is shipped.

The int8 graph (``torch.ao.quantization.quantize_fx``) returns the backbone
stages the out-of-distribution check reads next to the logits, dequantized;
:class:`Int8Network` passes them through identity modules at the fp32 model's
layer names, so that ``ood.FeatureCapture`` pools them as it pools the fp32
model's. Grad-CAM keeps using the fp32 model.
"""
from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write_text
from .preprocess import PreprocessConfig


CALIBRATION_FILE = "quantization.json"
CALIBRATION_FORMAT = "ctapp.quantization"
ENGINE = "x86"
# Activations use 7 of the 8 bits: fbgemm's AVX2 kernels (no VNNI) add pairs of
# uint8 x int8 products in 16 bits, which the full range can overflow.
ACTIVATION_RANGE = (0, 127)
LOGITS = "logits"


class CalibrationUnusable(ValueError):
    """A calibration file that cannot build the int8 network (message says why)."""


@contextmanager
def _quiet_quantize_fx():
    """torch 2.14 warns on use that torch.ao.quantization moves to torchao (not
    installed here, and not a dependency) and that quantized tensors will go with
    it; only those two notices are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
        yield


def _qconfig_mapping(activation_observer):
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    low, high = ACTIVATION_RANGE
    activation = activation_observer.with_args(dtype=torch.quint8, quant_min=low, quant_max=high)
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def stage_layers(feature_keys: list[str]) -> list[str]:
    """The layers behind out-of-distribution feature keys (``layer3:std`` -> ``layer3``), in order."""
    return list(dict.fromkeys(key.split(":")[0] for key in feature_keys))


def _prepared(model: nn.Module, head: str, layers: list[str], activation_observer, example: torch.Tensor):
    """The fp32 network traced to return its stages and logits, with observers in place."""
    from torch.ao.quantization.quantize_fx import prepare_fx
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.backends.quantized.engine = ENGINE
    graph = create_feature_extractor(model.eval(), return_nodes={**{layer: layer for layer in layers},
                                                                 head: LOGITS})
    with _quiet_quantize_fx():
        return prepare_fx(graph, _qconfig_mapping(activation_observer), (example,))


def _activation_observers(prepared: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Observer module name -> (the graph node it observes, the observer)."""
    from torch.ao.quantization.observer import ObserverBase

    modules = dict(prepared.named_modules())
    return {node.target: (node.args[0].name, modules[node.target]) for node in prepared.graph.nodes
            if node.op == "call_module" and isinstance(modules.get(node.target), ObserverBase)}


def calibrate(model: nn.Module, head: str, layers: list[str], batches) -> dict:
    """Activation ranges of ``model`` over ``batches`` of normalised inputs: the
    range each histogram observer settles on (the one that least distorts what it
    saw), written as the dequantized ends of its 8-bit grid."""
    from torch.ao.quantization.observer import HistogramObserver

    batches = list(batches)
    prepared = _prepared(model, head, layers, HistogramObserver, batches[0][:1])
    with torch.inference_mode():
        for batch in batches:
            prepared(batch)
    low, high = ACTIVATION_RANGE
    ranges = {}
    for name, (observed, observer) in _activation_observers(prepared).items():
        scale, zero_point = (float(v) for v in observer.calculate_qparams())
        ranges[name] = {"observes": observed, "range": [(low - zero_point) * scale, (high - zero_point) * scale]}
    return {"format": CALIBRATION_FORMAT, "torch": torch.__version__.split("+")[0], "engine": ENGINE,
            "activation_range": list(ACTIVATION_RANGE), "layers": layers,
            "slices": sum(len(b) for b in batches), "activations": ranges}


class Int8Network(nn.Module):
    """The int8 graph behind the fp32 model's interface: ``forward`` returns the
    logits, and each stage the out-of-distribution check reads passes through an
    identity module at its fp32 layer name (hooks there see it, dequantized)."""

    def __init__(self, graph: nn.Module, layers: list[str]):
        super().__init__()
        self.quantized = graph
        self.layers = list(layers)
        for layer in self.layers:
            *parents, leaf = layer.split(".")
            owner: nn.Module = self
            for part in parents:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.add_module(leaf, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.quantized(x)
        for layer in self.layers:
            self.get_submodule(layer)(outputs[layer])
        return outputs[LOGITS]


def build_int8(model: nn.Module, head: str, calibration: dict, example: torch.Tensor) -> Int8Network:
    """The int8 network of ``model`` with the activation ranges of ``calibration``;
    :class:`CalibrationUnusable` where they do not fit its graph."""
    from torch.ao.quantization.observer import MinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx

    if calibration.get("format") != CALIBRATION_FORMAT or not isinstance(calibration.get("activations"), dict):
        raise CalibrationUnusable(f"not a calibration file of this project (no '{CALIBRATION_FORMAT}' header)")
    if list(calibration.get("activation_range", [])) != list(ACTIVATION_RANGE):
        raise CalibrationUnusable(f"made for activations in {calibration.get('activation_range')}, "
                                  f"this version uses {list(ACTIVATION_RANGE)}")
    layers = list(calibration.get("layers") or [])
    prepared = _prepared(model, head, layers, MinMaxObserver, example)
    observers, saved = _activation_observers(prepared), calibration["activations"]
    wanted = {name: observed for name, (observed, _) in observers.items()}
    found = {name: entry.get("observes") for name, entry in saved.items() if isinstance(entry, dict)}
    if wanted != found:
        raise CalibrationUnusable(f"made for another graph ({len(found)} activations, this network has "
                                  f"{len(wanted)}; {next(iter(set(wanted.items()) ^ set(found.items())), '')}): "
                                  f"calibrated with torch {calibration.get('torch')}, rerun training.quantize")
    for name, (_, observer) in observers.items():
        low, high = (float(v) for v in saved[name]["range"])
        observer.min_val.fill_(low)
        observer.max_val.fill_(high)
    with _quiet_quantize_fx():
        graph = convert_fx(prepared)
    return Int8Network(graph, layers).eval()


def read_calibration(folder: Path | None) -> tuple[dict | None, str]:
    """A model folder's calibration, or None and why not (the reason the model answers in fp32)."""
    if folder is None or not Path(folder).is_dir():
        return None, "int8 needs a model folder with a calibration file; this model answers in fp32"
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None, (f"{Path(folder).name} has no {CALIBRATION_FILE} (python -m training.quantize makes it): "
                      "it answers in fp32")
    try:
        calibration = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: unreadable calibration file ({exc}): this model answers in fp32"
    if not isinstance(calibration, dict) or not calibration.get("activations"):
        return None, f"{path}: holds no activation ranges: this model answers in fp32"
    return calibration, ""


def write_calibration(folder: Path, calibration: dict) -> Path:
    path = Path(folder) / CALIBRATION_FILE
    atomic_write_text(json.dumps(calibration, indent=1) + "\n", path)
    return path


def load_int8(network: nn.Module, head: str, folder: Path | None, config: PreprocessConfig,
              feature_layers: list[str]) -> tuple[Int8Network | None, str]:
    """The int8 copy of ``network`` (a loaded model's fp32 network, its head's name,
    folder, PreprocessConfig and out-of-distribution stages) from the folder's
    calibration file, or None and why it answers in fp32 instead (also logged as a
    warning)."""
    calibration, reason = read_calibration(folder)
    if calibration is not None:
        example = torch.zeros(1, config.channels, config.img_size, config.img_size)
        try:
            if calibration.get("layers") != stage_layers(feature_layers):
                raise CalibrationUnusable(f"calibrated with the stages {calibration.get('layers')}, the "
                                          f"out-of-distribution check reads {stage_layers(feature_layers)}")
            return build_int8(network, head, calibration, example), ""
        except (CalibrationUnusable, KeyError, TypeError, ValueError) as exc:
            reason = f"{Path(folder) / CALIBRATION_FILE}: {exc}: this model answers in fp32"
    logging.getLogger(__name__).warning("int8 asked for: %s", reason)
    return None, reason
