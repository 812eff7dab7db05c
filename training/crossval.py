"""K-fold cross-validation: honest figures for the model card, and the model that ships.

    python -m training.fit --cv 5 --data DIR [DIR ...] --out models/NAME [options]

All labelled images (train and valid pooled after the audit's policy; a test
split is never touched) are cut into K folds, stratified by source and class and seeded;
a group of related files (:func:`ctapp.data.group_ids`: blocks of neighbouring
slices, one paper's figures, identical images) never straddles two folds. Each
fold trains on the rest with the same fixed schedule (no epoch is picked on the
held-out images) and predicts its held-out images: every image gets exactly one
out-of-fold prediction. The shipped model is then trained on all images with
that schedule; its temperature, confidence threshold and out-of-distribution
threshold are fitted on the out-of-fold predictions, and the figures in its card
and report are out-of-fold figures, each fold's calibration fitted on the other
folds only.

Under ``OUT/cv/``: ``folds.csv`` (the fold of every image), ``fold-K/`` and
``full/`` (``last.pt`` every epoch, ``model.pt`` once the run is complete, when
``last.pt`` goes unless ``--keep-checkpoints``). ``--resume`` continues the run
that was interrupted; finished runs are kept.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ctapp.chest_check import out_of_fold_refusals_beside
from ctapp.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_model_file,
    pack_state,
    save_model_file,
    unpack_state,
)
from ctapp.data import FILE_PER_PATIENT_SOURCES, DatasetError, DatasetIndex, cv_folds, group_ids
from ctapp.evaluation import image_identity, read_predictions, write_report
from ctapp.inference import BatchScores, EnsembleModel, LoadedModel, batched_forward
from ctapp.metrics import (
    calibrated,
    evaluation_report,
    few_images_note,
    fit_temperature,
    risk_coverage,
    selective_statement,
    selective_summary,
    selective_threshold,
)
from ctapp.model_folders import ENSEMBLE_FILE, WEIGHTS_FILE, load_model, read_ensemble_spec
from ctapp.models import count_parameters, get_spec
from ctapp.ood import ENSEMBLE_GATE, EnsembleGate, MahalanobisOOD, ood_feature_keys
from training.card import DISCLAIMER, card_figures, measure_latency, meta_for, model_card, ood_check, short_metrics
from training.engine import Progress
from training.foreign import FAR_RULE, far_threshold
from training.packed import training_data
from training.trainer import discard_checkpoints, train_model

FOLDS_FILE = "folds.csv"
FOLD_MODEL_FILE = "calibrated.pt"


def pooled_index(setup, log) -> tuple[DatasetIndex, dict, dict, dict[Path, str]]:
    """Every labelled image outside a test split, after the audit's policy."""
    args = setup.args
    data = training_data(args)  # the image folders, or a packed set of them (--pack)
    index = data.scan(args.data)
    test = [s for s in index.samples if s.split == "test"]
    if test:
        log(f"data: {len(test)} images in a test split are left out: fit never touches a test split "
            "(evaluate it with python -m training.evaluate)")
        index.samples = [s for s in index.samples if s.split != "test"]
    log(f"data: {index.root}, sources {sorted({s.source for s in index.samples})}, {len(index.samples)} files, "
        f"classes {index.class_names}")
    audit = data.audit(index, workers=args.workers)
    report = audit.to_dict()
    for warning in report["warnings"]:
        log(f"audit: {warning}")
    unreadable = {r.sample.path for r in audit.records if r.error}
    exclude = unreadable | (set() if args.keep_duplicates else set(audit.dropped))
    digests = {r.sample.path: r.digest for r in audit.records if not r.error}
    kept = [replace(s, split="") for s in index.samples if s.path not in exclude]
    log(f"audit: {len(exclude)} of {len(index.samples)} images left out ({len(unreadable)} unreadable; "
        f"{report['redundant_copies']} redundant copies, {len(report['label_conflicts'])} label conflicts"
        f"{', kept by --keep-duplicates' if args.keep_duplicates else ''})")
    index = replace(index, samples=kept, layout="classes")
    counts = np.bincount([s.label for s in kept], minlength=len(index.class_names))
    if (counts == 0).any():
        raise DatasetError(f"class(es) {[index.class_names[i] for i in np.flatnonzero(counts == 0)]} have no "
                           "readable images; add images or remove the folder")
    return index, audit.summary(), report, digests


