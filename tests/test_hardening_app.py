"""Issue 11 through the app itself (Streamlit AppTest): hostile file names are
shown as text and neutralised in the CSV, PostScript never reaches
Ghostscript, uploads are limited in number, the HTML report is built only when
its button is pressed, one folder evaluation runs at a time, and the caches of
analyses are bounded."""
# ruff: noqa: F811  (pytest fixtures imported from other test modules are "redefined" as arguments)
from __future__ import annotations

import csv
import io

import pytest
from app_fixtures import APP, TASK, app_env, app_settings, png_bytes  # noqa: F401
from bad_inputs import eps_bytes
from markdown_it import MarkdownIt
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest
from test_hardening_inputs import fake_ghostscript  # noqa: F401

from ctapp import ui_cache
from ctapp.report import WORD_JOINER
from pages.diagnosis import MAX_FILES

TIMEOUT = 120
HOSTILE = ["[Session expired - sign in again](https://evil.example)", "![x](https://evil.example/a.png)", "=2+5"]
MARKDOWN_ELEMENTS = ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success")


def run(at: AppTest) -> AppTest:
    at = at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def diagnosis_page() -> AppTest:
    at = run(AppTest.from_file(str(APP), default_timeout=TIMEOUT))
    if at.selectbox(key="task").value != TASK:
        at = run(at.selectbox(key="task").set_value(TASK))
    return at


def markdown_of(at: AppTest) -> list[str]:
    """The Markdown source of every element Streamlit renders as Markdown (image captions included)."""
    sources = [str(e.value) for kind in MARKDOWN_ELEMENTS for e in getattr(at, kind)]
    return sources + [caption for image in at.image for caption in image.captions]


def rendered(markdown: str) -> tuple[set[str], str]:
    """(token types, plain text as read: without markdown_text's invisible word joiners) of
    ``markdown`` as GitHub-flavoured Markdown with bare-URL links."""
    tokens, todo = [], MarkdownIt("gfm-like").parse(markdown)
    while todo:
        token = todo.pop(0)
        tokens.append(token)
        todo[:0] = token.children or []
    text = "".join(t.content for t in tokens if t.type in ("text", "code_inline"))
    return {t.type for t in tokens}, text.replace(WORD_JOINER, "")


