"""The out-of-distribution check: pooled features of the backbone stages
(:class:`FeatureCapture`) and their Mahalanobis distances to the training
classes (:class:`MahalanobisOOD`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError


# Each stage output is pooled three ways for the out-of-distribution check, each
# its own detector: the mean (what the slice shows), the spread and the peak
# (how it was exported: a narrower window widens the spread, pasted arrows and
# text raise the peak). Measured on held-out lung slices (VGG19-BN, fold 0), at
# the same 5% of unseen CT flagged: narrow window 62% -> 82% flagged, arrows and
# text 12% -> 99%. A feature key is the layer's name, plus ":std" or ":max".
OOD_STATISTICS = ("", ":std", ":max")


def ood_feature_keys(layers: list[str]) -> list[str]:
    return [layer + statistic for layer in layers for statistic in OOD_STATISTICS]


def _pooled(out: torch.Tensor, statistic: str) -> torch.Tensor:
    if out.ndim != 4:
        return out.flatten(1)
    if statistic == ":std":
        return out.std(dim=(2, 3))
    if statistic == ":max":
        return out.amax(dim=(2, 3))
    return out.mean(dim=(2, 3))


class FeatureCapture:
    """While active, collects the globally pooled outputs of the named layers of
    every forward pass (the out-of-distribution check's features): a key is a
    layer name (mean pooling) or a layer name with ":std" or ":max"."""

    def __init__(self, model: nn.Module, keys: list[str]):
        self.keys_of: dict[str, list[str]] = {}
        for key in keys:
            self.keys_of.setdefault(key.split(":")[0], []).append(key)
        self.modules = {name: model.get_submodule(name) for name in self.keys_of}
        self.batches: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(_module, _args, output):
            out = output.detach().float()
            for key in self.keys_of[name]:
                self.batches[key].append(_pooled(out, key[len(name):]).cpu())
        return hook

    def __enter__(self) -> "FeatureCapture":
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def features(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts) for name, parts in self.batches.items() if parts}



@dataclass
class _ClassGaussians:
    """Class means and one shared covariance of one layer's features, after PCA."""

    mean: torch.Tensor
    components: torch.Tensor
    class_means: torch.Tensor
    precision: torch.Tensor
    scale: float = 1.0  # median distance of validation images

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, dims: int) -> "_ClassGaussians":
        from sklearn.covariance import LedoitWolf
        from sklearn.decomposition import PCA

        features = np.asarray(features, dtype=np.float64)
        pca = PCA(n_components=min(dims, features.shape[0] - 1, features.shape[1]), random_state=0).fit(features)
        z = pca.transform(features)
        classes = np.unique(labels)
        means = np.stack([z[labels == c].mean(axis=0) for c in classes])
        centred = z - means[np.searchsorted(classes, labels)]
        return cls(*(torch.as_tensor(a, dtype=torch.float64)
                     for a in (pca.mean_, pca.components_, means, LedoitWolf().fit(centred).precision_)))

    def distance(self, features) -> np.ndarray:
        """Smallest Mahalanobis distance (squared) to a class mean."""
        f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        z = (f - self.mean) @ self.components.T
        diff = z[:, None, :] - self.class_means[None]
        return torch.einsum("ncd,de,nce->nc", diff, self.precision, diff).min(dim=1).values.numpy()

    def to_dict(self) -> dict:
        return {"mean": self.mean.float(), "components": self.components.float(),
                "class_means": self.class_means.float(), "precision": self.precision.float(), "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> "_ClassGaussians":
        return cls(*(torch.as_tensor(d[k], dtype=torch.float64) for k in ("mean", "components", "class_means",
                                                                          "precision")), float(d["scale"]))


class MahalanobisOOD:
    """Out-of-distribution score from the features of every backbone stage.

    Per feature key (a stage, pooled by mean, spread or peak: :data:`OOD_STATISTICS`):
    the smallest Mahalanobis distance of an image's pooled features to a
    training-class mean (PCA to at most ``dims`` dimensions, one covariance
    shared by the classes), divided by that distance's median on validation
    images. Early layers notice intensity and texture unlike CT (photographs,
    radiographs, blank images, another window, pasted marks), the last one
    content unlike the training classes.

    Two scores answer two questions. Unlike the training images (``score``,
    against ``threshold``): the geometric mean of the keys' ratios, since a
    slice exported differently moves every key a little (a narrow window: each
    2-3x) and an unusual but genuine slice one key a lot. On held-out lung
    slices (VGG19-BN, 5 folds, threshold at 5% of unseen slices) the largest
    ratio flagged 42% of narrow-window slices, the geometric mean 85%; in
    ``benchmarks/shift.py`` confident mistakes under that shift fell from 25%
    to 9% (JPEG and noise, which move early keys only, rose from 7-8% to
    10-11%). Not a chest CT (``far_score``, against ``far_threshold``): the
    largest ratio, since a blank image, a photograph or a document is wildly
    unlike CT in some stage even where others look ordinary. Detectors saved
    with the largest ratio as their only score (``combine: "max"``, and every
    one saved before the field) keep it for both, with the thresholds fitted
    for it.
    """

    COMBINE = ("geometric mean", "max")

    def __init__(self, layers: dict[str, _ClassGaussians], threshold: float | None = None,
                 far_threshold: float | None = None, combine: str = "geometric mean"):
        if combine not in self.COMBINE:
            raise CheckpointError(f"unknown out-of-distribution combination {combine!r}; known: {self.COMBINE}")
        self.layers = layers
        self.threshold = threshold  # above: unlike the training images
        self.far_threshold = far_threshold  # above: not a chest CT at all
        self.combine = combine

    @classmethod
    def fit(cls, train_features: dict[str, np.ndarray], labels: np.ndarray,
            valid_features: dict[str, np.ndarray], dims: int = 64) -> "MahalanobisOOD":
        layers = {}
        for name, features in train_features.items():
            gaussians = _ClassGaussians.fit(features, np.asarray(labels), dims)
            gaussians.scale = max(float(np.median(gaussians.distance(valid_features[name]))), 1e-12)
            layers[name] = gaussians
        return cls(layers)

    def layer_scores(self, features: dict) -> dict[str, np.ndarray]:
        return {name: g.distance(features[name]) / g.scale for name, g in self.layers.items()}

    def scores(self, features: dict) -> tuple[np.ndarray, np.ndarray]:
        """Both scores from one pass over the keys: how unlike the training images
        (against ``threshold``) and how far from chest CT at all (against
        ``far_threshold``)."""
        ratios = np.stack(list(self.layer_scores(features).values()))
        far = np.max(ratios, axis=0)
        if self.combine == "max":
            return far, far
        return np.exp(np.mean(np.log(np.maximum(ratios, 1e-12)), axis=0)), far

    def score(self, features: dict) -> np.ndarray:
        return self.scores(features)[0]

    def far_score(self, features: dict) -> np.ndarray:
        return self.scores(features)[1]

    def to_dict(self) -> dict:
        return {"layers": {name: g.to_dict() for name, g in self.layers.items()}, "threshold": self.threshold,
                "far_threshold": self.far_threshold, "combine": self.combine}

    @classmethod
    def from_dict(cls, d: dict) -> "MahalanobisOOD":
        return cls({name: _ClassGaussians.from_dict(g) for name, g in d["layers"].items()}, d.get("threshold"),
                   d.get("far_threshold"), d.get("combine", "max"))


@dataclass(frozen=True)
class EnsembleGate:
    """How an ensemble weighs its members' out-of-distribution evidence.

    Not a chest CT: when ``not_ct`` of the members ("any", "majority": more than
    half, or "all") call the slice so. Unlike the training images: when the
    members' near ratios (each member's score over its own threshold) combined
    by ``unlike`` ("max", "mean", "geometric mean" or "min") exceed 1, or when
    some members call it not a chest CT, too few to say so for the ensemble.
    ``benchmarks/gate.py --rules`` compares the choices on out-of-fold rows, the
    foreign-image set and MosMed (docs/models.md#the-gate-both-ways).
    """

    not_ct: str = "all"
    unlike: str = "max"

    VOTES = ("any", "majority", "all")
    COMBINE = ("max", "mean", "geometric mean", "min")

    def __post_init__(self):
        if self.not_ct not in self.VOTES or self.unlike not in self.COMBINE:
            raise ValueError(f"unknown ensemble gate {self.not_ct!r}/{self.unlike!r}; "
                             f"votes: {self.VOTES}, combinations: {self.COMBINE}")

    def near_ratio(self, near_ratios) -> float:
        """The members' near ratios combined (NaN: a member without a check, left out)."""
        known = np.asarray([r for r in near_ratios if not np.isnan(r)], float)
        if not len(known):
            return float("nan")
        if self.unlike == "geometric mean":
            return float(np.exp(np.mean(np.log(np.maximum(known, 1e-12)))))
        return float({"max": np.max, "mean": np.mean, "min": np.min}[self.unlike](known))

    def flags(self, not_ct_votes, near_ratios) -> tuple[bool, bool]:
        """(not a chest CT, unlike the training images) of one input from its
        members' 'not a chest CT' votes and near ratios."""
        votes = sum(bool(v) for v in not_ct_votes)
        needed = {"any": 1, "majority": len(not_ct_votes) // 2 + 1, "all": len(not_ct_votes)}[self.not_ct]
        return votes >= max(needed, 1), votes > 0 or bool(self.near_ratio(near_ratios) > 1)


# Chosen on out-of-fold rows, the foreign-image set and MosMed (benchmarks/gate.py --rules). 'Not a chest
# CT' only when every member says so: no out-of-fold chest CT slice of the training sources is called so
# (the most severe member state called 0.7% of the lung and 0.4% of the COVID slices so), and every
# foreign image stays flagged. 'Unlike' on the largest ratio: a mean or geometric mean answered 1-2
# points more out-of-fold slices but more of them wrongly (lung 3.8% -> 4.3% confidently wrong), and let
# the COVID ensemble answer 9-17% of MosMed at about 22% accuracy, where the largest ratio answers none.
ENSEMBLE_GATE = EnsembleGate()