def assign_folds(setup, index: DatasetIndex, digests: dict[Path, str], cv_dir: Path) -> np.ndarray:
    """The fold of every image, written to folds.csv; a resumed run must find the same."""
    args = setup.args
    groups = group_ids(index.samples, block_size=args.split_block or None, pattern=args.group_pattern,
                       digests=[digests.get(s.path, "") for s in index.samples])
    folds = cv_folds(index.samples, groups, args.cv, args.seed, index.class_names)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "source", "class", "group", "fold"])
    for s, g, k in zip(index.samples, groups, folds):
        writer.writerow([_rel(s.path, index.root), s.source, index.class_names[s.label], int(g), int(k)])
    text = buffer.getvalue()
    saved = cv_dir / FOLDS_FILE
    if args.resume and saved.is_file() and saved.read_text() != text:
        raise DatasetError(f"{saved}: the data or the fold settings (--cv, --seed, --split-block, "
                           "--group-pattern) changed since this run started; use a new --out")
    if setup.is_main:
        cv_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(text, saved)
    sizes = np.bincount(folds, minlength=args.cv)
    setup.log(f"cross-validation: {args.cv} folds of {', '.join(map(str, sizes))} images, "
              f"{len(np.unique(groups))} groups kept whole")
    return folds


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def stored_path(text: str, root: Path) -> Path:
    """The image a ``folds.csv`` or report row names: relative to the data root,
    or, where the image is not under it as given (sources pooled from several
    roots), as it was given to ``fit``."""
    path = Path(text)
    return path if path.is_absolute() or not (root / path).exists() and path.exists() else root / path


def _epochs_done(folder: Path) -> int:
    history = folder / "history.csv"
    if (folder / WEIGHTS_FILE).is_file():
        return -1  # finished
    if not history.is_file():
        return 0
    return max(0, len(history.read_text().splitlines()) - 1)


def cross_validate(setup) -> Path:
    args, log = setup.args, setup.log
    if args.cv < 2:
        raise DatasetError(f"--cv needs at least 2 folds, got {args.cv}")
    out = Path(args.out)
    cv_dir = out / "cv"
    index, audit_summary, audit_report, digests = pooled_index(setup, log)
    setup.class_names = index.class_names
    folds = assign_folds(setup, index, digests, cv_dir)
    labels = np.array([s.label for s in index.samples])
    meta_base = meta_for(args, setup.config, index, audit_summary)
    meta_base["cross_validation"] = {"folds": args.cv, "seed": args.seed, "split_block": args.split_block,
                                     "group_pattern": args.group_pattern}
    if setup.is_main:
        atomic_write_text(json.dumps(audit_report, indent=2), out / "audit.json")

    bar = Progress(len(index.samples), "caching", unit="image", enabled=setup.is_main and not args.quiet)
    loaded = training_data(args).load([s.path for s in index.samples], setup.config, workers=args.workers,
                                      on_progress=lambda done, total: bar.update(done))
    no_body = sum(1 for g in loaded.geometries if g is not None and not g.body_found)
    if setup.config.crop == "body":
        log(f"body crop: no body found in {no_body} of {len(index.samples)} slices (left uncropped)")

    runs = [(f"fold-{k}", folds != k, folds == k, args.seed + 1000 * (k + 1)) for k in range(args.cv)]
    runs.append(("full", np.ones(len(labels), bool), np.zeros(len(labels), bool), args.seed))
    done = [_epochs_done(cv_dir / name) for name, *_ in runs]
    overall = Progress((args.cv + 1) * args.epochs, "cross-validation", unit="epoch",
                       enabled=setup.is_main and not args.quiet, every=0,
                       initial=sum(args.epochs if d < 0 else d for d in done))
    log(f"training {args.cv} folds and the final model, {args.epochs} epochs each | "
        f"{setup.precision.describe()} | world size {setup.world}")
    for (name, train_mask, held_mask, seed), previous in zip(runs, done):
        folder = cv_dir / name
        if previous < 0:
            continue
        fold_meta = {**meta_base, "cv_run": name, "images_trained": int(train_mask.sum())}
        model, state = train_model(setup, folder, loaded.images[train_mask], labels[train_mask].tolist(),
                                   loaded.images[held_mask], labels[held_mask], meta_base=fold_meta,
                                   keep_best=False, seed=seed, overall=overall, title=f"{name} ")
        if state["paused"]:
            return out
        if setup.is_main:
            save_model_file(folder / WEIGHTS_FILE, model, {**fold_meta, "epoch": state["epoch"],
                                                            "train_seconds": state["train_seconds"]},
                            storage="fp16")
            discard_checkpoints(folder, args)
    if setup.is_main:
        finalize_cv(setup, out, index, folds, loaded.images, labels, meta_base)
    return out


