"""The chest-CT check: a small network, shared by every model of a model
directory, that answers one question before any of them does: is this an axial
chest CT slice?

The networks' own out-of-distribution check (``ctapp.ood``) measures how far a
slice lies from their training images; it cannot tell a head, an abdomen or a
coronal reformat from chest CT, as all are CT. This check was trained for that
question with outlier exposure (``python -m training.chest_check``): chest CT
slices of every source against generated images of everything else. It lives in
``<models>/chest-check/`` beside the model folders; :func:`check_beside` finds
it for a model folder. A slice it refuses is 'not a chest CT' for every model
(``ctapp.preprocess.to_square`` runs it where the body crop is decided).
"""
from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, atomic_save, atomic_write_text, pack_state, safe_load, sha256_file, \
    unpack_state
from .models import BaselineCNN
from .preprocess import Box, PreprocessConfig, body_box, normalize, square_found

CHECK_FOLDER = "chest-check"
WEIGHTS_FILE = "chest_check.pt"
CARD_FILE = "chest_check.json"
OUT_OF_FOLD_FILE = "out_of_fold.csv"  # every training chest CT slice's score from the fold that never saw it
FORMAT = "ctapp.chest_check"
CHEST = 1  # output index of "axial chest CT slice"; 0 is "anything else"


class ChestCheckError(CheckpointError):
    """A chest-CT check folder that cannot be used (the message says why)."""


def build_network(width: int) -> BaselineCNN:
    return BaselineCNN(num_classes=2, dropout=0.2, width=width)


class ChestCheck:
    """A trained check: ``config`` squares a decoded slice for it, ``threshold``
    is the chest probability below which a slice is refused."""

    def __init__(self, network: torch.nn.Module, config: PreprocessConfig, threshold: float, path: Path | None = None):
        self.network = network.eval()
        self.config = config
        self.threshold = float(threshold)
        self.path = path
        self._lock = threading.Lock()

    def chest_probability(self, squares: torch.Tensor) -> np.ndarray:
        """P(axial chest CT) of (N, 1, S, S) grey squares made by ``config``."""
        with self._lock, torch.inference_mode():
            logits = self.network(normalize(squares, self.config)).float()
        return torch.softmax(logits, dim=1)[:, CHEST].numpy()

    def square(self, pixels: np.ndarray, body: Box | None = None) -> torch.Tensor:
        """The (1, S, S) square of a decoded grey slice for the check; ``body``: its
        :func:`~ctapp.preprocess.body_box` where the caller has found it already."""
        body = body if body is not None else body_box(pixels)
        return torch.from_numpy(square_found(pixels, self.config, body)[0])[None]

    def __call__(self, pixels: np.ndarray, body: Box | None = None) -> str:
        """Why a decoded grey slice is refused, or '' when it passes (``body`` as for :meth:`square`;
        ``ctapp.preprocess.to_square`` passes the box it found)."""
        probability = float(self.chest_probability(self.square(pixels, body)[None])[0])
        if probability >= self.threshold:
            return ""
        return (f"the chest-CT check finds this unlike an axial chest CT slice (score {probability:.1%}; "
                f"slices pass from {self.threshold:.1%})")


def save_check(folder: Path, network: torch.nn.Module, width: int, config: PreprocessConfig, threshold: float,
               card: dict) -> None:
    """Write a check: fp16 weights and a card holding its preprocessing,
    threshold, the weights' SHA-256 and whatever ``card`` adds (recipe, figures)."""
    packed, _ = pack_state(network.state_dict(), "fp16")
    atomic_save({"format": FORMAT, "width": width, "state_dict": packed}, folder / WEIGHTS_FILE)
    card = {**card, "format": FORMAT, "preprocess": config.to_dict(), "threshold": float(threshold),
            "weights_sha256": sha256_file(folder / WEIGHTS_FILE)}
    atomic_write_text(json.dumps(card, indent=2) + "\n", folder / CARD_FILE)


def read_card(folder: Path) -> dict:
    path = folder / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChestCheckError(f"{path}: unreadable chest-CT check card ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ChestCheckError(f"{path}: not a chest-CT check card (no '{FORMAT}' format)")
    return card


def load_check(folder: Path) -> ChestCheck:
    """A check folder (weights and card), verified against the card's SHA-256."""
    folder = Path(folder)
    card = read_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ChestCheckError(f"{weights}: missing; train the check with python -m training.chest_check")
    if sha256_file(weights) != card.get("weights_sha256"):
        raise ChestCheckError(f"{weights}: refused: its SHA-256 does not match {CARD_FILE}; the weights were "
                              "changed or corrupted")
    try:
        payload = safe_load(weights)
    except CheckpointError as exc:
        raise ChestCheckError(str(exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ChestCheckError(f"{weights}: not chest-CT check weights (no '{FORMAT}' header)")
    try:
        config = PreprocessConfig.from_dict(card["preprocess"])
        network = build_network(int(payload["width"]))
        network.load_state_dict(unpack_state(payload["state_dict"], {}), strict=True)
        threshold = float(card["threshold"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = " ".join(str(exc).strip().splitlines()[:2])
        raise ChestCheckError(f"{folder}: a damaged chest-CT check ({type(exc).__name__}: {first})") from None
    return ChestCheck(network, config, threshold, folder)


_loaded: dict[tuple[Path, float], ChestCheck] = {}
_loading = threading.Lock()


def check_beside(model_folder: Path) -> ChestCheck | None:
    """The check shipped in the model directory that holds ``model_folder``
    (``../chest-check``), or None where there is none; loaded once per process
    and file version, and shared by the models of that directory."""
    folder = (Path(model_folder).parent / CHECK_FOLDER).resolve()
    weights = folder / WEIGHTS_FILE
    if not folder.is_dir():
        return None
    try:
        key = (folder, weights.stat().st_mtime)
    except OSError:
        raise ChestCheckError(f"{weights}: missing; train the check with python -m training.chest_check") from None
    with _loading:
        if key not in _loaded:
            _loaded[key] = load_check(folder)
        return _loaded[key]


def out_of_fold_refusals_beside(model_folder: Path) -> dict[str, bool] | None:
    """:func:`out_of_fold_refusals` of the check beside ``model_folder`` (as
    :func:`check_beside` finds it), or None where there is none."""
    folder = Path(model_folder).parent / CHECK_FOLDER
    return out_of_fold_refusals(folder) if folder.is_dir() else None


def out_of_fold_refusals(folder: Path) -> dict[str, bool]:
    """Whether the check refuses each training chest CT slice out of fold (its
    score from the fold model that never saw it, against the shipped
    threshold), by the slice's path under the data root."""
    threshold = float(read_card(folder)["threshold"])
    with open(folder / OUT_OF_FOLD_FILE, newline="", encoding="utf-8") as f:
        return {row["image"]: float(row["score"]) < threshold for row in csv.DictReader(f)}
