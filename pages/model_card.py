"""Model cards: everything recorded about each model (``model_card.json``),
its training curves (``history.csv``) and the audit of its training data
(``audit.json``): class balance, duplicates, label conflicts, the shortcut probe
and the warnings training raised.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import streamlit as st

from ctapp import figures, ui_cache
from ctapp.checkpoint import CheckpointError
from ctapp.chest_check import CARD_FILE as CHECK_CARD_FILE
from ctapp.chest_check import CHECK_FOLDER
from ctapp.model_folders import ENSEMBLE_FILE, ModelEntry, read_ensemble_spec
from ctapp.metrics import few_images_note
from ctapp.quantized import CALIBRATION_FILE
from ctapp.report import DISCLAIMER
from ctapp.scope import SCOPE_FILE

# Card keys shown in their own sections; anything else appears under "Other fields".
SHOWN = {"name", "task", "classes", "display_names", "architecture", "architecture_title", "weights_origin",
         "parameters", "weight_storage", "weights_file", "weights_sha256", "size_bytes", "preprocessing",
         "gradcam_layer", "training_data", "training", "validation", "calibration", "out_of_distribution",
         "confidence_threshold", "created", "code_version", "intended_use", "limitations", "disclaimer",
         "weight_storage_check", "latency_ms", "cross_validation", "selective_answers", "shift_simulation",
         "members", "member_comparison", "series_validation"}
# The figures by which an ensemble's card compares it with each member, as the dashboard names them.
COMPARED = {"accuracy": "Accuracy", "macro_f1": "Macro-F1", "roc_auc_macro": "ROC AUC (macro)", "ece": "ECE",
            "coverage": "Answered (not uncertain)", "accuracy_when_confident": "Accuracy when answered"}


# --------------------------------------------------------------------------- plain functions


def fmt(value) -> str:
    """A card value in words: numbers rounded, lists joined, nested objects as compact JSON."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) if all(not isinstance(v, (dict, list)) for v in value) \
            else json.dumps(value)
    if isinstance(value, Mapping):
        if all(not isinstance(v, (dict, list)) for v in value.values()):
            return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
        return json.dumps(value)
    return str(value)


def key_values(mapping: Mapping | None, names: Mapping[str, str] | None = None) -> list[dict]:
    """Rows {Field, Value} of a flat mapping (nested values as JSON)."""
    names = names or {}
    return [{"Field": names.get(k, k.replace("_", " ")), "Value": fmt(v)} for k, v in (mapping or {}).items()]


def latency_text(card: Mapping) -> str | None:
    latency = figures.card_latency_ms(card)
    if not latency:
        return None
    parts = [f"{latency['predict']:g} ms per slice"] if "predict" in latency else []
    if "predict_gradcam" in latency:
        parts.append(f"{latency['predict_gradcam']:g} ms with Grad-CAM")
    raw = card.get("latency_ms")
    where = [f"{raw[k]}" + (" threads" if k == "threads" else "") for k in ("image", "threads", "machine")
             if isinstance(raw, Mapping) and raw.get(k)]
    return ", ".join(parts) + (f" (CPU; {', '.join(where)})" if where else "")


def short_hash(value: str | None) -> str | None:
    """The first 16 hex digits (the full hash is in the JSON tab)."""
    return f"{value[:16]}..." if value and len(value) > 16 else value


