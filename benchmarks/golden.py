"""Golden values of the shipped models: each model's calibrated probabilities on
a few fixed slices, stored in ``tests/golden/<model>.json`` and checked by
``tests/test_golden.py``.

    .venv/bin/python -m benchmarks.golden            # compare, print the largest difference per model
    .venv/bin/python -m benchmarks.golden --update   # (re)write tests/golden/ after retraining a model

A change to shared preprocessing shifts training and inference together, so no
other test sees it; the stored probabilities do. The fixed slices are
deterministic phantoms (``training.foreign.ct_phantom``, square and not) and,
where ``../shared/data`` is present, a few named real slices of the model's task.
Each file records the SHA-256 of the weights it was computed with: when a model
is retrained the test says so and asks for ``--update``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctapp.checkpoint import sha256_file  # noqa: E402
from ctapp.model_folders import DEFAULT_MODELS_DIR, WEIGHTS_FILE, load_model  # noqa: E402
from training.foreign import ct_phantom  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "tests" / "golden"
SHARED_DATA = REPO.parent / "shared" / "data"
TOLERANCE = 1e-3
UPDATE_COMMAND = ".venv/bin/python -m benchmarks.golden --update"

# Phantoms: ct_phantom(size, seed) cropped to rows/cols (None: whole), so that the
# padding of wide and tall slices is exercised too.
PHANTOMS = {
    "phantom-512": {"size": 512, "seed": 0, "rows": None, "cols": None},
    "phantom-wide": {"size": 256, "seed": 1, "rows": [48, 208], "cols": None},
    "phantom-tall": {"size": 256, "seed": 2, "rows": None, "cols": [40, 200]},
}
# Real slices under ../shared/data, by the dataset folder a model was trained on
# (matched against the training data root in its model card).
REAL_SLICES = {
    "chest-ct-scan-images": [
        "chest-ct-scan-images/Data/valid/adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib/000108 (7).png",
        "chest-ct-scan-images/Data/valid/normal/003828_02_01_174.png",
        "chest-ct-scan-images/Data/valid/squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa/000110 (6).png",
    ],
    "sarscov2-ctscan": [
        "sarscov2-ctscan/COVID/Covid (1).png",
        "sarscov2-ctscan/non-COVID/Non-Covid (1).png",
    ],
}


def phantom(recipe: dict) -> np.ndarray:
    pixels = ct_phantom(recipe["size"], recipe["seed"])
    if recipe["rows"]:
        pixels = pixels[recipe["rows"][0]:recipe["rows"][1]]
    if recipe["cols"]:
        pixels = pixels[:, recipe["cols"][0]:recipe["cols"][1]]
    return pixels


def model_folders(models_dir: Path = DEFAULT_MODELS_DIR) -> list[Path]:
    return sorted(p for p in models_dir.iterdir() if (p / WEIGHTS_FILE).is_file()) if models_dir.is_dir() else []


def golden_path(folder: Path) -> Path:
    return GOLDEN_DIR / f"{folder.name}.json"


def real_slices_for(folder: Path) -> list[str]:
    card_path = folder / "model_card.json"
    root = json.loads(card_path.read_text())["training_data"]["root"] if card_path.is_file() else ""
    return [path for dataset, paths in REAL_SLICES.items() if dataset in root for path in paths]


def slice_source(entry: dict) -> np.ndarray | Path | None:
    """What to feed the model for a stored slice; None when its real file is absent here."""
    if entry["source"] == "phantom":
        return phantom(entry["phantom"])
    path = SHARED_DATA / entry["path"]
    return path if path.is_file() else None


def compute(folder: Path) -> dict:
    """The golden record of one model folder, computed now."""
    model = load_model(folder)
    entries = [{"name": name, "source": "phantom", "phantom": recipe} for name, recipe in PHANTOMS.items()]
    entries += [{"name": Path(path).name, "source": "shared_data", "path": path} for path in real_slices_for(folder)
                if (SHARED_DATA / path).is_file()]
    for entry in entries:
        p = model.predict(slice_source(entry))
        entry.update(label=p.label, probabilities={k: round(v, 6) for k, v in p.probabilities.items()})
    return {"model": folder.name, "weights_sha256": sha256_file(folder / WEIGHTS_FILE), "tolerance": TOLERANCE,
            "regenerate": UPDATE_COMMAND, "slices": entries}


def compare(folder: Path) -> float:
    """Largest absolute probability difference against the stored values (available slices only)."""
    golden = json.loads(golden_path(folder).read_text())
    model = load_model(folder)
    worst = 0.0
    for entry in golden["slices"]:
        source = slice_source(entry)
        if source is None:
            continue
        got = model.predict(source).probabilities
        worst = max(worst, max(abs(got[k] - v) for k, v in entry["probabilities"].items()))
    return worst


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Golden probabilities of the shipped models.", add_help=add_help)
    p.add_argument("--update", action="store_true", help=f"rewrite {GOLDEN_DIR.relative_to(REPO)}/ from the models")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR, help="folder of model folders")
    return p


def main(args: argparse.Namespace) -> int:
    folders = model_folders(args.models)
    if not folders:
        print(f"no model folders in {args.models}", file=sys.stderr)
        return 2
    if args.update:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        names = {f.name for f in folders}
        for stale in GOLDEN_DIR.glob("*.json"):
            if stale.stem not in names:
                stale.unlink()
                print(f"removed {stale.relative_to(REPO)} (no such model any more)")
        if not SHARED_DATA.is_dir():
            print(f"note: {SHARED_DATA} is absent: golden values for phantoms only")
        for folder in folders:
            record = compute(folder)
            golden_path(folder).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {golden_path(folder).relative_to(REPO)}: {len(record['slices'])} slices")
        return 0
    status = 0
    for folder in folders:
        if not golden_path(folder).is_file():
            print(f"{folder.name}: no golden values (run {UPDATE_COMMAND})")
            status = 1
            continue
        worst = compare(folder)
        print(f"{folder.name}: largest difference {worst:.2e} (tolerance {TOLERANCE:g})")
        status |= worst > TOLERANCE
    return int(status)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
