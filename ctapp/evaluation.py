"""Evaluating a loaded model on labelled files: the report that
``training.fit`` writes for its validation split, ``training.evaluate`` writes
for any folder, and the dashboard reads."""
from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_text, sha256_file
from .inference import CONFIDENT, NOT_CHEST_CT, UNLIKE_TRAINING, EnsembleModel, LoadedModel, score_files_read_once
from .metrics import evaluation_report, expected_calibration_error, risk_coverage, selective_summary
from .paths import PathNotAllowed, data_roots, is_inside, resolve_data_file

IMAGE_COLUMNS = ("image", "sha256")  # a row's image on any machine: see image_identity


def evaluate_files(model: LoadedModel | EnsembleModel, paths: list[Path], labels: list[int], *,
                   dedupe: bool = False, workers: int = 2, root: Path | None = None,
                   image_roots: list[Path] | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> tuple[dict, list[dict]]:
    """Report and per-image rows for ``paths`` with true ``labels`` (indices into
    the model's classes). Unreadable files are listed, not fatal; with
    ``dedupe`` an image repeated under several names counts once. Each row's
    ``uncertain`` and ``state`` are exactly what the app shows for that slice;
    its ``path`` is relative to ``root``, its ``image`` to the data root
    (of ``image_roots``, by default the server's) that holds it, its
    ``sha256`` that of the bytes it was scored from: each file is read once."""
    paths = [Path(p) for p in paths]
    scores, sha256s = score_files_read_once(model, paths, workers=workers, on_progress=on_progress)
    keep, seen, skipped = [], set(), 0
    for i, (error, digest) in enumerate(zip(scores.errors, scores.digests)):
        if error:
            continue
        if dedupe and digest in seen:
            skipped += 1
            continue
        seen.add(digest)
        keep.append(i)
    if not keep:
        raise ValueError("no readable images to evaluate")
    y_true = np.asarray(labels)[keep]
    probs, ood_scores = scores.probs[keep], scores.ood_scores[keep]
    states = [scores.states[i] for i in keep]

    def rel(p: Path) -> str:
        return str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else str(p)

    report = evaluation_report(y_true, probs, model.class_names, model.display_names)
    selective = selective_summary(probs, y_true, np.array([state != CONFIDENT for state in states]))
    report.update(
        images_found=len(paths),
        duplicates_skipped=skipped,
        dedupe=dedupe,
        unreadable={rel(paths[i]): e for i, e in enumerate(scores.errors) if e},
        ece_uncalibrated=expected_calibration_error(scores.raw_probs[keep], y_true),
        temperature=model.temperature,
        model=model.name,
        model_version=model.version,
        arch=model.arch,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ood_flagged=float(np.mean([state in (NOT_CHEST_CT, UNLIKE_TRAINING) for state in states])),
        **{k: selective[k] for k in ("coverage", "answered", "accuracy_when_confident", "confident_mistakes")},
        states={state: states.count(state) for state in dict.fromkeys(states)},
        risk_coverage=risk_coverage(probs, y_true),
    )
    rows = []
    for i, p, score, state in zip(keep, probs, ood_scores, states):
        rows.append({
            "path": rel(paths[i]),
            "true": model.class_names[int(labels[i])],
            "pred": model.class_names[int(p.argmax())],
            "confidence": float(p.max()),
            **{f"p_{name}": float(v) for name, v in zip(model.class_names, p)},
            "ood_score": float(score),
            "uncertain": state != CONFIDENT,
            "state": state,
            **image_identity(paths[i], image_roots, sha256=sha256s[i]),
        })
    return report, rows


def image_identity(path: str | Path, roots: list[Path] | None = None, sha256: str | None = None) -> dict[str, str]:
    """How a report row names its image on any machine: ``image``, the path below
    the data root that holds it (symlinks followed; '' under none), and ``sha256``
    of its bytes ('' when unreadable; read from the file unless given). Neither
    depends on where the repository or the data folder lies, as the row's
    ``path`` (relative to the report's ``data``, as training was given it) does."""
    roots = data_roots() if roots is None else [Path(r).resolve() for r in roots]
    try:
        real = Path(path).resolve()
        digest = sha256 or sha256_file(real)
    except (OSError, RuntimeError):
        return {"image": "", "sha256": ""}
    image = next((real.relative_to(root).as_posix() for root in roots if real.is_relative_to(root)), "")
    return {"image": image, "sha256": digest}


def locate_image(row: dict, roots: list[Path] | None = None) -> Path | None:
    """The file on this server that a report row names by :func:`image_identity`:
    its ``image`` below a data root, or, where the data is laid out differently,
    a file of the same name below a root with the row's ``sha256``. A file whose
    bytes no longer match the hash is not the image; only files inside the
    roots are returned."""
    roots = data_roots() if roots is None else [Path(r).resolve() for r in roots]
    image, digest = str(row.get("image") or ""), str(row.get("sha256") or "")
    for root in roots if image else []:
        try:
            found = resolve_data_file(image, root, roots)
        except PathNotAllowed:
            continue
        if not digest or sha256_file(found) == digest:
            return found
    name = Path(image or str(row.get("path") or "")).name
    if not digest or name in ("", ".", ".."):
        return None
    try:
        for root in roots:
            for candidate in root.rglob(glob.escape(name)):
                if candidate.is_file() and is_inside(candidate, roots) and sha256_file(candidate) == digest:
                    return candidate.resolve()
    except OSError:  # a folder that cannot be listed or a file that cannot be read: not found
        return None
    return None


def predictions_path(report_path: Path) -> Path:
    return Path(report_path).with_suffix(".csv")


def write_report(report: dict, rows: list[dict], path: str | Path) -> Path:
    """Write ``path`` (JSON) and the per-image CSV beside it; returns the CSV path.

    CSV cells that a spreadsheet would run as a formula (a file named ``=2+5``)
    are written as text; :func:`read_predictions` gives them back unchanged."""
    from .report import spreadsheet_cell

    path = Path(path)
    csv_path = predictions_path(path)
    report = {**report, "predictions_csv": csv_path.name}
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: spreadsheet_cell(value) for key, value in row.items()} for row in rows)
    atomic_write_text(buffer.getvalue(), csv_path)
    atomic_write_text(json.dumps(report, indent=2), path)
    return csv_path


def read_predictions(report_path: str | Path) -> list[dict]:
    csv_path = predictions_path(Path(report_path))
    if not csv_path.is_file():
        return []
    from .report import from_spreadsheet_cell

    with open(csv_path, newline="", encoding="utf-8") as f:
        return [{key: from_spreadsheet_cell(value or "") for key, value in row.items()} for row in csv.DictReader(f)]
