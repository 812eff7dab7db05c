"""Print the README's table of shipped models (from their model cards) and the
exact commands that trained them.

    python -m training.models_table [MODELS_DIR] [--readme README.md]

With ``--readme`` the table replaces what lies between the README's
``<!-- models-table ... -->`` and ``<!-- /models-table -->`` markers.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from ctapp.model_folders import DEFAULT_MODELS_DIR, ENSEMBLE_FILE, list_models, read_ensemble_spec

# Options that describe the run rather than the model, left out of the printed command (a packed set gives
# the same run as its folders).
RUN_ONLY = {"quiet", "resume", "keep_checkpoints", "stop_after", "workers", "device", "pack"}
# Printed even at their defaults: what a reader looks for first.
ALWAYS = {"data", "arch", "weights", "epochs", "img_size", "augment", "out"}


def command(settings: dict, out: str | None = None) -> str:
    """The training command with every option that differs from its default
    (``out`` replaces the output folder the run used)."""
    from training.fit import get_args_parser
    from training.trainer import default_freeze_epochs

    defaults = {a.dest: a.default for a in get_args_parser()._actions}
    # A card records the number of frozen epochs the run resolved from its weights.
    defaults["freeze_epochs"] = default_freeze_epochs(str(settings.get("weights", defaults["weights"])))
    parts = ["python -m training.fit"]
    for key, value in settings.items():
        if key == "out" and out:
            value = out
        default = defaults.get(key)
        at_default = value == default or (isinstance(default, tuple) and list(default) == value)
        if key in RUN_ONLY or value is None or value is False or (at_default and key not in ALWAYS):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _spread(val: dict, metric: str, percent: bool) -> str:
    std = ((val.get("fold_spread") or {}).get(metric) or {}).get("std")
    if std is None:
        return ""
    return f" ± {std:.1%}" if percent else f" ± {std:.3f}"


def _worst_shift(shift: dict) -> str:
    """The simulated shift with the most confident mistakes (share of all its slices)."""
    name, row = max(shift["shifts"].items(), key=lambda item: item[1]["confident_mistakes"])
    return f"{row['confident_mistakes']:.1%} ({name})"


def table(folder: Path) -> str:
    """One row per model: the figures its card headlines (out-of-fold with their
    spread over folds when it was cross-validated, else its validation split)."""
    rows = ["| model | task | architecture | figures from | images | accuracy | macro-F1 | AUC | ECE | "
            "answers given / right when answering | confident mistakes, worst simulated shift | size | "
            "CPU ms (predict / +Grad-CAM) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    commands = []
    for entry in list_models([folder]):
        card = entry.card
        val = card.get("validation", {})
        latency = card.get("latency_ms", {})
        folds = (card.get("cross_validation") or {}).get("folds")
        origin = f"out-of-fold, {folds}-fold CV" if folds else "validation split"
        selective = card.get("selective_answers") or {}
        answers = (f"{_pct(selective.get('coverage'))} / {_pct(selective.get('accuracy_when_confident'))}"
                   if selective else "n/a")
        auc = (val.get("roc_auc") or {}).get("macro")
        shift = card.get("shift_simulation") or {}
        worst = _worst_shift(shift) if shift else "n/a"
        size = card.get("size_bytes")
        rows.append(  # a figure the card does not hold reads n/a, never 0
            f"| `{entry.name}` | {entry.task} | "
            f"{card.get('architecture_title') or card.get('architecture') or 'n/a'} | "
            f"{origin} | {val.get('images', 'n/a')} | {_pct(val.get('accuracy'))}{_spread(val, 'accuracy', True)} | "
            f"{_num(val.get('macro_f1'))}{_spread(val, 'macro_f1', False)} | {_num(auc)} | "
            f"{_num(card.get('calibration', {}).get('ece_after'))} | {answers} | {worst} | "
            f"{'n/a' if size is None else f'{size / 1e6:.1f} MB'} | "
            f"{latency.get('predict', '?')} / {latency.get('predict_gradcam', '?')} |")
        if (entry.path / ENSEMBLE_FILE).is_file():
            # The member folders as ensemble.json names them: what loading the ensemble uses.
            members = " ".join(f"models/{m.name}" for m in read_ensemble_spec(entry.path)[1])
            target = (card.get("selective_answers") or {}).get("target_accuracy")
            commands.append(f"# {entry.name}\npython -m training.ensemble --members {members} "
                            f"--out models/{entry.path.name}" + (f" --target-accuracy {target:g}" if target else ""))
            continue
        settings = dict(card.get("training", {}).get("settings", {}))
        # Cards written before a preprocessing option existed trained without it.
        preprocessing = card.get("preprocessing") or {}
        for option in ("crop", "intensity"):
            settings.setdefault(option, preprocessing.get(option, "none"))
        commands.append(f"# {entry.name}\n" + command(settings, out=f"models/{entry.path.name}"))
    return "\n".join(rows) + "\n\n```bash\n" + "\n".join(commands) + "\n```"


def write_into(readme: Path, text: str) -> None:
    content = readme.read_text(encoding="utf-8")
    pattern = re.compile(r"(<!-- models-table[^>]*-->\n).*?(<!-- /models-table -->)", re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme}: no <!-- models-table --> ... <!-- /models-table --> markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), content), encoding="utf-8")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The README's table of shipped models and their training commands.",
                                add_help=add_help)
    p.add_argument("models", nargs="?", type=Path, default=DEFAULT_MODELS_DIR, help="folder of model folders")
    p.add_argument("--readme", type=Path, help="write the table into this README between its markers")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    text = table(args.models)
    if args.readme:
        write_into(args.readme, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
