"""A one-page, self-contained HTML report of one slice: the image and its
Grad-CAM overlay embedded as PNG, the prediction and calibrated probabilities
of one or more models, the model names and versions, the date and the
research-use disclaimer.

Only what the app computed goes in: never a DICOM header field, so no patient
name, ID, birth date or study identifier can reach the report.

File names and any text read from a file are untrusted: the report
HTML-escapes every value, and the helpers at the end keep the same text inert
in the app's Markdown (:func:`markdown_text`) and in every CSV it writes
(:func:`spreadsheet_cell`).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from .inference import LOW_CONFIDENCE, NOT_CHEST_CT, OTHER_FINDING, UNLIKE_TRAINING, Prediction

DISCLAIMER = ("Research use only. Not a medical device: not for diagnosis or treatment decisions. "
              "Results must be reviewed by a qualified clinician.")
NOT_VALID = "NOT A VALID RESULT"


@dataclass
class ModelResult:
    """One model's reading of the slice, as the report shows it."""

    model_name: str
    model_version: str
    prediction: Prediction
    display_names: dict[str, str] = field(default_factory=dict)  # class key -> readable name
    overlay: np.ndarray | None = None  # RGB uint8 Grad-CAM overlay
    cam_method: str = "Grad-CAM"
    cam_class: str = ""  # readable name of the explained class


def safe_stem(text: str, limit: int = 60) -> str:
    """``text`` reduced to a safe file-name part (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit] or "slice"


def png_data_uri(image: np.ndarray) -> str:
    """A grey (H, W) or RGB (H, W, 3) array (uint8, or float in [0, 1]) as a PNG data URI."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def verdict(prediction: Prediction, display_label: str | None = None) -> str:
    """The result in plain words: the class, or which of the uncertain states
    it is in. Each state has its own words; none reads like a result."""
    label = display_label or prediction.display_label
    if prediction.state == NOT_CHEST_CT:
        return "Not a chest CT slice: no result."
    if prediction.state == UNLIKE_TRAINING:
        return (f"Unlike the training images: no reliable result (it leans {label}, {prediction.confidence:.0%}, "
                "for reference only).")
    if prediction.state == OTHER_FINDING:
        return "Another finding: not what this model was trained for, no result."
    if prediction.uncertain or prediction.state == LOW_CONFIDENCE:
        return f"Uncertain: no confident answer (most likely {label}, {prediction.confidence:.0%})."
    return f"{label} ({prediction.confidence:.0%} calibrated probability)"


def result_cell(prediction: Prediction, display_label: str | None = None) -> str:
    """The result in a table cell: the class, or the uncertain state with the
    class it leans to (such a row shows no confidence: it is no result)."""
    label = display_label or prediction.display_label
    if prediction.state == NOT_CHEST_CT:
        return "Not a chest CT (no result)"
    if prediction.state == UNLIKE_TRAINING:
        return f"Unlike the training images (leans {label})"
    if prediction.state == OTHER_FINDING:
        return "Another finding (no result)"
    return f"Uncertain (leans {label})" if prediction.uncertain else label