def _stored(model: torch.nn.Module, storage: str) -> torch.nn.Module:
    """The model with its weights exactly as ``storage`` will hold them."""
    model.load_state_dict(unpack_state(*pack_state(model.state_dict(), storage)))
    return model


def _load_run(folder: Path, storage: str) -> tuple[torch.nn.Module, dict]:
    model, meta = load_model_file(folder / WEIGHTS_FILE)
    return _stored(model, storage), meta


def out_of_fold(setup, cv_dir: Path, folds: np.ndarray, images: torch.Tensor, labels: np.ndarray) -> dict:
    """Logits, OOD scores and per-layer distance ratios of every image, from the
    fold model that never saw it."""
    args = setup.args
    n = len(labels)
    logits = np.zeros((n, len(setup.class_names)))
    ood_scores, far_scores = np.zeros(n), np.zeros(n)
    ratios: list[dict[str, float]] = []
    models, detectors = [], []
    seconds = 0.0
    for k in range(args.cv):
        model, meta = _load_run(cv_dir / f"fold-{k}", args.weight_storage)
        seconds += float(meta.get("train_seconds", 0.0))
        layers = ood_feature_keys(get_spec(args.arch).feature_layers(model))
        held, train = folds == k, folds != k
        fold_logits, held_features = batched_forward(model, images[held], setup.config, feature_layers=layers)
        _, train_features = batched_forward(model, images[train], setup.config, feature_layers=layers)
        ood = MahalanobisOOD.fit(train_features, labels[train], held_features)
        logits[held] = fold_logits
        ood_scores[held], far_scores[held] = ood.scores(held_features)
        ratios.append({name: g.scale / max(float(np.median(g.distance(train_features[name]))), 1e-12)
                       for name, g in ood.layers.items()})
        models.append((model, meta))
        detectors.append(ood)
    return {"logits": logits, "ood": ood_scores, "far": far_scores, "ratios": ratios, "fold_seconds": seconds,
            "models": models, "detectors": detectors}


def save_fold_models(cv_dir: Path, oof: dict, crossfit: dict, storage: str) -> None:
    """Each fold model with the calibration and thresholds fitted on the other
    folds (``cv/fold-K/calibrated.pt``): what produced its out-of-fold answers,
    loadable like any model, e.g. to measure them under simulated shifts
    (benchmarks/shift.py)."""
    for k, ((model, meta), ood, fitted) in enumerate(zip(oof["models"], oof["detectors"], crossfit["per_fold"])):
        ood.threshold, ood.far_threshold = fitted["ood_threshold"], fitted["far_threshold"]
        save_model_file(cv_dir / f"fold-{k}" / FOLD_MODEL_FILE, model,
                        {**meta, "name": f"fold-{k}", "temperature": fitted["temperature"], "ood": ood.to_dict(),
                         "confidence_threshold": fitted["confidence_threshold"]}, storage=storage)


