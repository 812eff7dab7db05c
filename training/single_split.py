"""A single split: train on the training split, keep the epoch with the best
validation macro-F1, then calibrate it, fit its out-of-distribution reference
and report on the validation split (``python -m training.fit`` without ``--cv``).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ctapp.audit import audit_dataset
from ctapp.checkpoint import atomic_write_text, load_model_file, pack_state, save_model_file, unpack_state
from ctapp.data import DatasetError, DatasetIndex, assign_splits, scan_sources
from ctapp.evaluation import evaluate_files, write_report
from ctapp.inference import LoadedModel, batched_forward
from ctapp.metrics import fit_temperature
from ctapp.model_folders import CARD_FILE, REPORT_FILE, WEIGHTS_FILE, load_model
from ctapp.models import count_parameters, get_spec
from ctapp.ood import MahalanobisOOD, ood_feature_keys
from ctapp.preprocess import PreprocessConfig, load_squares
from training.card import measure_latency, meta_for, model_card, ood_check, short_metrics
from training.engine import Progress
from training.foreign import far_threshold
from training.trainer import BEST_FILE, STATE_FILE, Setup, discard_checkpoints, train_model


def prepare_data(args, log) -> tuple[DatasetIndex, dict, dict]:
    """Scan, audit and split; returns the index with splits, the audit summary and the full report."""
    index = scan_sources(args.data)
    log(f"data: {index.root} ({index.layout} layout), {len(index.samples)} files, classes {index.class_names}")
    audit = audit_dataset(index, workers=args.workers)
    report = audit.to_dict()
    for warning in report["warnings"]:
        log(f"audit: {warning}")
    log(f"audit: {report['redundant_copies']} redundant copies in {report['duplicate_groups']} duplicate groups, "
        f"{report['cross_split_copies']} cross-split copies, {len(report['label_conflicts'])} label conflicts, "
        f"{len(report['unreadable'])} unreadable; shortcut probe accuracy "
        f"{report['shortcut_probe'].get('accuracy')} (chance {report['shortcut_probe']['chance']:.2f})")
    unreadable = {r.sample.path for r in audit.records if r.error}
    exclude = unreadable | (set() if args.keep_duplicates else set(audit.dropped))
    if index.layout == "classes":
        index = assign_splits(index, val_fraction=args.val_fraction, seed=args.seed,
                              block_size=args.split_block or None, pattern=args.group_pattern, exclude=exclude)
    else:
        index.samples = [s for s in index.samples if s.path not in exclude]
        if "valid" not in index.splits and "train" in index.splits:
            log("no validation split found: holding out part of the training split")
            index.samples = [s for s in index.samples if s.split == "train"]
            index.layout = "classes"
            index = assign_splits(index, val_fraction=args.val_fraction, seed=args.seed,
                                  block_size=args.split_block or None, pattern=args.group_pattern)
    train, valid = index.split("train"), index.split("valid")
    if not train or not valid:
        raise DatasetError(f"{args.data}: need readable images in both a training and a validation split "
                           f"(found {len(train)} and {len(valid)})")
    counts = np.bincount([s.label for s in train], minlength=len(index.class_names))
    empty = [index.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(f"{args.data}: class(es) {empty} have no readable training images; "
                           "remove the empty folder or add images")
    return index, audit.summary(), report


def train_single_split(setup: Setup) -> Path:
    """One training and one validation split: the best epoch by validation macro-F1
    is kept, calibrated and reported on that split."""
    args, log = setup.args, setup.log
    out = Path(args.out)
    if args.resume and (out / WEIGHTS_FILE).is_file() and not (out / STATE_FILE).is_file():
        log(f"--resume: {out} holds a finished model and no checkpoint (kept only with --keep-checkpoints); "
            "nothing to do. Train again without --resume to replace it")
        return out
    index, audit_summary, audit_report = prepare_data(args, log)
    setup.class_names = index.class_names
    train, valid = index.split("train"), index.split("valid")
    log(f"split: train {len(train)}, valid {len(valid)} images | {setup.precision.describe()} | "
        f"world size {setup.world}")
    bar = Progress(len(train), "caching", unit="image", enabled=setup.is_main and not args.quiet)
    train_images = load_squares([s.path for s in train], setup.config, workers=args.workers,
                                on_progress=lambda done, total: bar.update(done)).images
    valid_images = load_squares([s.path for s in valid], setup.config, workers=args.workers).images
    valid_labels = np.array([s.label for s in valid])
    meta_base = meta_for(args, setup.config, index, audit_summary)
    if setup.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(audit_report, indent=2), out / "audit.json")
    _, state = train_model(setup, out, train_images, [s.label for s in train], valid_images, valid_labels,
                           meta_base=meta_base, keep_best=True, seed=args.seed)
    if setup.is_main and not state["paused"]:
        finalize(args, out, state, index, train_images, valid_images, valid_labels, log)
        discard_checkpoints(out, args)
    return out


def finalize(args, out: Path, state: dict, index: DatasetIndex, train_images, valid_images, valid_labels,
             log) -> None:
    """Best epoch -> weights as they will be stored, temperature, OOD reference,
    validation report, model card, model.pt."""
    model, best_meta = load_model_file(out / BEST_FILE)
    valid = index.split("valid")

    def validate(meta: dict) -> tuple[dict, list[dict]]:
        # Computed exactly as training.evaluate computes it: through a LoadedModel.
        report, rows = evaluate_files(LoadedModel(model, meta, path=out), [s.path for s in valid],
                                      [s.label for s in valid], workers=args.workers, root=index.root)
        return {**report, "split": "valid", "data": str(index.root)}, rows

    fp32_report, _ = validate(best_meta)
    # Everything below is fitted on the weights exactly as model.pt will hold them.
    model.load_state_dict(unpack_state(*pack_state(model.state_dict(), args.weight_storage)))
    config = PreprocessConfig.from_dict(best_meta["preprocess"])
    layers = ood_feature_keys(get_spec(args.arch).feature_layers(model))
    logits, valid_features = batched_forward(model, valid_images, config, feature_layers=layers)
    _, train_features = batched_forward(model, train_images, config, feature_layers=layers)
    temperature = fit_temperature(logits, valid_labels)
    ood = MahalanobisOOD.fit(train_features, np.array([s.label for s in index.split("train")]), valid_features)
    valid_scores, valid_far_scores = ood.scores(valid_features)
    ood.threshold = float(np.quantile(valid_scores, args.ood_quantile))
    ood.far_threshold = far_threshold(valid_far_scores)
    meta = {**best_meta, "temperature": temperature, "ood": ood.to_dict(), "name": out.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    report, rows = validate(meta)
    meta["metrics"] = short_metrics(report)
    # A card left by an earlier finalisation describes weights about to be replaced.
    (out / CARD_FILE).unlink(missing_ok=True)
    save_model_file(out / WEIGHTS_FILE, model, meta, storage=args.weight_storage)
    write_report(report, rows, out / REPORT_FILE)
    shipped = load_model(out / WEIGHTS_FILE)
    card = model_card(args, out, meta, state, report, count_parameters(model), index)
    card["out_of_distribution"].update(ood_check(shipped, report))
    card["latency_ms"] = measure_latency(shipped)
    card["weight_storage_check"] = {
        "fp32 (uncalibrated)": {k: fp32_report[k] for k in ("accuracy", "macro_f1", "ece")},
        f"{args.weight_storage} (uncalibrated)": {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                                                  "ece": report["ece_uncalibrated"]},
    }
    atomic_write_text(json.dumps(card, indent=2), out / CARD_FILE)
    log(f"saved {out / WEIGHTS_FILE} (epoch {state['best_epoch']}, validation macro-F1 {report['macro_f1']:.4f}, "
        f"ECE {report['ece_uncalibrated']:.3f} -> {report['ece']:.3f} at T={temperature:.2f})")