def headline_metrics(card: Mapping) -> list[tuple[str, str, str]]:
    """(label, value, help) of the figures shown at the top of a card: out-of-fold
    figures with their spread over folds for a cross-validated model, validation
    figures otherwise, always with the number of images behind them."""
    validation = card.get("validation") or {}
    calibration = card.get("calibration") or {}
    spread = validation.get("fold_spread") or {}
    auc = (validation.get("roc_auc") or {}).get("macro")
    images = validation.get("images", "?")
    cv = card.get("cross_validation") or {}
    where = (f"out-of-fold on {images} images ({cv.get('folds', '?')}-fold cross-validation)" if spread
             else f"on a validation split of {images} images")
    if note := few_images_note(images):
        where += f"; {note}"

    def pct(v):
        return "n/a" if v is None else f"{v:.1%}"

    def sd(metric, percent):
        std = (spread.get(metric) or {}).get("std")
        if std is None:
            return ""
        return f" ± {std:.1%}" if percent else f" ± {std:.3f}"

    out = [
        ("Accuracy" if spread else "Validation accuracy", pct(validation.get("accuracy")) + sd("accuracy", True),
         where + ("; ± the standard deviation over folds" if spread else "")),
        ("Macro-F1", ("n/a" if validation.get("macro_f1") is None else f"{validation['macro_f1']:.3f}")
         + sd("macro_f1", False), "mean F1 over classes, " + where),
        ("ROC AUC (macro)", ("n/a" if auc is None else f"{auc:.3f}") + sd("roc_auc_macro", False),
         "one-vs-rest, averaged over classes"),
        ("ECE after calibration", "n/a" if calibration.get("ece_after") is None else f"{calibration['ece_after']:.3f}",
         "expected calibration error of the calibrated probabilities"),
    ]
    if "sensitivity" in validation:
        positive = dict(zip(card.get("classes", []), card.get("display_names", []))).get(
            validation.get("positive_class"), validation.get("positive_class"))
        out.append((f"Sensitivity ({positive})", pct(validation.get("sensitivity")), "recall of the positive class"))
        out.append(("Specificity", pct(validation.get("specificity")), "recall of the negative class"))
    selective = card.get("selective_answers") or {}
    if selective.get("coverage") is not None:
        out.append(("Answers given", pct(selective.get("coverage")),
                    "share of slices answered (the rest: uncertain), out-of-fold"))
        out.append(("Right when it answers", pct(selective.get("accuracy_when_confident")),
                    f"target {selective.get('target_accuracy', 0):.0%}; out-of-fold"))
    return out


def per_class_rows(card: Mapping) -> list[dict]:
    validation = card.get("validation") or {}
    names = dict(zip(card.get("classes", []), card.get("display_names", [])))
    aucs = (validation.get("roc_auc") or {}).get("per_class") or {}
    return [{"Class": names.get(k, k), "Precision": v.get("precision"), "Recall": v.get("recall"), "F1": v.get("f1"),
             "AUC": aucs.get(k), "Images": v.get("support"),
             "Note": few_images_note(v.get("support"))}
            for k, v in (validation.get("per_class") or {}).items()]


def per_source_rows(card: Mapping) -> list[dict]:
    """Out-of-fold figures per data source of a model trained on several."""
    return [{"Source": name, "Images": row.get("images"), "Accuracy": row.get("accuracy"),
             "Macro-F1": row.get("macro_f1"), "AUC": row.get("roc_auc_macro"), "Answered": row.get("coverage"),
             "Right when answering": row.get("accuracy_when_confident"), "Note": row.get("note", "")}
            for name, row in ((card.get("validation") or {}).get("per_source") or {}).items()]


def member_comparison_rows(card: Mapping) -> list[dict]:
    """An ensemble card's ``member_comparison`` as a table: one row per model, the ensemble first."""
    rows = []
    for name, values in (card.get("member_comparison") or {}).items():
        model = f"{card.get('name', 'the ensemble')} (the ensemble)" if name == "ensemble" else name
        rows.append({"Model": model, **{label: figures.format_metric(label, (values or {}).get(key))
                                        for key, label in COMPARED.items()}})
    return rows


SERIES_CHECKS = {"out_of_fold": "Held-out pseudo-series, out of fold",
                 "foreign": "Series of a finding the model was not trained for"}


def series_checks(card: Mapping) -> list[tuple[str, str, list[dict]]]:
    """(title, statement, series by true class and verdict) of each check of the
    series verdict on the card (``python -m training.series_check``)."""
    section = card.get("series_validation") or {}
    names = dict(zip(card.get("classes", []), card.get("display_names", [])))
    checks = []
    for part, title in SERIES_CHECKS.items():
        figures = section.get(part)
        if isinstance(figures, Mapping):
            rows = [{"Series of": names.get(truth, truth), "Finding reported": counts.get("finding", 0),
                     "No finding class reached": counts.get("no finding", 0), "No result": counts.get("no result", 0)}
                    for truth, counts in (figures.get("counts") or {}).items()]
            checks.append((title, f"{figures.get('statement', '')} Pseudo-series: {figures.get('pseudo_series', '')}",
                           rows))
    return checks


def side_by_side(cards: Mapping[str, Mapping], section: str) -> list[dict]:
    """One section of several cards (an ensemble's members') as rows {Field, one column per card}."""
    fields = list(dict.fromkeys(k for card in cards.values() for k in (card.get(section) or {})))
    return [{"Field": field.replace("_", " "),
             **{name: fmt((card.get(section) or {}).get(field)) for name, card in cards.items()}}
            for field in fields]


