"""Architecture registry: one entry per model, naming its builder, its
classifier head, its Grad-CAM target layer and its backbone stages.

Weights are ``"none"`` (from scratch), ``"imagenet"`` (torchvision weights
API: downloaded once and cached under ``$TORCH_HOME``) or the path of a local
torchvision weight file (offline use).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn


class WeightsError(ValueError):
    """Pretrained weights that cannot be obtained or do not fit the architecture."""


class BaselineCNN(nn.Module):
    """A small, fast CNN (about 1.2 M parameters) to compare the large models against."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, out in enumerate((width, width * 2, width * 4, width * 8)):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _resnet_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))


def _vgg_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    # Global average pooling + one linear layer instead of VGG's 120 M-parameter
    # dense head: fits small datasets and keeps the checkpoint compact.
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes))


def _resnet_stages(model: nn.Module) -> list[nn.Module]:
    return [nn.ModuleList([model.conv1, model.bn1]), model.layer1, model.layer2, model.layer3, model.layer4]


def _vgg_stages(model: nn.Module) -> list[nn.Module]:
    stages, current = [], []
    for layer in model.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.ModuleList(current))
            current = []
    if current:
        stages.append(nn.ModuleList(current))
    return stages


def _resnet_feature_layers(model: nn.Module) -> list[str]:
    return ["layer1", "layer2", "layer3", "layer4"]


def _vgg_feature_layers(model: nn.Module) -> list[str]:
    """The end of every stage: each max-pool, and the last layer when it is not one."""
    last = len(model.features) - 1
    return [f"features.{i}" for i, layer in enumerate(model.features)
            if isinstance(layer, nn.MaxPool2d) or i == last]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    title: str
    builder: Callable[..., nn.Module]
    replace_head: Callable[[nn.Module, int, float], None] | None
    stages: Callable[[nn.Module], list[nn.Module]]
    head: str  # the classifier module; its input is the penultimate feature vector
    cam_layer: str  # Grad-CAM target layer
    feature_layers: Callable[[nn.Module], list[str]]  # stage outputs, low to high level (out-of-distribution check)
    imagenet_weights: str | None  # torchvision weights enum member, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    default_img_size: int = 128


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("resnet50", "ResNet-50", torchvision.models.resnet50, _resnet_head, _resnet_stages,
                 head="fc", cam_layer="layer4", feature_layers=_resnet_feature_layers, imagenet_weights="ResNet50_Weights.IMAGENET1K_V2"),
        # The last ReLU (14x14 at 224 px) gives sharper maps than the last max-pool.
        ArchSpec("vgg19", "VGG19", torchvision.models.vgg19, _vgg_head, _vgg_stages,
                 head="classifier", cam_layer="features.35", feature_layers=_vgg_feature_layers,
                 imagenet_weights="VGG19_Weights.IMAGENET1K_V1"),
        ArchSpec("vgg19_bn", "VGG19 (batch norm)", torchvision.models.vgg19_bn, _vgg_head, _vgg_stages,
                 head="classifier", cam_layer="features.51", feature_layers=_vgg_feature_layers,
                 imagenet_weights="VGG19_BN_Weights.IMAGENET1K_V1"),
        ArchSpec("baseline", "Baseline CNN", BaselineCNN, None, _vgg_stages,
                 head="classifier", cam_layer="features.26", feature_layers=_vgg_feature_layers,
                 imagenet_weights=None),
    )
}


def get_spec(arch: str) -> ArchSpec:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}") from None


def create_model(arch: str, num_classes: int, *, weights: str | Path = "none", dropout: float = 0.2) -> nn.Module:
    """Build ``arch`` with a ``num_classes`` head. ``weights``: "none", "imagenet" or a file path."""
    spec = get_spec(arch)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if spec.replace_head is None:  # our own network: no pretrained weights
        if str(weights) != "none":
            raise WeightsError(f"{spec.title} has no pretrained weights; use --weights none")
        return spec.builder(num_classes=num_classes, dropout=dropout)
    if str(weights) == "none":
        model = spec.builder(weights=None)
    elif str(weights) == "imagenet":
        model = _imagenet_model(spec)
    else:
        model = spec.builder(weights=None)
        _load_weight_file(model, spec, Path(weights))
    spec.replace_head(model, num_classes, dropout)
    return model


def _imagenet_model(spec: ArchSpec) -> nn.Module:
    enum_name, member = spec.imagenet_weights.split(".")
    weights = getattr(torchvision.models, enum_name)[member]
    try:
        return spec.builder(weights=weights)
    except Exception as exc:  # offline, proxy, corrupt cache...
        raise WeightsError(
            f"could not obtain ImageNet weights for {spec.title} ({exc}). Without internet access, download "
            f"{weights.url} on another machine and pass the file with --weights PATH, or use --weights none"
        ) from exc


def _load_weight_file(model: nn.Module, spec: ArchSpec, path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"{path}: no such weight file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable weight file ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a torchvision state dict of tensors")
    head_prefixes = (f"{spec.head}.",)
    backbone = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head_prefixes)}
    missing = sorted(set(own) - set(backbone))
    wrong_shape = sorted(k for k in set(own) & set(backbone) if own[k].shape != backbone[k].shape)
    if missing or wrong_shape:
        raise WeightsError(
            f"{path} does not hold {spec.title} weights: {len(missing)} layer(s) missing "
            f"(e.g. {missing[:3]}), {len(wrong_shape)} with another shape (e.g. {wrong_shape[:3]})"
        )
    model.load_state_dict(backbone, strict=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
