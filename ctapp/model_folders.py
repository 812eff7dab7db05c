"""Model folders: loading a model, an ensemble or a checkpoint file, and
listing the models the app offers (the shipped ``models/`` folder and
those named in ``CTAPP_MODELS_DIR``)."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .chest_check import CHECK_FOLDER, check_beside
from .chest_check import WEIGHTS_FILE as CHECK_WEIGHTS_FILE
from .checkpoint import CheckpointError, load_model_file
from .inference import EnsembleModel, LoadedModel
from .quantized import CALIBRATION_FILE
from .scope import SCOPE_FILE, ScopeCheck, read_rule

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model_card.json"
REPORT_FILE = "eval_report.json"
MODELS_ENV = "CTAPP_MODELS_DIR"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ENSEMBLE_FILE = "ensemble.json"


def read_card(folder: Path) -> dict:
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


def load_model(path: str | os.PathLike, *, scoped: bool = True) -> LoadedModel | EnsembleModel:
    """Load a model folder (``model.pt`` plus ``model_card.json``), an ensemble
    folder (``ensemble.json`` naming member folders) or a checkpoint file.

    The weights' SHA-256 is checked against the model card when the card records it.
    A model folder beside a chest-CT check (``../chest-check``, as in ``models/``)
    refuses what the check refuses (:mod:`ctapp.chest_check`); one with a
    ``scope.json`` (and ``scoped``) withholds what it cannot judge (:mod:`ctapp.scope`).
    """
    path = Path(path)
    if path.is_dir() and (path / ENSEMBLE_FILE).is_file():
        model = load_ensemble(path)
        model.scope = scope_of(path) if scoped else None
        return model
    folder, weights = (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)
    if not weights.is_file():
        raise CheckpointError(f"{path}: no model here (expected {WEIGHTS_FILE} in the folder)")
    card = read_card(folder) if weights.name == WEIGHTS_FILE else {}
    model, meta = load_model_file(weights, expected_sha256=card.get("weights_sha256"))
    loaded = LoadedModel(model, meta, path=folder if weights.name == WEIGHTS_FILE else weights, card=card,
                         input_check=check_beside(folder))
    loaded.scope = scope_of(folder) if scoped and path.is_dir() else None
    return loaded


_finding_models: dict[tuple[Path, float], LoadedModel | EnsembleModel] = {}
_loading_finding_models = threading.Lock()


def scope_of(folder: Path) -> ScopeCheck | None:
    """The scope check of a model folder (its ``scope.json``), or None; the
    finding model it names is loaded once per process and version."""
    rule = read_rule(folder)
    if rule is None:
        return None
    target = (folder / rule.model).resolve()
    if not target.is_dir():
        raise CheckpointError(f"{folder / SCOPE_FILE}: names {rule.model}, which is not a model folder here")
    key = (target, model_stamp(target))
    with _loading_finding_models:
        if key not in _finding_models:
            _finding_models[key] = load_model(target, scoped=False)
        return ScopeCheck(rule, _finding_models[key])


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
        loaded.append(load_model(member_path, scoped=False))
    return EnsembleModel(loaded, spec, path=folder, card=read_card(folder))


def model_stamp(folder: str | Path) -> float:
    """Modification time of what defines the model in ``folder`` (its weights, or an
    ensemble's description), or of its int8 calibration, its scope rule or the
    chest-CT check beside it where that is newer: part of every cache key of the app."""
    folder = Path(folder)

    def modified(name: str) -> float | None:
        try:
            return (folder / name).stat().st_mtime
        except OSError:
            return None

    defining = next((stamp for name in (WEIGHTS_FILE, ENSEMBLE_FILE) if (stamp := modified(name)) is not None), 0.0)
    return max(defining, modified(CALIBRATION_FILE) or 0.0, modified(SCOPE_FILE) or 0.0,
               modified(f"../{CHECK_FOLDER}/{CHECK_WEIGHTS_FILE}") or 0.0)


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
                card = read_card(folder)
            except CheckpointError:
                card = {}
            found.append(ModelEntry(folder, card.get("name", folder.name), card))
    return found
