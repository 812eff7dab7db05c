"""Loading trained models and using them: prediction with calibrated
probabilities and an out-of-distribution check, and Grad-CAM explanations.

One :class:`LoadedModel` may be shared by many threads (the app caches one per
process): every forward pass holds the model's lock, so Grad-CAM hooks of one
request never see another request's activations.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, load_model_file
from .imaging import ImageSource, Slice, decode
from .metrics import calibrated
from .models import get_spec
from .preprocess import PreprocessConfig, cam_to_image, load_squares, model_input, normalize

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model_card.json"
REPORT_FILE = "eval_report.json"
MODELS_ENV = "CTAPP_MODELS_DIR"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def cam_methods() -> dict[str, type]:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    return {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMPlusPlus, "EigenCAM": EigenCAM,
            "HiResCAM": HiResCAM, "XGradCAM": XGradCAM, "LayerCAM": LayerCAM}


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


@torch.inference_mode()
def batched_forward(model: nn.Module, images: torch.Tensor, config: PreprocessConfig, *, batch_size: int = 64,
                    feature_layers: list[str] = (), device: torch.device | str = "cpu",
                    autocast=nullcontext, memory_format: torch.memory_format = torch.channels_last,
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits for cached (N, 1, S, S) grey squares, and the pooled outputs of
    ``feature_layers`` (feature key -> (N, C) array, see :class:`FeatureCapture`)."""
    model.eval()
    outputs = []
    with FeatureCapture(model, list(feature_layers)) as capture:
        for i in range(0, len(images), batch_size):
            x = normalize(images[i:i + batch_size].to(device), config).contiguous(memory_format=memory_format)
            with autocast():
                outputs.append(model(x).float().cpu())
    logits = torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)
    return logits, {name: f.numpy() for name, f in capture.features().items()}


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


# The states of an answer. Only CONFIDENT is a result; the others show the
# leaning class for reference only, in their own words.
CONFIDENT = "confident"
LOW_CONFIDENCE = "low confidence"
UNLIKE_TRAINING = "unlike the training images"
NOT_CHEST_CT = "not a chest CT"
NOT_CT_REASON = ("this does not look like a chest CT slice (blank, noise, photo, document or another body part): "
                 "no result")
UNLIKE_TRAINING_REASON = ("this looks like a CT slice unlike the training images (another scanner, hospital or "
                          "export?): the model may misread it")


@dataclass
class Prediction:
    label: str  # class key, e.g. "adenocarcinoma"
    display_label: str  # e.g. "Adenocarcinoma"
    probabilities: dict[str, float]  # class key -> calibrated probability
    confidence: float
    uncertain: bool  # any state but CONFIDENT: not a valid result
    out_of_distribution: bool  # UNLIKE_TRAINING or NOT_CHEST_CT
    ood_score: float | None
    reasons: list[str] = field(default_factory=list)  # why the result is flagged
    notes: list[str] = field(default_factory=list)  # how the image was read
    state: str = CONFIDENT  # CONFIDENT, NOT_CHEST_CT, UNLIKE_TRAINING or LOW_CONFIDENCE

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Analysis:
    """A prediction with its Grad-CAM over the original image and the decoded slice."""

    prediction: Prediction
    cam: np.ndarray  # (H, W) in [0, 1]
    cam_class: str
    image: Slice


@dataclass
class BatchScores:
    """Per input of a batch: calibrated and uncalibrated probabilities, OOD score
    (NaN without a check), answer state and its reasons; NaN rows and '' states
    where a file could not be read (its error then says why)."""

    probs: np.ndarray  # (N, C)
    raw_probs: np.ndarray  # (N, C), temperature 1
    ood_scores: np.ndarray  # (N,)
    states: list[str]
    reasons: list[list[str]]
    errors: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)

    def prediction(self, i: int, class_names: list[str], display_names: list[str], notes: list[str]) -> Prediction:
        """Input ``i`` as the :class:`Prediction` the app, the command line and reports show."""
        probs, state = self.probs[i], self.states[i]
        top = int(np.argmax(probs))
        return Prediction(label=class_names[top], display_label=display_names[top],
                          probabilities={name: float(p) for name, p in zip(class_names, probs)},
                          confidence=float(probs[top]), uncertain=state != CONFIDENT,
                          out_of_distribution=state in (NOT_CHEST_CT, UNLIKE_TRAINING),
                          ood_score=None if np.isnan(self.ood_scores[i]) else float(self.ood_scores[i]),
                          reasons=list(self.reasons[i]), notes=notes, state=state)