def class_balance_rows(audit: Mapping) -> list[dict]:
    """Images per split and class, as found and as kept by the audit policy."""
    names = dict(zip(audit.get("classes", []), audit.get("display_names", [])))
    found, kept = audit.get("class_balance") or {}, audit.get("class_balance_kept") or {}
    rows = []
    for split, counts in found.items():
        for key, n in counts.items():
            rows.append({"Split": split, "Class": names.get(key, key), "Images found": n,
                         "Images used": (kept.get(split) or {}).get(key)})
    return rows


def audit_summary(audit: Mapping) -> list[dict]:
    fields = [("images", "Files found"), ("readable", "Readable"), ("unique_images", "Unique images"),
              ("duplicate_groups", "Groups of exact duplicates"), ("redundant_copies", "Redundant copies"),
              ("cross_split_copies", "Evaluation images also in training"), ("label_conflicts", "Label conflicts"),
              ("dropped", "Dropped by the audit policy"), ("kept", "Kept")]
    rows = []
    for key, label in fields:
        if key in audit:
            value = audit[key]
            rows.append({"Check": label, "Result": len(value) if isinstance(value, (list, dict)) else value})
    return rows


def shortcut_text(probe: Mapping | None) -> str | None:
    if not probe or probe.get("accuracy") is None:
        return None
    return (f"A {probe.get('classifier', 'classifier')} that sees only {', '.join(probe.get('features', []))} "
            f"reaches {probe['accuracy']:.0%} accuracy (chance: {probe.get('chance', 0):.0%}). The closer this is to "
            f"the model's own accuracy, the more the model may be reading where an image came from rather than "
            f"what it shows.")


# --------------------------------------------------------------------------- UI


def kv_table(rows: list[dict]) -> None:
    """A static two-column table that wraps long values (hashes, methods, paths)."""
    if rows:
        st.table(rows, hide_index=True, hide_header=True, border="horizontal")


def choose_model(by_task: dict[str, list[ModelEntry]]) -> ModelEntry:
    entries = [e for models in by_task.values() for e in models]
    paths = {str(e.path): e for e in entries}
    chosen = st.selectbox("Model", list(paths), key="card_model",
                          format_func=lambda p: f"{paths[p].name} · {paths[p].task}")
    return paths[chosen]


def member_cards(entry: ModelEntry) -> dict[str, Mapping]:
    """The cards of an ensemble's members by folder name; empty for a single network."""
    return {folder.name: ui_cache.read_json(folder / "model_card.json") or {}
            for folder in ensemble_members(entry) or []}


def card_section(card: Mapping, section: str, members: Mapping[str, Mapping]) -> None:
    """A section of the card; an ensemble, which has none of its own, shows its members' side by side."""
    if card.get(section) or not members:
        kv_table(key_values(card.get(section)))
        return
    rows = side_by_side(members, section)
    if rows:
        st.caption("The ensemble's members', each applied to its own input:")
        st.table(rows, hide_index=True, border="horizontal")
    else:
        st.caption("Not recorded on the members' cards.")