def crossfit_flags(logits: np.ndarray, labels: np.ndarray, ood: np.ndarray, folds: np.ndarray, *,
                   target: float, quantile: float, far: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Calibrated out-of-fold probabilities and the 'uncertain' flag of every image,
    each fold's temperature and thresholds fitted on the other folds only, so no
    image's own prediction shapes the calibration it is judged by. ``ood`` sets
    the 'unlike the training images' threshold, ``far`` (default: ``ood``) the
    'not a chest CT' one."""
    far = ood if far is None else far
    probs = np.zeros_like(logits, dtype=np.float64)
    uncertain = np.zeros(len(labels), bool)
    per_fold = []
    for k in np.unique(folds):
        held, rest = folds == k, folds != k
        temperature = fit_temperature(logits[rest], labels[rest])
        ood_threshold = float(np.quantile(ood[rest], quantile))
        rest_probs = calibrated(logits[rest], temperature)
        threshold = selective_threshold(rest_probs, labels[rest], ood[rest] > ood_threshold, target)
        probs[held] = calibrated(logits[held], temperature)
        uncertain[held] = (probs[held].max(axis=1) < threshold) | (ood[held] > ood_threshold)
        per_fold.append({"fold": int(k), "temperature": temperature, "confidence_threshold": threshold,
                         "ood_threshold": ood_threshold, "far_threshold": far_threshold(far[rest])})
    return probs, uncertain, {"per_fold": per_fold}


def out_of_fold_report(folder: Path) -> dict:
    """A cross-validated network's or ensemble's ``eval_report.json``, refused
    unless it is out of fold with the calibration each fold fitted on the others."""
    path = folder / "eval_report.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no eval_report.json")
    report = json.loads(path.read_text())
    if not report.get("out_of_fold") or not (report.get("crossfit") or {}).get("per_fold"):
        raise CheckpointError(f"{folder}: its report is not out-of-fold; train it with training.fit --cv "
                              "(an ensemble: training.ensemble of such runs)")
    return report


def fold_fits(report: dict) -> dict[int, dict]:
    """Each fold's temperature and thresholds (fitted on the other folds), by fold."""
    return {int(f["fold"]): f for f in report["crossfit"]["per_fold"]}


class FoldNetwork:
    """A network as the model of one fold answered its held-out slices: the
    thresholds that fold fitted on the other folds, with the app's own rule for
    an answer's state (:meth:`LoadedModel.assess`)."""

    assess = LoadedModel.assess
    preprocess = None  # the slices are already scored

    def __init__(self, name: str, class_names: list[str], display_names: list[str], fit: dict,
                 refused: dict[str, bool] | None = None):
        self.name, self.class_names, self.display_names = name, class_names, display_names
        self.ood = MahalanobisOOD({}, fit["ood_threshold"], fit.get("far_threshold"))
        self.confidence_threshold = float(fit["confidence_threshold"])
        # Where the models have a chest-CT check: its out-of-fold verdicts by image.
        # As in the app, the check (not the far score) then calls a slice not a chest CT.
        self.refused = refused or {}
        self.input_check = None if refused is None else self.refused.get

    def scores(self, rows: list[dict]) -> BatchScores:
        """Out-of-fold rows of this fold as :class:`BatchScores`, each with the
        state ``assess`` gives it (their probabilities are already calibrated)."""
        probs = np.array([[float(row[f"p_{c}"]) for c in self.class_names] for row in rows]).reshape(
            len(rows), len(self.class_names))
        ood = np.array([float(row["ood_score"]) for row in rows])
        # Rows written before the far score had one score for both.
        far = [float(row.get("far_score") or row["ood_score"]) for row in rows]
        body = [not self.refused.get(row.get("image"), False) for row in rows]
        assessed = [self.assess(float(probs[i].max()), float(ood[i]), body[i], far[i]) for i in range(len(rows))]
        return BatchScores(probs, probs, ood, [state for state, _ in assessed], [reasons for _, reasons in assessed],
                           [""] * len(rows), [row.get("sha256", "") for row in rows], body)


class OutOfFold:
    """The out-of-fold rows of cross-validated networks (one network's, or an
    ensemble's members' joined by path, in path order) answered by the app's own
    rules: each row by its fold's :class:`FoldNetwork`, an ensemble's by
    :meth:`EnsembleModel.combine`. The one way training, the series check and
    the gate benchmark rebuild the answer a slice got out of fold."""

    prediction = LoadedModel.prediction  # a scored row as the app's Prediction

    def __init__(self, members: list[Path], refused: dict[str, bool] | None = None):
        self.refused = refused  # the chest-CT check's out-of-fold verdicts by image, where there is one
        reports = [out_of_fold_report(m) for m in members]
        self.members, self.member_fits = members, [fold_fits(report) for report in reports]
        self.class_names = list(reports[0]["class_names"])
        self.display_names = list(reports[0].get("display_names") or self.class_names)
        self.tables = [self._rows_by_path(m) for m in members]
        first = self.tables[0]
        for member, table in zip(members[1:], self.tables[1:]):
            if table.keys() != first.keys() or any(table[p]["fold"] != first[p]["fold"] for p in first):
                raise CheckpointError(f"{member}: its out-of-fold images or folds differ from {members[0]}'s; "
                                      "members must be cross-validated on the same folds")
        self.paths = sorted(first)
        self.rows = [first[p] for p in self.paths]  # the first member's: path, source, fold, true, the image
        self.folds = np.array([int(row["fold"]) for row in self.rows])

    @staticmethod
    def _rows_by_path(member: Path) -> dict[str, dict]:
        rows = read_predictions(member / "eval_report.json")
        if not rows:
            raise CheckpointError(f"{member}: no out-of-fold rows (eval_report.csv)")
        by_path = {row["path"]: row for row in rows}
        if len(by_path) < len(rows):
            raise CheckpointError(f"{member}: an image has two out-of-fold rows in eval_report.csv")
        return by_path

    def scores(self, ensemble_fits: dict[int, dict] | None = None,
               gate: EnsembleGate = ENSEMBLE_GATE) -> BatchScores:
        """Every row's scores and state as the app gives them, in path order: a
        network's with its row's fold's thresholds; an ensemble's, its members'
        combined under ``gate`` with ``ensemble_fits[fold]`` (temperature and
        confidence threshold). Without fits an ensemble's probabilities are the
        members' plain mean and its threshold the default: only whether a state
        is out of distribution means anything then."""
        pieces = []
        for fold in np.unique(self.folds):
            held = np.flatnonzero(self.folds == fold)
            networks = [FoldNetwork(m.name, self.class_names, self.display_names, fits[fold], self.refused)
                        for m, fits in zip(self.members, self.member_fits)]
            parts = [network.scores([table[self.paths[i]] for i in held])
                     for network, table in zip(networks, self.tables)]
            if len(parts) > 1:
                parts = [EnsembleModel(networks, (ensemble_fits or {}).get(fold, {})).combine(parts, gate)]
            pieces.append((held, parts[0]))
        return _in_row_order(pieces)


def _in_row_order(pieces: list[tuple[np.ndarray, BatchScores]]) -> BatchScores:
    """Scores of disjoint sets of rows, each with its row numbers, as one batch in row order."""
    order = np.argsort(np.concatenate([rows for rows, _ in pieces]))

    def joined(name: str):
        values = [getattr(scores, name) for _, scores in pieces]
        if isinstance(values[0], np.ndarray):
            return np.concatenate(values)[order]
        flat = [value for part in values for value in part]
        return [flat[i] for i in order] if flat else []  # an optional list no piece fills stays empty

    return BatchScores(**{f.name: joined(f.name) for f in fields(BatchScores)})


def out_of_fold_scores(folder: Path, gate: EnsembleGate = ENSEMBLE_GATE, refused: dict[str, bool] | None = None
                       ) -> tuple[OutOfFold, BatchScores]:
    """A cross-validated network's or ensemble's out-of-fold rows and the scores
    the app gives them (an ensemble's under ``gate``, with the temperature and
    threshold each fold fitted on the other folds), with the out-of-fold verdicts
    of the chest-CT check beside it where there is one (or ``refused``)."""
    refused = refused if refused is not None else out_of_fold_refusals_beside(folder)
    report = out_of_fold_report(folder)
    if not (folder / ENSEMBLE_FILE).is_file():
        oof = OutOfFold([folder], refused)
        return oof, oof.scores()
    oof = OutOfFold(read_ensemble_spec(folder)[1], refused)
    return oof, oof.scores(fold_fits(report), gate)


SPREAD_METRICS = ("accuracy", "macro_f1", "roc_auc_macro", "ece", "coverage", "accuracy_when_confident")


def fold_spread(by_fold: dict) -> dict:
    """Mean and standard deviation over the folds of each headline figure of :func:`breakdown`."""
    return {metric: _spread([row[metric] for row in by_fold.values()]) for metric in SPREAD_METRICS}


def _spread(values: list[float | None]) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "folds": 0}
    return {"mean": float(np.mean(present)), "std": float(np.std(present, ddof=1)) if len(present) > 1 else 0.0,
            "folds": len(present)}