NO_BODY_NOTE = "no body found in the slice: left uncropped"


def slice_notes(notes: list[str], body_found: bool) -> list[str]:
    """How a slice was read, and whether the body crop found a body."""
    return list(notes) + ([] if body_found else [NO_BODY_NOTE])


def answer_state(input_state: str, confidence: float, threshold: float) -> tuple[str, list[str]]:
    """The state of an answer and its reasons, given what the input looked like
    (``NOT_CHEST_CT``, ``UNLIKE_TRAINING`` or ``CONFIDENT``) and the confidence
    against the model's threshold. An input state outranks low confidence."""
    reasons = {NOT_CHEST_CT: [NOT_CT_REASON], UNLIKE_TRAINING: [UNLIKE_TRAINING_REASON]}.get(input_state, [])
    state = input_state
    if confidence < threshold:
        state = LOW_CONFIDENCE if state == CONFIDENT else state
        reasons.append(f"low confidence: the top probability {confidence:.0%} is below {threshold:.0%}")
    return state, reasons


class LoadedModel:
    def __init__(self, model: nn.Module, meta: dict, path: Path | None = None, card: dict | None = None):
        self.meta = meta
        self.path = path
        self.card = card or {}
        self.arch = meta["arch"]
        self.spec = get_spec(self.arch)
        self.class_names: list[str] = list(meta["class_names"])
        self.display_names: list[str] = list(meta.get("display_names") or self.class_names)
        self.preprocess = PreprocessConfig.from_dict(meta["preprocess"])
        self.temperature = float(meta.get("temperature") or 1.0)
        self.ood = MahalanobisOOD.from_dict(meta["ood"]) if meta.get("ood") else None
        n = len(self.class_names)
        self.confidence_threshold = float(meta.get("confidence_threshold") or (0.5 + 0.5 / n))
        self.name = (path.name if path else None) or meta.get("name") or self.arch
        self.version = str(meta.get("created", ""))[:19]
        self._lock = threading.RLock()
        # Contiguous, not channels_last: one slice at a time, oneDNN's fp32 kernels were
        # measured 30% slower in channels_last here (ResNet-50, 128 px: 41 ms vs 28 ms).
        self.model = model.eval().to(memory_format=torch.contiguous_format)
        # Grad-CAM needs gradients at the target layer only: enabling them on the
        # last backbone parameter keeps the backward pass to the head and one layer.
        for p in self.model.parameters():
            p.requires_grad_(False)
        backbone = [p for name, p in self.model.named_parameters() if not name.startswith(self.spec.head + ".")]
        backbone[-1].requires_grad_(True)
        self.feature_layers = list(self.ood.layers) if self.ood is not None else []
        self.cam_layer = self.model.get_submodule(meta.get("cam_layer") or self.spec.cam_layer)

    # -- shared forward -----------------------------------------------------
    def _decode(self, image: ImageSource | Slice) -> Slice:
        return image if isinstance(image, Slice) else decode(image, window=self.preprocess.window)

    def assess(self, confidence: float, ood_score: float | None, body_found: bool = True,
               far_score: float | None = None) -> tuple[str, list[str]]:
        """The state of an answer and the reasons behind it: the one rule shared by
        the app, the command line and evaluation reports.

        Not a chest CT: the body crop found no body, or the far score (the OOD
        score where none is given) is beyond anything chest CT scored
        (``ood.far_threshold``). Unlike the training images: the OOD score is
        beyond the usual range of unseen chest CT slices (``ood.threshold``).
        Low confidence: below the threshold chosen on out-of-fold predictions.
        """
        far = self.ood.far_threshold if self.ood is not None else None
        near = self.ood.threshold if self.ood is not None else None
        far_score = ood_score if far_score is None else far_score
        if not body_found or (far_score is not None and far is not None and far_score > far):
            input_state = NOT_CHEST_CT
        elif ood_score is not None and near is not None and ood_score > near:
            input_state = UNLIKE_TRAINING
        else:
            input_state = CONFIDENT
        return answer_state(input_state, confidence, self.confidence_threshold)

    def _scores(self, logits, features: dict, body_found: list[bool]) -> BatchScores:
        probs = calibrated(logits, self.temperature)
        ood, far = self.ood.scores(features) if self.ood is not None else (np.full(len(probs), np.nan),) * 2
        assessed = [self.assess(float(probs[i].max()), None if np.isnan(ood[i]) else float(ood[i]), body_found[i],
                                None if np.isnan(far[i]) else float(far[i])) for i in range(len(probs))]
        return BatchScores(probs, calibrated(logits, 1.0), np.asarray(ood, float),
                           [state for state, _ in assessed], [reasons for _, reasons in assessed])

    def score_slice(self, image: ImageSource | Slice) -> tuple[BatchScores, bool]:
        """One slice's scores (a batch of one) and whether its body crop found a body."""
        image = self._decode(image)
        x, geometry = model_input(image.pixels, self.preprocess)
        with self._lock, torch.inference_mode(), FeatureCapture(self.model, self.feature_layers) as capture:
            logits = self.model(x)
        return self._scores(logits.float(), capture.features(), [geometry.body_found]), geometry.body_found

    def predict(self, image: ImageSource | Slice) -> Prediction:
        """Label and calibrated probabilities of every class for one slice."""
        image = self._decode(image)
        scores, body_found = self.score_slice(image)
        return scores.prediction(0, self.class_names, self.display_names, slice_notes(image.notes, body_found))

    def forward_batch(self, images: torch.Tensor, batch_size: int = 32,
                      on_progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Raw logits and the out-of-distribution features of cached (N, 1, S, S) grey squares.

        The model's lock is taken per chunk of ``batch_size`` images, not for
        the whole call, so one user's long evaluation lets other users'
        predictions through between chunks.
        """
        chunks = []
        for start in range(0, max(len(images), 1), batch_size):
            with self._lock:
                chunks.append(batched_forward(self.model, images[start:start + batch_size], self.preprocess,
                                              batch_size=batch_size, feature_layers=self.feature_layers,
                                              memory_format=torch.contiguous_format))
            if on_progress:
                on_progress(min(start + batch_size, len(images)), len(images))
            # Python's locks are not fair: without a pause this thread takes the lock straight
            # back and a waiting predict() starves (measured: waits of 2 s instead of one chunk).
            time.sleep(0.001)
        if len(chunks) == 1:
            return chunks[0]
        logits = np.concatenate([chunk_logits for chunk_logits, _ in chunks])
        features = {name: np.concatenate([chunk_features[name] for _, chunk_features in chunks])
                    for name in chunks[0][1]}
        return logits, features

    def score_squares(self, images: torch.Tensor, body_found: list[bool], batch_size: int = 32,
                      on_progress: Callable[[int, int], None] | None = None) -> BatchScores:
        """Calibrated probabilities, OOD scores and answer states of prepared
        (N, 1, S, S) input squares (``to_square``): the same answers as
        :meth:`predict` gives one slice at a time, batched and without Grad-CAM."""
        logits, features = self.forward_batch(images, batch_size, on_progress=on_progress)
        return self._scores(logits, features, body_found)

    def score_files(self, paths: list[Path], *, workers: int = 2,
                    on_progress: Callable[[int, int], None] | None = None) -> BatchScores:
        """:meth:`score_squares` of many files (evaluation reports), with each
        file's read error and SHA-256."""
        loaded = load_squares(paths, self.preprocess, workers=workers, on_progress=on_progress)
        ok = [i for i, error in enumerate(loaded.errors) if not error]
        n, k = len(paths), len(self.class_names)
        scores = BatchScores(np.full((n, k), np.nan), np.full((n, k), np.nan), np.full(n, np.nan), [""] * n,
                             [[] for _ in range(n)], loaded.errors, loaded.digests)
        if not ok:
            return scores
        part = self.score_squares(loaded.images[ok], [loaded.geometries[i].body_found for i in ok])
        scores.probs[ok], scores.raw_probs[ok], scores.ood_scores[ok] = part.probs, part.raw_probs, part.ood_scores
        for j, i in enumerate(ok):
            scores.states[i], scores.reasons[i] = part.states[j], part.reasons[j]
        return scores

    def class_index(self, target: int | str | None) -> int | None:
        if target is None or isinstance(target, int):
            return target
        for names in (self.class_names, self.display_names):
            if target in names:
                return names.index(target)
        raise ValueError(f"unknown class {target!r}; this model knows {self.class_names}")

    def analyse(self, image: ImageSource | Slice, target: int | str | None = None,
                method: str = "Grad-CAM") -> Analysis:
        """Prediction and a class-activation map in one forward and one short backward pass.

        The map explains the predicted class unless ``target`` names another.
        """
        image = self._decode(image)
        scores, body_found, heat, cam_index = self.scored_cam(image, self.class_index(target), method)
        prediction = scores.prediction(0, self.class_names, self.display_names, slice_notes(image.notes, body_found))
        return Analysis(prediction, heat, self.class_names[cam_index], image)

    def scored_cam(self, image: Slice, index: int | None, method: str = "Grad-CAM",
                   ) -> tuple[BatchScores, bool, np.ndarray, int]:
        """A decoded slice's scores, whether the body crop found a body, and the
        map of class ``index`` (None: the top class) with that class's index."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        methods = cam_methods()
        if method not in methods:
            raise ValueError(f"unknown CAM method {method!r}; choose one of {list(methods)}")
        x, geometry = model_input(image.pixels, self.preprocess)
        with self._lock:
            try:
                with FeatureCapture(self.model, self.feature_layers) as capture, \
                        methods[method](model=self.model, target_layers=[self.cam_layer]) as cam:
                    # None explains the top class (the prediction).
                    targets = None if index is None else [ClassifierOutputTarget(index)]
                    maps = cam(input_tensor=x, targets=targets)
                    logits = cam.outputs.detach()
            finally:
                self.model.zero_grad(set_to_none=True)
        scores = self._scores(logits.float(), capture.features(), [geometry.body_found])
        cam_index = index if index is not None else int(np.argmax(scores.probs[0]))
        return scores, geometry.body_found, np.clip(cam_to_image(maps[0], geometry), 0.0, 1.0), cam_index

    def explain(self, image: ImageSource | Slice, target: int | str | None = None,
                method: str = "Grad-CAM") -> np.ndarray:
        """Grad-CAM heat map (H, W) in [0, 1] at the image's own resolution."""
        return self.analyse(image, target, method).cam


def _read_card(folder: Path) -> dict:
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        return {}
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{card_path}: unreadable model card ({exc})") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path}: a model card must be a JSON object, found {type(card).__name__}")
    return card