def show_overview(entry: ModelEntry, card: Mapping) -> None:
    st.markdown(f"**Intended use.** {card.get('intended_use') or 'not stated'}")
    limitations = card.get("limitations") or []
    if limitations:
        st.markdown("**Limitations**\n" + "".join(f"\n- {item}" for item in limitations))
    members = member_cards(entry)
    # Per class and per source at full width: in a half-width column the class names and the
    # per-source figures were cut off.
    cross_validated = bool((card.get("validation") or {}).get("fold_spread"))
    rows = per_class_rows(card)
    if rows:
        st.markdown("**Out-of-fold, per class**" if cross_validated else "**Validation, per class**")
        st.dataframe(rows, hide_index=True, key="card_per_class", column_config={
            "Class": st.column_config.TextColumn("Class", width="medium"),
            **{k: st.column_config.NumberColumn(k, format="%.3f") for k in ("Precision", "Recall", "F1", "AUC")}})
    sources = per_source_rows(card)
    if sources:
        st.markdown("**Out-of-fold, per source**")
        st.dataframe(sources, hide_index=True, key="card_per_source", column_config={
            "Source": st.column_config.TextColumn("Source", width="medium"),
            **{k: st.column_config.NumberColumn(k, format="%.3f")
               for k in ("Accuracy", "Macro-F1", "AUC", "Answered", "Right when answering")}})
    comparison = member_comparison_rows(card)
    if comparison:
        st.markdown("**The ensemble against each member** (out of fold, on the same images)")
        st.table(comparison, hide_index=True, border="horizontal")
    checks = series_checks(card)
    if checks:
        st.markdown("**Series verdicts**")
        for title, statement, rows in checks:
            st.markdown(f"*{title}.* {statement}")
            st.table(rows, hide_index=True, border="horizontal")
        st.caption(f"The rule: {card['series_validation'].get('rule', 'not recorded')}")
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("**Model**")
        model = {"architecture": card.get("architecture_title") or card.get("architecture"),
                 "members": card.get("members"),
                 "weights_origin": card.get("weights_origin"), "parameters": card.get("parameters"),
                 "weight_storage": card.get("weight_storage"),
                 "size": f"{card['size_bytes'] / 1e6:.1f} MB" if card.get("size_bytes") else None,
                 "weights_sha256": short_hash(card.get("weights_sha256")), "latency": latency_text(card),
                 "gradcam_layer": card.get("gradcam_layer"),
                 "confidence_threshold": card.get("confidence_threshold"), "created": card.get("created"),
                 "code_version": card.get("code_version")}
        kv_table(key_values({k: v for k, v in model.items() if v is not None},
                            {"gradcam_layer": "Grad-CAM layer", "weights_sha256": "weights SHA-256"}))
        st.markdown("**Preprocessing**")
        card_section(card, "preprocessing", members)
    with right:
        selective = card.get("selective_answers") or {}
        if selective.get("statement"):
            st.markdown(f"**Selective answers.** {selective['statement']}")
            report = ui_cache.read_json(entry.report_path) or {}
            if report.get("risk_coverage"):
                st.plotly_chart(figures.risk_coverage_figure({card.get("name", entry.name): report},
                                                             target=selective.get("target_accuracy")),
                                key="card_risk_coverage")
        if card.get("cross_validation"):
            st.markdown("**Cross-validation**")
            kv_table(key_values(card.get("cross_validation")))
        st.markdown("**Calibration**")
        kv_table(key_values(card.get("calibration")))
    st.markdown("**Out-of-distribution check**")
    card_section(card, "out_of_distribution", members)
    show_chest_check(entry)
    show_scope(entry)
    show_int8_agreement(entry)
    check = card.get("weight_storage_check")
    if check:
        st.markdown("**Effect of the stored weight precision** (validation, before calibration)")
        st.dataframe([{"Weights": k, **v} for k, v in check.items()], hide_index=True, key="card_storage_check")
    other = {k: v for k, v in card.items() if k not in SHOWN}
    if other:
        st.markdown("**Other fields**")
        kv_table(key_values(other))


def show_chest_check(entry: ModelEntry) -> None:
    """The chest-CT check that answers before this model, where one lies beside it."""
    sentence, rows = figures.chest_check_summary(
        ui_cache.read_json(entry.path.parent / CHECK_FOLDER / CHECK_CARD_FILE))
    if rows:
        st.markdown("**Chest-CT check** (shared by the models beside it)")
        st.caption(sentence)
        st.dataframe(rows, hide_index=True, key="card_chest_check")


def show_scope(entry: ModelEntry) -> None:
    """What this model withholds because another model sees a finding it was not trained for."""
    sentence, rows = figures.scope_summary(ui_cache.read_json(entry.path / SCOPE_FILE))
    if rows:
        st.markdown("**Scope: another finding**")
        st.caption(sentence)
        st.dataframe(rows, hide_index=True, key="card_scope")


def show_int8_agreement(entry: ModelEntry) -> None:
    """What the folder's calibration file records of the int8 network against fp32."""
    agreement = figures.int8_agreement(ui_cache.read_json(entry.path / CALIBRATION_FILE))
    if agreement:
        st.markdown("**int8 against fp32** (slices of the evaluation report)")
        kv_table([{"Field": field, "Value": value} for field, value in agreement.items()])
        st.caption(figures.INT8_OPT_IN)


def ensemble_members(entry: ModelEntry) -> list[Path] | None:
    """The member folders an ensemble's ``ensemble.json`` names; None for a single network."""
    if not (entry.path / ENSEMBLE_FILE).is_file():
        return None
    try:
        return read_ensemble_spec(entry.path)[1]
    except CheckpointError:
        return []