def breakdown(probs: np.ndarray, labels: np.ndarray, uncertain: np.ndarray, keys: np.ndarray,
              class_names: list[str]) -> dict:
    """Headline figures of every subset (a fold, a source), with its image count."""
    out = {}
    for key in sorted(set(keys.tolist()), key=str):
        mask = keys == key
        report = evaluation_report(labels[mask], probs[mask], class_names)
        row = {"images": int(mask.sum()), "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
               "roc_auc_macro": report["roc_auc"]["macro"], "ece": report["ece"],
               **{k: report[k] for k in ("sensitivity", "specificity") if k in report},
               **selective_summary(probs[mask], labels[mask], uncertain[mask])}
        if note := few_images_note(row["images"]):
            row["note"] = note
        out[str(key)] = row
    return out


def finalize_cv(setup, out: Path, index: DatasetIndex, folds: np.ndarray, images: torch.Tensor,
                labels: np.ndarray, meta_base: dict) -> None:
    """Out-of-fold report, calibration and thresholds; the final model, its card."""
    args, log = setup.args, setup.log
    cv_dir = out / "cv"
    oof = out_of_fold(setup, cv_dir, folds, images, labels)
    logits, ood_scores = oof["logits"], oof["ood"]
    probs, uncertain, crossfit = crossfit_flags(logits, labels, ood_scores, folds, target=args.target_accuracy,
                                                quantile=args.ood_quantile, far=oof["far"])

    # The shipped model: trained on everything, calibrated on every out-of-fold prediction.
    temperature = fit_temperature(logits, labels)
    ood_threshold = float(np.quantile(ood_scores, args.ood_quantile))
    confidence_threshold = selective_threshold(calibrated(logits, temperature), labels,
                                               ood_scores > ood_threshold, args.target_accuracy)
    save_fold_models(cv_dir, oof, crossfit, args.weight_storage)
    model, full_meta = _load_run(cv_dir / "full", args.weight_storage)
    layers = ood_feature_keys(get_spec(args.arch).feature_layers(model))
    _, features = batched_forward(model, images, setup.config, feature_layers=layers)
    ood = MahalanobisOOD.fit(features, labels, features)
    for name, gaussians in ood.layers.items():
        # Training images sit closer to their class means than unseen ones: the
        # folds measured by how much, and the full model's scale is moved by as much.
        gaussians.scale *= float(np.mean([r[name] for r in oof["ratios"]]))
    ood.threshold = ood_threshold
    ood.far_threshold = far_threshold(oof["far"])

    report = evaluation_report(labels, probs, index.class_names, index.display_names)
    sources = np.array([s.source for s in index.samples])
    by_fold = breakdown(probs, labels, uncertain, folds, index.class_names)
    report.update(
        split=f"out-of-fold ({args.cv}-fold cross-validation)",
        data=str(index.root),
        out_of_fold=True,
        folds=args.cv,
        ece_uncalibrated=evaluation_report(labels, calibrated(logits, 1.0), index.class_names)["ece"],
        temperature=temperature,
        ood_flagged=float(np.mean(ood_scores > ood_threshold)),
        **selective_summary(probs, labels, uncertain),
        risk_coverage=risk_coverage(probs, labels),
        fold_spread=fold_spread(by_fold),
        per_fold=by_fold,
        per_source=breakdown(probs, labels, uncertain, sources, index.class_names) if len(set(sources)) > 1 else {},
        crossfit=crossfit,
        model=out.name,
        arch=args.arch,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    for row in report["per_class"].values():
        if note := few_images_note(row["support"]):
            row["note"] = note
    rows = []
    for i, s in enumerate(index.samples):
        rows.append({"path": _rel(s.path, index.root), "source": s.source, "fold": int(folds[i]),
                     "true": index.class_names[labels[i]], "pred": index.class_names[int(probs[i].argmax())],
                     "confidence": float(probs[i].max()),
                     **{f"p_{c}": float(v) for c, v in zip(index.class_names, probs[i])},
                     "ood_score": float(ood_scores[i]), "far_score": float(oof["far"][i]),
                     "uncertain": bool(uncertain[i]), **image_identity(s.path)})

    full_state = {"epoch": full_meta.get("epoch"), "best_epoch": None,
                  "train_seconds": float(full_meta.get("train_seconds", 0.0))}
    meta = {**meta_base, "epoch": full_meta.get("epoch"), "temperature": temperature, "ood": ood.to_dict(),
            "confidence_threshold": confidence_threshold, "name": out.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    meta["metrics"] = {**short_metrics(report), "out_of_fold": True}
    (out / "model_card.json").unlink(missing_ok=True)
    save_model_file(out / WEIGHTS_FILE, model, meta, storage=args.weight_storage)
    write_report(report, rows, out / "eval_report.json")
    _merge_histories(cv_dir, out, [f"fold-{k}" for k in range(args.cv)] + ["full"])
    shipped: LoadedModel = load_model(out / WEIGHTS_FILE)
    card = model_card(args, out, meta, full_state, report, count_parameters(model), index)
    selective = {k: report[k] for k in ("coverage", "accuracy_when_confident", "answered", "images",
                                        "confident_mistakes")}
    card.update(
        validation=card_figures(report),
        cross_validation={
            "folds": args.cv, "images": int(len(labels)), "fold_sizes": np.bincount(folds).tolist(),
            "grouping": "stratified by source and class; groups kept whole: "
                        + (f"blocks of {args.split_block} consecutive file numbers, " if args.split_block else "")
                        + ("each file of a one-slice-per-study source alone, " if any(
                            Path(s.source).name in FILE_PER_PATIENT_SOURCES for s in index.samples) else "")
                        + (f"files matching {args.group_pattern!r} by its first group, " if args.group_pattern
                           else "") + "identical images",
            "schedule": f"fixed before training: {args.epochs} epochs, the last one kept (no epoch picked on "
                        "held-out images)",
            "cpu_seconds_folds": round(oof["fold_seconds"], 1),
            "cpu_seconds_final": round(full_state["train_seconds"], 1),
        },
        selective_answers={
            "target_accuracy": args.target_accuracy, "confidence_threshold": confidence_threshold,
            **selective,
            "statement": selective_statement(selective),
        },
    )
    card["calibration"] = {"method": f"temperature scaling fitted on the {len(labels)} out-of-fold predictions",
                           "temperature": temperature, "ece_before": report["ece_uncalibrated"],
                           "ece_after": report["ece"],
                           "note": "ECE after calibration is out-of-fold: each fold calibrated on the other folds"}
    card["out_of_distribution"]["threshold_rule"] = (f"{args.ood_quantile:.0%} quantile of out-of-fold scores "
                                                     "(each image scored by the fold model that never saw it)")
    card["out_of_distribution"]["far_threshold"] = ood.far_threshold
    card["out_of_distribution"]["far_threshold_rule"] = FAR_RULE
    card["out_of_distribution"].update(ood_check(shipped, report))
    card["latency_ms"] = measure_latency(shipped)
    card["limitations"] = [DISCLAIMER,
                           "Trained on 2-D slices from public datasets, not on whole CT studies; one slice is not a "
                           "diagnosis.",
                           "Figures are out-of-fold estimates on the same sources it was trained on; expect lower "
                           "accuracy on other scanners, hospitals and patient groups."]
    atomic_write_text(json.dumps(card, indent=2), out / "model_card.json")
    log(f"saved {out / WEIGHTS_FILE}: out-of-fold accuracy {report['accuracy']:.4f} "
        f"({report['fold_spread']['accuracy']['std']:.3f} sd over folds), macro-F1 {report['macro_f1']:.4f}, "
        f"ECE {report['ece']:.3f}; {card['selective_answers']['statement']}")


def _merge_histories(cv_dir: Path, out: Path, names: list[str]) -> None:
    """One history.csv for the whole run, a 'run' column naming the fold."""
    rows: list[dict] = []
    for name in names:
        path = cv_dir / name / "history.csv"
        if path.is_file():
            with open(path, newline="") as f:
                rows += [{"run": name, **row} for row in csv.DictReader(f)]
    if not rows:
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buffer.getvalue(), out / "history.csv")
