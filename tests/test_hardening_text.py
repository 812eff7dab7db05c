"""Issue 11, untrusted text is text: file names and text from files render as
themselves in the app's Markdown, as escaped text in the HTML report, and as
text (never a formula) in every CSV the app writes."""
from __future__ import annotations

import csv
import html
import io
import re

import numpy as np
import pytest
from linkify_it import LinkifyIt
from markdown_it import MarkdownIt

from ctapp.evaluation import read_predictions, write_report
from ctapp.inference import Prediction
from ctapp.report import WORD_JOINER, ModelResult, from_spreadsheet_cell, markdown_text, slice_report, spreadsheet_cell

BARE_URL_NAMES = ["see https://evil.example/login now.png", "www.evil.example.png",
                  "HTTP://evil.com/x.png www.evil.com.png", "Scan from http://evil.com (copy).dcm",
                  "wwww.evil.com/https://x.png"]
HOSTILE_NAMES = [
    "[Session expired - sign in again](https://evil.example)",
    "![x](https://evil.example/a.png)",
    "=2+5",
    *BARE_URL_NAMES,
    "<img src=x onerror=alert(1)>.png",
    "# Heading.png",
    "1. listed.png",
    "**bold** _it_ ~~gone~~ `code`.png",
    ":red[alarm] :material/warning: $x^2$.png",
    "a\\](https://evil.example).png",
]
FORMULAS = ["=2+5", "+SUM(A1)", "-1+1", "@cmd", "\t=1", "\r=1", "'=already quoted"]


# Streamlit's renderer (remark-gfm, mdast-util-gfm-autolink-literal; the pattern is in its
# StreamlitMarkdown bundle) links bare URLs in the text *after* escapes are resolved.
GFM_BARE_LINK = re.compile(r"(https?://|www(?=\.))([-.\w]+)([^ \t\r\n]*)", re.IGNORECASE)


def parse(markdown: str) -> list:
    """Every token (inline ones included) of GitHub-flavoured Markdown with bare-URL links."""
    tokens, todo = [], MarkdownIt("gfm-like").parse(markdown)
    while todo:
        token = todo.pop(0)
        tokens.append(token)
        todo[:0] = token.children or []
    return tokens


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_markdown_text_renders_as_itself(name):
    for markdown in (markdown_text(name), f"**{markdown_text(name)}** could not be read: {markdown_text(name)}"):
        tokens = parse(markdown)
        assert not [t.type for t in tokens if t.type in ("link_open", "image", "html_inline", "html_block",
                                                         "heading_open", "ordered_list_open", "code_inline")]
        text = "".join(t.content for t in tokens if t.type == "text")
        assert " ".join(name.split()) in text.replace(WORD_JOINER, "")
        # No bare link left in the text a GFM renderer links after escapes: neither by the
        # independent linkifier (URLs with a scheme) nor by GFM's own extended-autolink rule.
        assert not LinkifyIt(options={"fuzzy_link": False}).test(text)
        assert not GFM_BARE_LINK.search(text)
    # Streamlit's own syntax (:color[...], :material/icon:, $LaTeX$) is escaped too.
    assert not re.search(r"(?<!\\)[:$\[]", markdown_text(name))


def test_the_hostile_url_names_would_be_links_without_markdown_text():
    """The checks above can fail: as plain text, every one of these names holds a link."""
    for name in BARE_URL_NAMES:
        assert GFM_BARE_LINK.search(name)
        assert any(t.type == "link_open" for t in parse(name)) or "www.evil.example" in name  # .example: no TLD


def test_markdown_text_is_one_line_without_control_characters():
    assert markdown_text("a\nb\r\n# c\u202egnp.exe\x00") == r"a b \# cgnp\.exe"


@pytest.mark.parametrize("value", FORMULAS)
def test_spreadsheet_cells_are_text_and_round_trip(value):
    cell = spreadsheet_cell(value)
    assert cell.startswith("'") and cell[1:] == value
    assert from_spreadsheet_cell(cell) == value


def test_plain_values_are_left_alone():
    for value in ("slice.png", "Adenocarcinoma", "", 0.5, -0.25, None, 3):
        assert spreadsheet_cell(value) == value


def test_evaluation_report_csv_neutralises_and_reads_back(tmp_path):
    rows = [{"path": name, "true": "alpha", "pred": "beta", "confidence": 0.75, "ood_score": -1.5}
            for name in [*FORMULAS, "valid/alpha/ok.png"]]
    csv_path = write_report({"accuracy": 1.0}, rows, tmp_path / "report.json")
    with open(csv_path, newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert all(row["path"].startswith("'") for row in written[:-1])
    assert written[-1]["path"] == "valid/alpha/ok.png"
    assert written[0]["ood_score"] == "-1.5"  # numbers stay numbers
    assert [row["path"] for row in read_predictions(tmp_path / "report.json")] == [r["path"] for r in rows]


def test_html_report_escapes_file_names_and_notes():
    prediction = Prediction("alpha", "Alpha", {"alpha": 0.9, "beta": 0.1}, 0.9, False, False, None)
    name = '<img src=x onerror="alert(1)">[link](https://evil.example).png'
    note = "the file is a PNG although its name ends in .<script>alert(2)</script>"
    page = slice_report(image=np.zeros((16, 16), np.float32),
                        results=[ModelResult("tiny</h2><script>", "v1", prediction)], filename=name, notes=[note])
    assert "<img src=x" not in page and "<script>" not in page
    assert html.escape(name) in page and html.escape(note) in page


def test_results_table_csv_neutralises_file_names():
    from pages.diagnosis import table_csv

    rows = [{"File": name, "Result": "Alpha", "Confidence": 0.9, "Flags": ""} for name in ("=2+5", "ok.png")]
    written = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert [row["File"] for row in written] == ["'=2+5", "ok.png"]
