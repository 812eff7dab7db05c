"""Using trained models: prediction with calibrated probabilities, the answer state (with the
out-of-distribution check of ``ctapp.ood`` and the scope check of ``ctapp.scope``) and Grad-CAM
explanations, for one model or an ensemble. ``ctapp.model_folders`` loads them.

One :class:`LoadedModel` may be shared by many threads (the app caches one per
process): every forward pass holds the model's lock, so Grad-CAM hooks of one
request never see another request's activations.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError
from .imaging import ImageDecodeError, ImageSource, Slice, decode
from .metrics import calibrated
from .models import get_spec
from .ood import ENSEMBLE_GATE, EnsembleGate, FeatureCapture, MahalanobisOOD
from .precision import Precision, inference_precision
from .preprocess import (InputCheck, PreprocessConfig, asked_once, cam_to_image, load_squares, model_input, normalize,
                         to_square)
from .quantized import load_int8


def cam_methods() -> dict[str, type]:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    return {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMPlusPlus, "EigenCAM": EigenCAM,
            "HiResCAM": HiResCAM, "XGradCAM": XGradCAM, "LayerCAM": LayerCAM}


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


# The states of an answer. Only CONFIDENT is a result; the others show the
# leaning class for reference only, in their own words.
CONFIDENT = "confident"
LOW_CONFIDENCE = "low confidence"
UNLIKE_TRAINING = "unlike the training images"
NOT_CHEST_CT = "not a chest CT"
OTHER_FINDING = "another finding"  # what the model was not trained for (ctapp.scope)
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
    state: str = CONFIDENT  # CONFIDENT, NOT_CHEST_CT, UNLIKE_TRAINING, LOW_CONFIDENCE or OTHER_FINDING

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
    """Per input of a batch: calibrated and uncalibrated probabilities, OOD score (NaN without a check), answer
    state and its reasons, and whether the body crop found a body; NaN rows and '' states where a file could not
    be read (its error then says why)."""

    probs: np.ndarray  # (N, C)
    raw_probs: np.ndarray  # (N, C), temperature 1
    ood_scores: np.ndarray  # (N,)
    states: list[str]
    reasons: list[list[str]]
    errors: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    body_found: list[bool] = field(default_factory=list)  # False also where the chest-CT check refused it
    refusals: list[str] = field(default_factory=list)  # why the chest-CT check refused an input ('' where not)


NO_BODY_NOTE = "no body found in the slice: left uncropped"


def slice_notes(notes: list[str], body_found: bool, refusal: str = "") -> list[str]:
    """How a slice was read, and why no network looked at it (no body found, or the check's ``refusal``)."""
    return list(notes) + ([] if body_found else [refusal or NO_BODY_NOTE])


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


SQUARING_WORKERS = 2  # threads squaring the slices of a batch (OpenCV and NumPy release the GIL)


class _Answering:
    """What one model and an ensemble share: a slice decoded once, answered in
    batches by every member, and the one way a scored row becomes a
    :class:`Prediction`."""

    members: list["LoadedModel"]
    class_names: list[str]
    display_names: list[str]
    preprocess: PreprocessConfig
    scope = None  # a ctapp.scope.ScopeCheck: what this model cannot judge (a top-level model's only)

    def combine(self, parts: list[BatchScores]) -> BatchScores:
        raise NotImplementedError

    def _decode(self, image: ImageSource | Slice) -> Slice:
        return image if isinstance(image, Slice) else decode(image, window=self.preprocess.window)

    def prediction(self, scores: BatchScores, i: int, notes: list[str]) -> Prediction:
        """Row ``i`` of ``scores`` as the :class:`Prediction` the app, the command
        line and reports show; ``notes`` say how the slice was read."""
        probs, state = scores.probs[i], scores.states[i]
        top = int(np.argmax(probs))
        body_found = scores.body_found[i] if scores.body_found else True
        notes = slice_notes(notes, body_found, scores.refusals[i] if scores.refusals else "")
        return Prediction(label=self.class_names[top], display_label=self.display_names[top],
                          probabilities={name: float(p) for name, p in zip(self.class_names, probs)},
                          confidence=float(probs[top]), uncertain=state != CONFIDENT,
                          out_of_distribution=state in (NOT_CHEST_CT, UNLIKE_TRAINING),
                          ood_score=None if np.isnan(scores.ood_scores[i]) else float(scores.ood_scores[i]),
                          reasons=list(scores.reasons[i]), notes=notes, state=state)

    def member_inputs(self, slices: list[Slice]) -> list[tuple[torch.Tensor, list[bool], list[str]]]:
        """Per member: the (N, 1, S, S) input squares of decoded slices (decoded in the first member's window,
        as the members share it), whether each passed the body crop and the chest-CT check, and the check's
        refusals (''); members alike in both share one squaring, and a shared check is asked once a slice."""
        shared: dict[tuple, tuple[torch.Tensor, list[bool], list[str]]] = {}
        asked = {check: asked_once(check) for check in dict.fromkeys(m.input_check for m in self.members)}
        for config, check in dict.fromkeys((m.preprocess, m.input_check) for m in self.members):
            squares = torch.zeros(len(slices), 1, config.img_size, config.img_size)
            body, refusals = [True] * len(slices), [""] * len(slices)

            def one(i: int, config=config, check=check, squares=squares, body=body, refusals=refusals) -> None:
                square, geometry = to_square(slices[i].pixels, config, asked[check])
                squares[i, 0] = torch.from_numpy(square)
                body[i], refusals[i] = geometry.body_found, geometry.refusal

            with ThreadPoolExecutor(max_workers=min(SQUARING_WORKERS, max(len(slices), 1))) as pool:
                list(pool.map(one, range(len(slices))))
            shared[config, check] = squares, body, refusals
        return [shared[m.preprocess, m.input_check] for m in self.members]

    def score_slices(self, slices: list[Slice], *, scoped: bool = True) -> BatchScores:
        """Decoded slices through every member as one batch, combined, and (``scoped``) held to the scope check."""
        scores = self.combine([m.score_squares(squares, body, batch_size=max(len(slices), 1), refusals=refusals)
                               for m, (squares, body, refusals) in zip(self.members, self.member_inputs(slices))])
        return self.held_to_scope(scores, slices) if scoped else scores

    def held_to_scope(self, scores: BatchScores, slices: list[Slice]) -> BatchScores:
        """``scores`` of ``slices`` with what the scope check withholds, where the model has one."""
        return scores if self.scope is None else self.scope.apply(scores, slices)

    def classify_slices(self, slice_at: Callable[[int], Slice], count: int, *, batch_size: int = 32,
                        on_progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
        """``count`` slices (``slice_at(i)`` decodes slice ``i``, once) answered ``batch_size`` at a time by
        every member, with the same answers and states as :meth:`predict` gives one at a time. Each member's lock
        is taken per batch, so other users go on between batches; ``on_progress(done, count)`` counts slices."""
        predictions: list[Prediction] = []
        for start in range(0, count, batch_size):
            slices = [slice_at(i) for i in range(start, min(start + batch_size, count))]
            scores = self.score_slices(slices)
            predictions += [self.prediction(scores, j, image.notes) for j, image in enumerate(slices)]
            if on_progress:
                on_progress(len(predictions), count)
        return predictions

    def predict(self, image: ImageSource | Slice) -> Prediction:
        """Label and calibrated probabilities of every class for one slice."""
        image = self._decode(image)
        return self.prediction(self.score_slices([image]), 0, image.notes)

    def class_index(self, target: int | str | None) -> int | None:
        if target is None or isinstance(target, int):
            return target
        for names in (self.class_names, self.display_names):
            if target in names:
                return names.index(target)
        raise ValueError(f"unknown class {target!r}; this model knows {self.class_names}")

    def analyse(self, image: ImageSource | Slice, target: int | str | None = None,
                method: str = "Grad-CAM") -> Analysis:
        raise NotImplementedError

    def explain(self, image: ImageSource | Slice, target: int | str | None = None,
                method: str = "Grad-CAM") -> np.ndarray:
        """Grad-CAM heat map (H, W) in [0, 1] at the image's own resolution."""
        return self.analyse(image, target, method).cam

    def set_precision(self, precision: Precision) -> None:
        """Answer at ``precision`` from now on (the parity test compares fp32 with the fast path)."""
        for member in self.members:
            member.use_precision(precision)


class LoadedModel(_Answering):
    def __init__(self, model: nn.Module, meta: dict, path: Path | None = None, card: dict | None = None,
                 input_check: InputCheck | None = None):
        self.meta = meta
        self.input_check = input_check  # the chest-CT check of its directory (ctapp.chest_check) or None
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
        self.members = [self]
        self.model = model.eval()
        # Grad-CAM needs gradients at the target layer only: enabling them on the
        # last backbone parameter keeps the backward pass to the head and one layer.
        for p in self.model.parameters():
            p.requires_grad_(False)
        backbone = [p for name, p in self.model.named_parameters() if not name.startswith(self.spec.head + ".")]
        backbone[-1].requires_grad_(True)
        self.feature_layers = list(self.ood.layers) if self.ood is not None else []
        self.cam_layer = self.model.get_submodule(meta.get("cam_layer") or self.spec.cam_layer)
        self.int8_network: nn.Module | None = None  # built from the calibration file when int8 is asked for
        self.int8_unavailable = ""  # why int8 was asked for and this model answers in fp32
        # As training runs: bf16 autocast where the CPU has native kernels, channels_last.
        self.use_precision(inference_precision())

    def use_precision(self, precision: Precision) -> None:
        self.precision = precision
        self.model.to(memory_format=precision.memory_format)
        if precision.int8 and self.int8_network is None and not self.int8_unavailable:
            self.int8_network, self.int8_unavailable = load_int8(
                self.model, self.spec.head, self.path, self.preprocess, self.feature_layers)

    @property
    def runs_int8(self) -> bool:
        return self.precision.int8 and self.int8_network is not None

    def combine(self, parts: list[BatchScores]) -> BatchScores:
        return parts[0]

    def assess(self, confidence: float, ood_score: float | None, body_found: bool = True,
               far_score: float | None = None) -> tuple[str, list[str]]:
        """The state of an answer and the reasons behind it: the one rule shared by
        the app, the command line and evaluation reports.

        Not a chest CT: no body found or the chest-CT check refused the slice
        (``body_found`` False); without that check, also a far score (the OOD score
        where none is given) beyond anything chest CT scored (``ood.far_threshold``).
        With it, a far score means unlike the training images, as an OOD score
        beyond the usual range of unseen chest CT (``ood.threshold``) does: chest CT
        of another hospital lies far too. Low confidence: below the out-of-fold threshold."""
        far = self.ood.far_threshold if self.ood is not None else None
        near = self.ood.threshold if self.ood is not None else None
        far_score = ood_score if far_score is None else far_score
        beyond_far = far_score is not None and far is not None and far_score > far
        if not body_found or (beyond_far and self.input_check is None):
            input_state = NOT_CHEST_CT
        elif beyond_far or (ood_score is not None and near is not None and ood_score > near):
            input_state = UNLIKE_TRAINING
        else:
            input_state = CONFIDENT
        return answer_state(input_state, confidence, self.confidence_threshold)

    def _scores(self, logits, features: dict, body_found: list[bool], refusals: list[str] | None = None):
        probs = calibrated(logits, self.temperature)
        ood, far = self.ood.scores(features) if self.ood is not None else (np.full(len(probs), np.nan),) * 2
        assessed = [self.assess(float(probs[i].max()), None if np.isnan(ood[i]) else float(ood[i]), body_found[i],
                                None if np.isnan(far[i]) else float(far[i])) for i in range(len(probs))]
        return BatchScores(probs, calibrated(logits, 1.0), np.asarray(ood, float),
                           [state for state, _ in assessed], [reasons for _, reasons in assessed],
                           body_found=list(body_found), refusals=list(refusals or [""] * len(probs)))

    def forward_batch(self, images: torch.Tensor, batch_size: int = 32,
                      on_progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Raw logits and the out-of-distribution features of cached (N, 1, S, S) grey squares. The model's lock
        is taken per chunk of ``batch_size`` images, so one user's long evaluation lets other users' predictions
        through between chunks."""
        chunks = []
        for start in range(0, max(len(images), 1), batch_size):
            with self._lock:
                network = self.int8_network if self.runs_int8 else self.model
                chunks.append(batched_forward(network, images[start:start + batch_size], self.preprocess,
                                              batch_size=batch_size, feature_layers=self.feature_layers,
                                              autocast=self.precision.autocast,
                                              memory_format=self.precision.memory_format))
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
                      on_progress: Callable[[int, int], None] | None = None,
                      refusals: list[str] | None = None) -> BatchScores:
        """Calibrated probabilities, OOD scores and answer states of prepared (N, 1, S, S) input squares
        (``to_square``): :meth:`predict`'s answers, batched, without Grad-CAM or the scope check."""
        logits, features = self.forward_batch(images, batch_size, on_progress=on_progress)
        return self._scores(logits, features, body_found, refusals)

    def score_files(self, paths: list[Path], *, workers: int = 2,
                    on_progress: Callable[[int, int], None] | None = None) -> BatchScores:
        """:meth:`score_squares` of many files, with each file's read error and SHA-256 (without the scope
        check: evaluation reports use :func:`score_files_read_once`)."""
        loaded = load_squares(paths, self.preprocess, workers=workers, on_progress=on_progress,
                              input_check=self.input_check)
        ok = [i for i, error in enumerate(loaded.errors) if not error]
        n, k = len(paths), len(self.class_names)
        scores = BatchScores(np.full((n, k), np.nan), np.full((n, k), np.nan), np.full(n, np.nan), [""] * n,
                             [[] for _ in range(n)], loaded.errors, loaded.digests, [True] * n, [""] * n)
        if not ok:
            return scores
        part = self.score_squares(loaded.images[ok], [loaded.geometries[i].body_found for i in ok],
                                  refusals=[loaded.geometries[i].refusal for i in ok])
        scores.probs[ok], scores.raw_probs[ok], scores.ood_scores[ok] = part.probs, part.raw_probs, part.ood_scores
        for j, i in enumerate(ok):
            scores.states[i], scores.reasons[i], scores.body_found[i], scores.refusals[i] = part.states[j], \
                part.reasons[j], part.body_found[j], part.refusals[j]
        return scores

    def analyse(self, image: ImageSource | Slice, target: int | str | None = None,
                method: str = "Grad-CAM") -> Analysis:
        """Prediction and a class-activation map (of the predicted class unless ``target`` names another) in one
        forward and one short backward pass."""
        image = self._decode(image)
        scores, heat, cam_index = self.scored_cam(image, self.class_index(target), method)
        scores = self.held_to_scope(scores, [image])
        return Analysis(self.prediction(scores, 0, image.notes), heat, self.class_names[cam_index], image)

    def scored_cam(self, image: Slice, index: int | None, method: str = "Grad-CAM",
                   ) -> tuple[BatchScores, np.ndarray, int]:
        """A decoded slice's scores and the map of class ``index`` (None: the top
        class) with that class's index. The map is the fp32 network's; in int8
        the scores are the int8 network's, as :meth:`predict` gives them."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        methods = cam_methods()
        if method not in methods:
            raise ValueError(f"unknown CAM method {method!r}; choose one of {list(methods)}")
        answer = self.score_slices([image], scoped=False) if self.runs_int8 else None
        if answer is not None and index is None:
            index = int(np.argmax(answer.probs[0]))
        x, geometry = model_input(image.pixels, self.preprocess, self.input_check)
        x = x.contiguous(memory_format=self.precision.memory_format)
        with self._lock:
            # Under bf16 autocast the CAM layer's output and the logits are taken in fp32:
            # pytorch-grad-cam reads them and their gradients through NumPy, which has no bf16.
            to_fp32 = [module.register_forward_hook(lambda _module, _args, output: output.float())
                       for module in (self.cam_layer, self.model)]
            try:
                with FeatureCapture(self.model, self.feature_layers) as capture, self.precision.autocast(), \
                        methods[method](model=self.model, target_layers=[self.cam_layer]) as cam:
                    # None explains the top class (the prediction).
                    targets = None if index is None else [ClassifierOutputTarget(index)]
                    maps = cam(input_tensor=x, targets=targets)
                    logits = cam.outputs.detach()
            finally:
                for hook in to_fp32:
                    hook.remove()
                self.model.zero_grad(set_to_none=True)
        scores = answer or self._scores(logits.float(), capture.features(), [geometry.body_found],
                                        [geometry.refusal])
        cam_index = index if index is not None else int(np.argmax(scores.probs[0]))
        return scores, np.clip(cam_to_image(maps[0], geometry), 0.0, 1.0), cam_index


def ensemble_logits(member_probs) -> np.ndarray:
    """Log of the mean of the members' probabilities (members on the first axis)."""
    return np.log(np.clip(np.mean(member_probs, axis=0), 1e-12, None))


def ensemble_probabilities(member_probs, temperature: float = 1.0) -> np.ndarray:
    """The mean of the members' probabilities, sharpened or softened by ``temperature``
    (1.0: the plain mean); one input (C,) or a batch (N, C) per member."""
    logits = ensemble_logits(member_probs)
    return calibrated(np.atleast_2d(logits), temperature).reshape(logits.shape)


def ensemble_input_state(member_states: list[str], near_ratios: list[float] | None = None,
                         gate: EnsembleGate = ENSEMBLE_GATE) -> str:
    """What an ensemble makes of an input (``NOT_CHEST_CT``, ``UNLIKE_TRAINING`` or ``CONFIDENT``) from its
    members' states and near ratios (each member's OOD score over its own threshold), by ``gate`` (the shipped
    rule: :data:`ENSEMBLE_GATE`). Without ``near_ratios`` a member's flag stands for its ratio (flagged: above
    any threshold), which makes one member's flag the ensemble's."""
    if near_ratios is None:
        near_ratios = [np.inf if state in (NOT_CHEST_CT, UNLIKE_TRAINING) else 0.0 for state in member_states]
    not_ct, unlike = gate.flags([state == NOT_CHEST_CT for state in member_states], near_ratios)
    return NOT_CHEST_CT if not_ct else UNLIKE_TRAINING if unlike else CONFIDENT


def ensemble_state(probs: np.ndarray, member_states: list[str], threshold: float,
                   near_ratios: list[float] | None = None, gate: EnsembleGate = ENSEMBLE_GATE) -> tuple[str, list[str]]:
    """One input's state and reasons from an ensemble's probabilities, its
    members' states and near ratios (:func:`ensemble_input_state`) and its
    confidence threshold."""
    return answer_state(ensemble_input_state(member_states, near_ratios, gate), float(probs.max()), threshold)


class EnsembleModel(_Answering):
    """Several models of one task answering as one, used wherever a model is.

    Its probabilities are the mean of the members' calibrated probabilities,
    rescaled by a temperature of its own (``softmax(log(mean) / T)``, fitted on
    out-of-fold predictions: the mean is less confident than its members, ECE
    0.11 on the lung pair untempered); its out-of-distribution check weighs
    the members' evidence (:data:`ctapp.ood.ENSEMBLE_GATE`), so one member's
    false alarm does not silence it; its confidence
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

    def combine(self, parts: list[BatchScores], gate: EnsembleGate = ENSEMBLE_GATE) -> BatchScores:
        """The members' scores of the same inputs, in member order -> the
        ensemble's: mean probabilities, the members' OOD scores relative to
        their thresholds combined by ``gate`` (its OOD score), the input state
        the gate gives their evidence and its own threshold. A slice without a
        body for any member is not a chest CT. ``gate`` other than the shipped
        :data:`ENSEMBLE_GATE` is for comparing rules (benchmarks/gate.py)."""
        n = len(parts[0].states)
        errors = [next((p.errors[i] for p in parts if p.errors and p.errors[i]), "") for i in range(n)]
        ratios = np.stack([p.ood_scores / m.ood.threshold if m.ood is not None and m.ood.threshold else
                           np.full(n, np.nan) for p, m in zip(parts, self.members)])
        probs = self.mean_probabilities([p.probs for p in parts])
        body_found = [all(p.body_found[i] for p in parts if p.body_found) for i in range(n)]
        refusals = [next((p.refusals[i] for p in parts if p.refusals and p.refusals[i]), "") for i in range(n)]
        states, reasons = [""] * n, [[] for _ in range(n)]
        for i in range(n):
            if not errors[i]:
                member_states = [p.states[i] if body_found[i] else NOT_CHEST_CT for p in parts]
                states[i], reasons[i] = ensemble_state(probs[i], member_states, self.confidence_threshold,
                                                       list(ratios[:, i]), gate)
        return BatchScores(probs, np.mean([p.raw_probs for p in parts], axis=0),
                           np.array([gate.near_ratio(ratios[:, i]) for i in range(n)]),
                           states, reasons, errors, parts[0].digests, body_found, refusals)

    def analyse(self, image: ImageSource | Slice, target: int | str | None = None,
                method: str = "Grad-CAM") -> Analysis:
        """The ensemble's prediction, and a map of the class it predicts (or ``target``): the members' maps
        averaged, or the named member's."""
        image = self._decode(image)
        index = self.class_index(target)
        explainers = [m for m in self.members if m.name == self.explain_with] or self.members
        # One pass per member: an explainer's map of its own top class (or ``target``) comes
        # with its scores, and is redrawn only where that class is not the ensemble's.
        runs = [m.scored_cam(image, index, method) if m in explainers else
                (m.score_slices([image], scoped=False), None, None) for m in self.members]
        scores = self.combine([scores for scores, _, _ in runs])
        scores = self.held_to_scope(scores, [image])
        prediction = self.prediction(scores, 0, image.notes)
        cam_index = index if index is not None else self.class_names.index(prediction.label)
        maps = [heat if drawn == cam_index else m.scored_cam(image, cam_index, method)[1]
                for m, (_, heat, drawn) in zip(self.members, runs) if m in explainers]
        return Analysis(prediction, np.mean(maps, axis=0), self.class_names[cam_index], image)

    def score_files(self, paths: list[Path], *, workers: int = 2,
                    on_progress: Callable[[int, int], None] | None = None) -> BatchScores:
        """The ensemble's scores of many files, each decoded once for all members, without the scope check
        (:func:`score_files_read_once`)."""
        return score_files_read_once(self, paths, workers=workers, on_progress=on_progress, scoped=False)[0]


FILES_PER_DECODE = 32  # files decoded, squared and scored at a time: nothing of a chunk is kept but its scores


def score_files_read_once(model: LoadedModel | EnsembleModel, paths: list[Path], *, workers: int = 2,
                          scoped: bool = True, on_progress: Callable[[int, int], None] | None = None
                          ) -> tuple[BatchScores, list[str]]:
    """A model's scores of many files (evaluation reports), each read once and decoded once for every member
    (in the first member's window), answered a chunk at a time as :meth:`_Answering.score_slices` answers
    slices (``scoped``: with the scope check), with each file's read error and pixel digest; and the SHA-256 of
    each file's bytes ('' where unreadable). ``on_progress(done, count)`` counts files decoded."""
    n, k = len(paths), len(model.class_names)
    errors, digests, sha256s = [""] * n, [""] * n, [""] * n
    window = model.members[0].preprocess.window
    scores = BatchScores(np.full((n, k), np.nan), np.full((n, k), np.nan), np.full(n, np.nan), [""] * n,
                         [[] for _ in range(n)], errors, digests, [True] * n, [""] * n)

    def read(i: int) -> Slice | None:
        def hash_bytes(data: bytes) -> None:
            sha256s[i] = hashlib.sha256(data).hexdigest()

        try:
            image = decode(paths[i], window=window, on_bytes=hash_bytes)
        except ImageDecodeError as exc:
            errors[i], sha256s[i] = str(exc), ""
            return None
        digests[i] = image.content_hash()
        return image

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, n, FILES_PER_DECODE):
            chunk, readable, decoded = range(start, min(start + FILES_PER_DECODE, n)), [], []
            for i, image in zip(chunk, pool.map(read, chunk)):
                if image is not None:
                    readable.append(i)
                    decoded.append(image)
                if on_progress:
                    on_progress(i + 1, n)
            if not decoded:
                continue
            answered = model.score_slices(decoded, scoped=scoped)
            for name in ("probs", "raw_probs", "ood_scores"):
                getattr(scores, name)[readable] = getattr(answered, name)
            for name in ("states", "reasons", "body_found", "refusals"):
                for row, value in zip(readable, getattr(answered, name)):
                    getattr(scores, name)[row] = value
    return scores, sha256s