ENSEMBLE_FILE = "ensemble.json"


def ensemble_logits(member_probs) -> np.ndarray:
    """Log of the mean of the members' probabilities (members on the first axis)."""
    return np.log(np.clip(np.mean(member_probs, axis=0), 1e-12, None))


def ensemble_probabilities(member_probs, temperature: float = 1.0) -> np.ndarray:
    """The mean of the members' probabilities, sharpened or softened by ``temperature``
    (1.0: the plain mean); one input (C,) or a batch (N, C) per member."""
    logits = ensemble_logits(member_probs)
    return calibrated(np.atleast_2d(logits), temperature).reshape(logits.shape)


# The order of severity when members disagree on an answer's state.
SEVERITY = {CONFIDENT: 0, LOW_CONFIDENCE: 1, UNLIKE_TRAINING: 2, NOT_CHEST_CT: 3}


class EnsembleModel:
    """Several models of one task answering as one, used wherever a model is.

    Its probabilities are the mean of the members' calibrated probabilities,
    rescaled by a temperature of its own (``softmax(log(mean) / T)``, fitted on
    out-of-fold predictions: the mean is less confident than its members, ECE
    0.11 on the lung pair untempered); its out-of-distribution check is the
    members' (a slice any member finds unlike its training images, or not a
    chest CT, is flagged so); its confidence
    threshold is its own, fitted on out-of-fold predictions like a member's; its
    Grad-CAM is the mean of the members' maps over the original pixels, or one
    named member's (``explain_with`` in ``ensemble.json``).
    """

    arch = "ensemble"
    ood = None

    def __init__(self, members: list[LoadedModel], spec: dict, path: Path | None = None, card: dict | None = None):
        if len(members) < 2:
            raise CheckpointError(f"{path}: an ensemble needs at least two members, found {len(members)}")
        first = members[0]
        for m in members[1:]:
            if m.class_names != first.class_names:
                raise CheckpointError(f"{path}: member {m.name} has classes {m.class_names}, "
                                      f"{first.name} has {first.class_names}: not one task")
        self.members, self.spec, self.path, self.card = members, spec, path, card or {}
        self.class_names, self.display_names = list(first.class_names), list(first.display_names)
        self.preprocess = first.preprocess
        n = len(self.class_names)
        self.confidence_threshold = float(spec.get("confidence_threshold") or (0.5 + 0.5 / n))
        self.temperature = float(spec.get("temperature") or 1.0)
        self.name = (path.name if path else None) or spec.get("name") or "ensemble"
        self.version = str(spec.get("created", ""))[:19]
        self.explain_with = spec.get("explain_with")
        if self.explain_with and self.explain_with not in [m.name for m in members]:
            raise CheckpointError(f"{path}: explain_with names {self.explain_with!r}, not a member")

    def mean_probabilities(self, probs) -> np.ndarray:
        """The members' calibrated probabilities (member first) -> the ensemble's."""
        return ensemble_probabilities(probs, self.temperature)

    def _state(self, probs: np.ndarray, states: list[str]) -> tuple[str, list[str]]:
        """One input's state from the ensemble's probabilities and its members' states."""
        worst = max(states, key=SEVERITY.get)
        input_state = worst if worst in (NOT_CHEST_CT, UNLIKE_TRAINING) else CONFIDENT
        return answer_state(input_state, float(probs.max()), self.confidence_threshold)

    def combine(self, parts: list[BatchScores]) -> BatchScores:
        """The members' scores of the same inputs, in member order -> the
        ensemble's: mean probabilities, the largest OOD score relative to its
        member's threshold, the most severe input state and its own threshold."""
        n = len(parts[0].states)
        errors = [next((p.errors[i] for p in parts if p.errors and p.errors[i]), "") for i in range(n)]
        ratios = np.stack([p.ood_scores / m.ood.threshold if m.ood is not None and m.ood.threshold else
                           np.full(n, np.nan) for p, m in zip(parts, self.members)])
        probs = self.mean_probabilities([p.probs for p in parts])
        states, reasons = [""] * n, [[] for _ in range(n)]
        for i in range(n):
            if not errors[i]:
                states[i], reasons[i] = self._state(probs[i], [p.states[i] for p in parts])
        return BatchScores(probs, np.mean([p.raw_probs for p in parts], axis=0),
                           np.full(n, np.nan) if np.isnan(ratios).all() else np.nanmax(ratios, axis=0),
                           states, reasons, errors, parts[0].digests)

    def _decode(self, image: ImageSource | Slice) -> Slice:
        return self.members[0]._decode(image)  # members share the first one's preprocessing

    def predict(self, image: ImageSource | Slice) -> Prediction:
        image = self._decode(image)
        return self._prediction(image, [m.score_slice(image) for m in self.members])

    def _prediction(self, image: Slice, runs: list[tuple]) -> Prediction:
        """One slice's answer from its members' runs, each (scores, body found, ...)."""
        scores = self.combine([run[0] for run in runs])
        notes = slice_notes(image.notes, all(run[1] for run in runs))
        return scores.prediction(0, self.class_names, self.display_names, notes)

    def class_index(self, target: int | str | None) -> int | None:
        return self.members[0].class_index(target)

    def analyse(self, image: ImageSource | Slice, target: int | str | None = None,
                method: str = "Grad-CAM") -> Analysis:
        """The ensemble's prediction, and a map of the class it predicts (or
        ``target``): the members' maps averaged, or the named member's."""
        image = self._decode(image)
        index = self.class_index(target)
        explainers = [m for m in self.members if m.name == self.explain_with] or self.members
        # One pass per member: an explainer's map of its own top class (or ``target``) comes
        # with its scores, and is redrawn only where that class is not the ensemble's.
        runs = [m.scored_cam(image, index, method) if m in explainers else (*m.score_slice(image), None, None)
                for m in self.members]
        prediction = self._prediction(image, runs)
        cam_index = index if index is not None else self.class_names.index(prediction.label)
        maps = [heat if drawn == cam_index else m.scored_cam(image, cam_index, method)[2]
                for m, (_, _, heat, drawn) in zip(self.members, runs) if m in explainers]
        return Analysis(prediction, np.mean(maps, axis=0), self.class_names[cam_index], image)

    def explain(self, image: ImageSource | Slice, target: int | str | None = None,
                method: str = "Grad-CAM") -> np.ndarray:
        return self.analyse(image, target, method).cam

    def score_files(self, paths: list[Path], *, workers: int = 2,
                    on_progress: Callable[[int, int], None] | None = None) -> BatchScores:
        return self.combine([m.score_files(paths, workers=workers, on_progress=on_progress if i == 0 else None)
                             for i, m in enumerate(self.members)])