def training_curves(folder: Path, key: str) -> None:
    history = ui_cache.history(folder)
    if history:
        st.plotly_chart(figures.training_curves(history), key=key)
    else:
        st.info(f"No training history (history.csv) in {folder.name}.")


def show_training(entry: ModelEntry, card: Mapping) -> None:
    members = ensemble_members(entry)
    if members is not None:
        st.info("An ensemble is not trained itself; its members' training runs follow.")
        for i, folder in enumerate(members):
            st.markdown(f"**{folder.name}**")
            training_curves(folder, key=f"training_curves_{i}")
        return
    training_curves(entry.path, key="training_curves")
    training = dict(card.get("training") or {})
    settings = training.pop("settings", None)
    st.markdown("**Run**")
    kv_table(key_values(training))
    if settings:
        st.markdown("**Training settings**")
        kv_table(key_values(settings))


def show_data(entry: ModelEntry, card: Mapping) -> None:
    data = dict(card.get("training_data") or {})
    audit = ui_cache.dataset_audit(entry.path) or data.pop("audit", None) or {}
    data.pop("audit", None)
    splits = data.pop("splits", None)
    st.markdown("**Training data**")
    kv_table(key_values(data))
    if splits:
        st.dataframe([{"Split": s, **counts} for s, counts in splits.items()], hide_index=True, key="card_splits")
    if not audit:
        st.info("No dataset audit was recorded for this model.")
        return
    st.markdown("**Dataset audit**")
    for warning in audit.get("warnings") or []:
        st.warning(warning, icon=":material/warning:")
    left, right = st.columns(2, gap="large")
    left.dataframe(audit_summary(audit), hide_index=True, key="audit_summary")
    balance = class_balance_rows(audit)
    if balance:
        right.dataframe(balance, hide_index=True, key="audit_balance")
    probe = shortcut_text(audit.get("shortcut_probe"))
    if probe:
        st.markdown(f"**Shortcut probe.** {probe}")
    if audit.get("policy"):
        st.caption(f"Audit policy: {audit['policy']}.")
    for note in audit.get("notes") or []:
        st.caption(note)
    conflicts = audit.get("label_conflicts") or []
    if conflicts:
        with st.expander(f"Label conflicts ({len(conflicts)}): the same image under two labels"):
            st.dataframe([{"Files": " | ".join(group)} for group in conflicts], hide_index=True)
    duplicates = audit.get("duplicates") or []
    if duplicates:
        with st.expander(f"Exact duplicates ({len(duplicates)} groups)"):
            st.dataframe([{"Files": " | ".join(group)} for group in duplicates], hide_index=True)
    dropped = audit.get("dropped_paths") or {}
    if dropped:
        with st.expander(f"Images left out of training and validation ({len(dropped)})"):
            st.dataframe([{"File": k, "Why": v} for k, v in dropped.items()], hide_index=True)
    unreadable = audit.get("unreadable_reasons") or {}
    if unreadable:
        with st.expander(f"Unreadable files ({len(unreadable)})"):
            st.dataframe([{"File": k, "Why": v} for k, v in unreadable.items()], hide_index=True)


def main() -> None:
    st.title("Model cards")
    st.warning(DISCLAIMER, icon=":material/warning:")
    by_task = ui_cache.models_by_task()
    if not by_task:
        return
    entry = choose_model(by_task)
    card = entry.card
    if not card:
        st.warning(f"{entry.name} has no readable model card (model_card.json).")
        return
    st.header(card.get("name", entry.name))
    classes = ", ".join(card.get("display_names") or card.get("classes") or [])
    st.caption(f"Task: {card.get('task', entry.task)} · classes: {classes} · folder: {entry.path.name}")
    if card.get("disclaimer"):
        st.caption(f"Model card disclaimer: {card['disclaimer']}")
    # A row that wraps, each figure as wide as it needs: in equal columns the spread ("± 0.7%")
    # was cut off behind an ellipsis once a card had eight figures.
    with st.container(horizontal=True, gap="large"):
        for label, value, help_text in headline_metrics(card):
            st.metric(label, value, help=help_text, width="content")
    overview, training, data, raw = st.tabs(["Overview", "Training", "Training data and audit", "Full card (JSON)"])
    with overview:
        show_overview(entry, card)
    with training:
        show_training(entry, card)
    with data:
        show_data(entry, card)
    with raw:
        st.json(card, expanded=1)


if __name__ == "__main__":
    ui_cache.guard_page()
    main()