_STYLE = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#1b2631;max-width:1000px;margin:24px auto;
padding:0 16px;line-height:1.4}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:18px 0 6px}
.meta{color:#5d6d7e;font-size:13px} .disclaimer{border:1px solid #e0b252;background:#fff7e0;padding:8px 12px;
border-radius:6px;font-size:13px;margin:12px 0}
.images{display:flex;gap:16px;flex-wrap:wrap} figure{margin:0;flex:1;min-width:260px}
figure img{width:100%;max-width:460px;image-rendering:auto;border:1px solid #d5dbdf;border-radius:4px;background:#000}
figcaption{font-size:13px;color:#5d6d7e}
.verdict{font-size:18px;font-weight:600;padding:8px 12px;border-radius:6px;background:#e8f1f5}
.verdict.flagged{background:#fdecea} .stamp{display:inline-block;border:2px solid #b03a2e;color:#b03a2e;
font-weight:700;letter-spacing:1px;padding:2px 8px;border-radius:4px;margin:6px 0}
.bar.muted{background:#b3bcc4}
table{border-collapse:collapse;font-size:14px;margin:6px 0} td,th{padding:3px 10px;border-bottom:1px solid #e5e9ec;
text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#1f6f8b;border-radius:2px;vertical-align:middle}
ul{margin:4px 0 4px 18px;padding:0} @media print{.disclaimer{break-inside:avoid}}
"""


def slice_report(*, image: np.ndarray, results: list[ModelResult], filename: str = "", sha256: str = "",
                 notes: list[str] | None = None, created: datetime | None = None) -> str:
    """The report as one HTML string (no external resources)."""
    e = html.escape
    created = created or datetime.now(timezone.utc)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>CT slice report{(' - ' + e(filename)) if filename else ''}</title><style>{_STYLE}</style></head><body>",
        "<h1>CT slice classification report</h1>",
        f"<div class='meta'>Created {e(created.strftime('%Y-%m-%d %H:%M UTC'))}"
        + (f" &middot; file {e(filename)}" if filename else "")
        + (f" &middot; SHA-256 <code>{e(sha256[:16])}&hellip;</code>" if sha256 else "") + "</div>",
        f"<div class='disclaimer'><strong>{e(DISCLAIMER)}</strong></div>",
        "<div class='images'>",
        f"<figure><img alt='CT slice' src='{png_data_uri(image)}'><figcaption>Slice as shown</figcaption></figure>",
    ]
    for r in results:
        if r.overlay is not None:
            what = f"{r.cam_method} for {r.cam_class}" if r.cam_class else r.cam_method
            parts.append(f"<figure><img alt='{e(what)} overlay' src='{png_data_uri(r.overlay)}'>"
                         f"<figcaption>{e(r.model_name)}: {e(what)} (warm colours: regions that weighed most)"
                         f"</figcaption></figure>")
    parts.append("</div>")
    for r in results:
        p = r.prediction
        names = r.display_names or {p.label: p.display_label}
        flagged = p.uncertain or p.out_of_distribution
        parts += [
            f"<h2>{e(r.model_name)} <span class='meta'>version {e(r.model_version or 'unknown')}</span></h2>",
            f"<div class='verdict{' flagged' if flagged else ''}'>{e(verdict(p, names.get(p.label)))}</div>",
        ]
        if flagged:
            parts.append(f"<div class='stamp'>{NOT_VALID}</div>")
        if p.reasons:
            parts.append("<ul>" + "".join(f"<li>{e(reason)}</li>" for reason in p.reasons) + "</ul>")
        parts.append("<table><tr><th>Class</th><th>Calibrated probability</th><th></th></tr>")
        for key, value in p.probabilities.items():
            parts.append(f"<tr><td>{e(names.get(key, key))}</td><td class='num'>{value:.1%}</td>"
                         f"<td><span class='bar{' muted' if flagged else ''}' "
                         f"style='width:{max(1, round(value * 200))}px'></span></td></tr>")
        parts.append("</table>")
    if notes:
        parts.append("<h2>How the image was read</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append(f"<p class='meta'>Generated by the CT slice classifier app. {e(DISCLAIMER)}</p></body></html>")
    return "\n".join(parts)


@dataclass
class KeySlice:
    """A slice shown in the series report: its number (1 = most superior), the
    slice as shown, its Grad-CAM overlay and its prediction."""

    number: int
    image: np.ndarray
    overlay: np.ndarray | None
    prediction: Prediction


def series_report(*, series_id: str, description: str, summary, key_slices: list[KeySlice], model_name: str,
                  model_version: str, display_names: dict[str, str], notes: list[str] | None = None,
                  created: datetime | None = None) -> str:
    """The report of one series (``summary``: a :class:`ctapp.series.SeriesSummary`)
    as one HTML string: the verdict and its rule, per-class slice counts, the
    key slices with their overlays, the model and version, the disclaimer.
    The series is named by its opaque id; no header value goes in."""
    e = html.escape
    created = created or datetime.now(timezone.utc)
    flagged = not summary.has_result
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>CT series report - {e(series_id)}</title><style>{_STYLE}</style></head><body>",
        "<h1>CT series classification report</h1>",
        f"<div class='meta'>Created {e(created.strftime('%Y-%m-%d %H:%M UTC'))} &middot; series {e(series_id)} "
        f"&middot; {e(description)}</div>",
        f"<div class='disclaimer'><strong>{e(DISCLAIMER)}</strong></div>",
        f"<h2>{e(model_name)} <span class='meta'>version {e(model_version or 'unknown')}</span></h2>",
        f"<div class='verdict{' flagged' if flagged else ''}'>{e(summary.verdict)}</div>",
    ]
    if flagged:
        parts.append(f"<div class='stamp'>{NOT_VALID}</div>")
    parts.append(f"<p class='meta'><strong>Rule.</strong> {e(summary.rule)}</p>")
    parts.append("<table><tr><th>Class</th><th>Slices answered confidently</th></tr>")
    for key, count in summary.confident_counts.items():
        parts.append(f"<tr><td>{e(display_names.get(key, key))}</td><td class='num'>{count}</td></tr>")
    parts.append(f"<tr><td>Uncertain (no result)</td><td class='num'>{summary.uncertain}</td></tr>")
    parts.append(f"<tr><td><strong>All slices</strong></td><td class='num'>{summary.slices}</td></tr></table>")
    if key_slices:
        parts.append("<h2>Key slices</h2><div class='images'>")
        for k in key_slices:
            p = k.prediction
            shown = k.overlay if k.overlay is not None else k.image
            what = " with Grad-CAM (warm colours weighed most)" if k.overlay is not None else ""
            parts.append(f"<figure><img alt='slice {k.number}' src='{png_data_uri(shown)}'><figcaption>Slice "
                         f"{k.number}{what}: {e(verdict(p, display_names.get(p.label)))}</figcaption></figure>")
        parts.append("</div>")
    if notes:
        parts.append("<h2>How the series was read</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append(f"<p class='meta'>Generated by the CT slice classifier app. {e(DISCLAIMER)}</p></body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- untrusted text elsewhere

SPREADSHEET_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
WORD_JOINER = "\u2060"  # invisible, and no line break where it stands
# What GitHub-flavoured Markdown links without any syntax (its "extended autolinks"): Streamlit's
# renderer finds them in the text after backslash escapes are resolved, so escaping cannot stop it.
BARE_LINK_START = re.compile(r"https?(?=://)|www(?=\.)", re.IGNORECASE)


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown: one line, control characters dropped, every
    ASCII punctuation character backslash-escaped, so that a file name renders
    as itself and never as a link, image, heading, emoji, icon or formula; an
    invisible word joiner after a bare ``http``/``https``/``www`` keeps a URL in
    the text from becoming a link."""
    flat = " ".join(str(text).split())
    visible = "".join(ch for ch in flat if unicodedata.category(ch) not in ("Cc", "Cf"))
    unlinked = BARE_LINK_START.sub(lambda m: m.group(0) + WORD_JOINER, visible)
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", unlinked)


def spreadsheet_cell(value):
    """A CSV value that spreadsheets show as text: a string starting with a
    formula trigger (=, +, -, @, tab, CR) gets a leading single quote, and so
    does one that starts with a quote already, so :func:`from_spreadsheet_cell`
    gives every value back exactly. Numbers stay numbers."""
    if isinstance(value, str) and value.startswith((*SPREADSHEET_TRIGGERS, "'")):
        return "'" + value
    return value


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV, the header from the first row's keys; a cell a spreadsheet
    would run as a formula is written as text (:func:`spreadsheet_cell`)."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: spreadsheet_cell(value) for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def from_spreadsheet_cell(value: str) -> str:
    """The value :func:`spreadsheet_cell` was given."""
    return value[1:] if value.startswith("'") else value