def load_model(path: str | os.PathLike) -> LoadedModel | EnsembleModel:
    """Load a model folder (``model.pt`` plus ``model_card.json``), an ensemble
    folder (``ensemble.json`` naming member folders) or a checkpoint file.

    The weights' SHA-256 is checked against the model card when the card records it.
    """
    path = Path(path)
    if path.is_dir() and (path / ENSEMBLE_FILE).is_file():
        return load_ensemble(path)
    folder, weights = (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)
    if not weights.is_file():
        raise CheckpointError(f"{path}: no model here (expected {WEIGHTS_FILE} in the folder)")
    card = _read_card(folder) if weights.name == WEIGHTS_FILE else {}
    model, meta = load_model_file(weights, expected_sha256=card.get("weights_sha256"))
    return LoadedModel(model, meta, path=folder if weights.name == WEIGHTS_FILE else weights, card=card)


def read_ensemble_spec(folder: Path) -> tuple[dict, list[Path]]:
    """An ensemble folder's ``ensemble.json`` and its member folders, given there
    relative to the ensemble's own folder (e.g. ``../lung-resnet50``)."""
    try:
        spec = json.loads((folder / ENSEMBLE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / ENSEMBLE_FILE}: unreadable ensemble description ({exc})") from None
    members = spec.get("members") if isinstance(spec, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise CheckpointError(f"{folder / ENSEMBLE_FILE}: needs a list of member folders under 'members'")
    return spec, [(folder / member).resolve() for member in members]


def load_ensemble(folder: Path) -> EnsembleModel:
    """An ensemble folder: ``ensemble.json`` lists its members (:func:`read_ensemble_spec`)."""
    spec, members = read_ensemble_spec(folder)
    loaded = []
    for name, member_path in zip(spec["members"], members):
        if (member_path / ENSEMBLE_FILE).is_file():
            raise CheckpointError(f"{folder / ENSEMBLE_FILE}: member {name} is an ensemble itself")
        loaded.append(load_model(member_path))
    return EnsembleModel(loaded, spec, path=folder, card=_read_card(folder))


def model_stamp(folder: str | Path) -> float:
    """Modification time of what defines the model in ``folder`` (its weights, or an
    ensemble's description): part of every cache key of the app."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, ENSEMBLE_FILE):
        try:
            return (folder / name).stat().st_mtime
        except OSError:
            continue
    return 0.0


@dataclass
class ModelEntry:
    path: Path
    name: str
    card: dict

    @property
    def task(self) -> str:
        return self.card.get("task") or "/".join(self.card.get("classes", [])) or "unknown task"

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE


def model_dirs() -> list[Path]:
    dirs = [DEFAULT_MODELS_DIR]
    extra = os.environ.get(MODELS_ENV, "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


def list_models(dirs: list[Path] | None = None) -> list[ModelEntry]:
    """Every model folder (holding ``model.pt`` or ``ensemble.json``) directly under the model directories."""
    found, seen = [], set()
    for root in dirs if dirs is not None else model_dirs():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir()
                             if (p / WEIGHTS_FILE).is_file() or (p / ENSEMBLE_FILE).is_file()):
            key = folder.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                card = _read_card(folder)
            except CheckpointError:
                card = {}
            found.append(ModelEntry(folder, card.get("name", folder.name), card))
    return found
