"""What a trained model says about itself: the provenance stored in its
checkpoint and the model card written beside it, with the checks measured for
the card (out-of-distribution flags on clearly foreign images, CPU latency).

Shared by the single-split run, cross-validation and ensembles; it knows
nothing of how a model was trained.
"""
from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import ctapp
from ctapp.checkpoint import sha256_file
from ctapp.data import DatasetIndex
from ctapp.inference import NOT_CHEST_CT, UNLIKE_TRAINING, LoadedModel
from ctapp.model_folders import WEIGHTS_FILE
from ctapp.models import get_spec
from ctapp.preprocess import PreprocessConfig
from training.foreign import FAR_RULE, ct_phantom, foreign_images

DISCLAIMER = "Research use only. Not a medical device; not for diagnosis or treatment decisions."


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"ctapp {ctapp.__version__}" + (f" ({sha})" if sha else "")


def describe_data(index: DatasetIndex, audit_summary: dict) -> dict:
    return {"root": str(index.root), "sources": sorted({s.source for s in index.samples}),
            "fingerprint": index.fingerprint(), "layout": index.layout, "splits": index.counts(),
            "notes": index.notes, "audit": audit_summary}


def meta_for(args, config: PreprocessConfig, index: DatasetIndex, audit_summary: dict) -> dict:
    """What every checkpoint of a run stores beside its weights: architecture,
    classes, preprocessing, the settings and data it was trained with."""
    return {
        "arch": args.arch, "class_names": index.class_names, "display_names": index.display_names,
        "preprocess": config.to_dict(), "cam_layer": get_spec(args.arch).cam_layer,
        "train_args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": describe_data(index, audit_summary),
        "code_version": code_version(),
    }


def short_metrics(report: dict) -> dict:
    """The headline figures a checkpoint carries in its ``metrics``."""
    keys = ("images", "accuracy", "macro_f1", "ece", "sensitivity", "specificity", "positive_class")
    short = {k: report[k] for k in keys if k in report}
    short["roc_auc_macro"] = report["roc_auc"]["macro"]
    return short


def card_figures(report: dict) -> dict:
    """The figures of an out-of-fold report that a card's ``validation`` headlines."""
    keys = ("images", "accuracy", "macro_f1", "roc_auc", "per_class", "sensitivity", "specificity",
            "positive_class", "fold_spread", "per_source", "coverage", "accuracy_when_confident", "split")
    return {k: report[k] for k in keys if k in report}


def ood_check(model: LoadedModel, report: dict) -> dict:
    """Share of validation slices and of clearly foreign images that the OOD check flags."""
    states = {name: model.predict(image).state for name, image in foreign_images().items()}
    flagged = {name: state in (NOT_CHEST_CT, UNLIKE_TRAINING) for name, state in states.items()}
    return {"validation_flagged": report.get("ood_flagged"),
            "foreign_flagged": sum(flagged.values()) / len(flagged), "foreign_images": flagged,
            "foreign_not_chest_ct": sum(state == NOT_CHEST_CT for state in states.values()) / len(states),
            "foreign_states": states}


def measure_latency(model: LoadedModel, repeat: int = 10) -> dict:
    """Median CPU milliseconds of predict and predict + Grad-CAM on one 512x512 slice."""
    image = ct_phantom(512)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return round(float(np.median(times)), 1)

    return {"predict": median_ms(lambda: model.predict(image)),
            "predict_gradcam": median_ms(lambda: model.analyse(image)),
            "image": "512x512", "threads": torch.get_num_threads(), "machine": platform.machine()}


def model_card(args, out: Path, meta: dict, state: dict, report: dict, parameters: int,
               index: DatasetIndex) -> dict:
    spec = get_spec(args.arch)
    weights_origin = {"none": "from scratch (random initialisation)",
                      "imagenet": f"ImageNet ({spec.imagenet_weights}, torchvision)"}.get(
        str(args.weights), f"local torchvision weight file {Path(str(args.weights)).name}")
    return {
        "name": out.name,
        "task": args.task or " / ".join(index.display_names),
        "classes": index.class_names,
        "display_names": index.display_names,
        "architecture": args.arch,
        "architecture_title": spec.title,
        "weights_origin": weights_origin,
        "parameters": parameters,
        "weight_storage": args.weight_storage,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
        "size_bytes": (out / WEIGHTS_FILE).stat().st_size,
        "preprocessing": meta["preprocess"],
        "gradcam_layer": meta["cam_layer"],
        "training_data": meta["dataset"],
        "training": {"settings": meta["train_args"], "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
                     "train_seconds": round(state["train_seconds"], 1),
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "validation": {k: report[k] for k in ("images", "accuracy", "macro_f1", "roc_auc", "per_class",
                                              "sensitivity", "specificity", "positive_class") if k in report},
        "calibration": {"method": "temperature scaling fitted on the validation split",
                        "temperature": meta["temperature"], "ece_before": report["ece_uncalibrated"],
                        "ece_after": report["ece"]},
        "out_of_distribution": {"method": "Mahalanobis distance of pooled features to the nearest training-class "
                                          "mean (PCA, shared covariance) at every backbone stage, pooled by mean, "
                                          "spread and peak, relative to its validation median; the score is the "
                                          "geometric mean of these ratios",
                                "layers": list(meta["ood"]["layers"]),
                                "threshold": meta["ood"]["threshold"],
                                "threshold_rule": f"{args.ood_quantile:.0%} quantile of validation scores",
                                "far_threshold": meta["ood"].get("far_threshold"),
                                "far_threshold_rule": FAR_RULE},
        "confidence_threshold": meta.get("confidence_threshold") or round(0.5 + 0.5 / len(index.class_names), 4),
        "created": meta["created"],
        "code_version": meta["code_version"],
        "intended_use": "Research and education: exploring CT slice classifiers and their explanations.",
        "limitations": [
            DISCLAIMER,
            "Trained on 2-D slices from public datasets, not on whole CT studies; one slice is not a diagnosis.",
            "Validation figures come from a small split of the same sources; expect lower accuracy on other "
            "scanners, hospitals and patient groups.",
        ],
        "disclaimer": DISCLAIMER,
    }