@pytest.fixture
def downloads(monkeypatch) -> dict[str, list]:
    """What the page hands to download buttons: 'static' data and 'deferred' callables."""
    seen: dict[str, list] = {"static": [], "deferred": []}
    add, add_deferred = MediaFileManager.add, MediaFileManager.add_deferred

    def record_add(self, data, mimetype, *args, **kwargs):
        seen["static"].append((mimetype, data))
        return add(self, data, mimetype, *args, **kwargs)

    def record_deferred(self, data_callable, *args, **kwargs):
        seen["deferred"].append(data_callable)
        return add_deferred(self, data_callable, *args, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", record_add)
    monkeypatch.setattr(MediaFileManager, "add_deferred", record_deferred)
    return seen


def test_hostile_file_names_are_shown_as_text_and_neutralised_in_the_csv(app_settings, downloads):
    at = diagnosis_page()
    files = [(name, png_bytes(seed=20 + i), "image/png") for i, name in enumerate(HOSTILE)]
    files.append(("[Open me](https://evil.example/x).png", b"not an image, a note", "text/plain"))
    at = run(at.file_uploader(key="uploads").set_value(files))

    for source in markdown_of(at):
        kinds, _ = rendered(source)
        assert not kinds & {"link_open", "image", "html_inline", "html_block"}, source
    texts = [rendered(source)[1] for source in markdown_of(at)]
    assert any(t.startswith("[Open me](https://evil.example/x).png could not be read") for t in texts)
    assert rendered(at.subheader[-1].value)[1] == HOSTILE[0]  # the detail heading, as written
    results = next(frame.value for frame in at.dataframe if "File" in frame.value.columns)
    assert list(results["File"]) == [name for name, _, _ in files]
    assert at.selectbox(key="detail_slice").options == HOSTILE

    table = [data for mimetype, data in downloads["static"] if mimetype == "text/csv"][-1]
    table = table.decode() if isinstance(table, bytes) else table
    cells = [row["File"] for row in csv.DictReader(io.StringIO(table))]
    assert cells == [HOSTILE[0], HOSTILE[1], "'=2+5", files[3][0]]


def test_postscript_upload_never_reaches_ghostscript(app_settings, fake_ghostscript):
    at = diagnosis_page()
    at = run(at.file_uploader(key="uploads").set_value([("scan.png", eps_bytes(), "image/png")]))
    assert any("EPS files are not accepted" in rendered(e.value)[1] for e in at.error)
    assert not fake_ghostscript.exists()


def test_uploads_beyond_the_limit_are_not_analysed(app_settings):
    at = diagnosis_page()
    data = png_bytes(seed=3)
    files = [(f"s{i}.png", data, "image/png") for i in range(MAX_FILES + 2)]
    at = run(at.file_uploader(key="uploads").set_value(files))
    assert any(f"{MAX_FILES + 2} files were uploaded" in w.value and f"at most {MAX_FILES}" in w.value
               for w in at.warning)
    results = next(frame.value for frame in at.dataframe if "File" in frame.value.columns)
    assert list(results["File"]) == [f"s{i}.png" for i in range(MAX_FILES)]


def test_html_report_is_built_only_when_its_button_is_pressed(app_settings, downloads, monkeypatch):
    import ctapp.report

    built = []
    real = ctapp.report.slice_report
    monkeypatch.setattr(ctapp.report, "slice_report", lambda **kw: built.append(kw) or real(**kw))
    at = diagnosis_page()
    name = "<b>scan</b>.png"
    at = run(at.file_uploader(key="uploads").set_value([(name, png_bytes(seed=4), "image/png")]))
    run(at.sidebar.slider(key="opacity").set_value(0.7))
    assert at.download_button(key="report_html").label == "Download report (HTML)"
    assert built == [] and downloads["deferred"], "the report was built without a click"

    page = downloads["deferred"][-1]()  # what Streamlit runs when the button is pressed
    assert len(built) == 1
    assert "&lt;b&gt;scan&lt;/b&gt;.png" in page and "<b>scan</b>" not in page


def test_a_second_folder_evaluation_waits_for_the_first(app_settings):
    at = run(AppTest.from_file(str(APP), default_timeout=TIMEOUT))
    at = run(at.switch_page("pages/compare.py"))
    if at.selectbox(key="compare_task").value != TASK:
        at = run(at.selectbox(key="compare_task").set_value(TASK))
    at.text_input(key="eval_folder").input(str(app_settings.data))
    before = set(app_settings.reports.glob("*.json")) if app_settings.reports.exists() else set()
    with ui_cache.evaluation_slot() as held:  # another session's evaluation is running
        assert held
        at = run(at.form_submit_button[0].click())
    assert any("Another folder evaluation is running" in w.value for w in at.warning)
    after = set(app_settings.reports.glob("*.json")) if app_settings.reports.exists() else set()
    assert after == before


def test_cached_analyses_are_bounded(app_settings, monkeypatch):
    """The analysis cache (slices and maps) keeps at most MAX_ANALYSES entries and
    expires; every cache of images or reports declares both bounds."""
    import ctapp.inference

    computed = []
    real = ctapp.inference.LoadedModel.analyse
    monkeypatch.setattr(ctapp.inference.LoadedModel, "analyse",
                        lambda self, *a, **kw: computed.append(1) or real(self, *a, **kw))
    ui_cache._analyse.clear()
    images = [png_bytes(seed=100 + i) for i in range(ui_cache.MAX_ANALYSES + 1)]
    for i, data in enumerate(images):
        ui_cache.analyse(app_settings.model_a, f"sha{i}", data)
    assert len(computed) == len(images)
    ui_cache.analyse(app_settings.model_a, f"sha{len(images) - 1}", images[-1])  # the newest: cached
    assert len(computed) == len(images)
    ui_cache.analyse(app_settings.model_a, "sha0", images[0])  # the oldest: evicted, computed again
    assert len(computed) == len(images) + 1
    for cached in (ui_cache._analyse, ui_cache._predict, ui_cache._read_json, ui_cache._predictions,
                   ui_cache._history):
        assert cached._info.max_entries and cached._info.ttl, cached
