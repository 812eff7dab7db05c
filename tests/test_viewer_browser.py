"""The series viewer in headless Chromium at 1500 px wide (issue 24, item 10:
"Prev"/"Next" were cut to "P"/"N" there): both buttons show their whole label,
and the slices answered first are on screen before the series verdict."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import pytest
from app_fixtures import TASK, app_env, png_bytes  # noqa: F401
from test_browser import CHROMIUM_ARGS, WAIT_MS, chromium_path, explained_failure, running_app, select_option

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed "
                                 "(apt-get install chromium): the browser test needs it")]

# Whether any element inside the button is narrower than its content (a label cut off), and the button's
# text as rendered.
CUT_OFF = """button => [[...button.querySelectorAll('*')].some(e => e.scrollWidth > e.clientWidth + 1),
                        button.innerText.trim()]"""


def test_prev_and_next_show_their_labels_at_1500_px(app_env, tmp_path):
    from playwright.sync_api import sync_playwright

    files = []
    for i in range(12):
        path = tmp_path / f"slice{i:02d}.png"
        path.write_bytes(png_bytes(label=i % 2, seed=60 + i))
        files.append(str(path))
    with running_app(app_env.env, tmp_path / "server.log") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        with explained_failure(page, "viewer-1500px"):
            page.goto(url + "/viewer")
            page.get_by_text("Series viewer").first.wait_for(timeout=WAIT_MS)
            select_option(page, "Task", TASK)
            page.locator("[data-testid='stFileUploaderDropzoneInput']").first.set_input_files(files)
            for name in ("Prev", "Next"):
                button = page.get_by_role("button", name=name)  # its name starts with the icon's
                button.wait_for(timeout=WAIT_MS)
                cut_off, label = button.evaluate(CUT_OFF)
                assert label.split()[-1] == name and not cut_off, (name, label)
                assert button.bounding_box()["width"] >= 60  # an icon and a whole word, not "P"
            page.get_by_text("How the series verdict is reached").wait_for(timeout=WAIT_MS)
        browser.close()
