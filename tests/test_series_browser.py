"""The series viewer in a real browser (headless Chromium, as ``test_browser``):
upload a zip of a generated CT series, scroll it with the next button, the
keyboard on the slice slider and a click on the probability profile, switch the
window, and save screenshots of the
reading view to ``test-artifacts/``. Skipped without Chromium."""
# ruff: noqa: F811  (fixtures imported from app_fixtures and test_browser are "redefined" as arguments)
from __future__ import annotations

import numpy as np
from app_fixtures import PATIENT_NAME, TASK, app_env  # noqa: F401
from series_synthetic import dicom_series, grey_volume, shuffled_names, zip_bytes
from test_browser import WAIT_MS, assert_clean, explained_failure, pw, screenshot, select_option, server  # noqa: F401
from test_browser import pytestmark as browser_marks

pytestmark = browser_marks

SLICES = 12


def wait_slice(page, number: int) -> None:
    page.get_by_text(f"Slice {number} of {SLICES}:", exact=False).first.wait_for(timeout=WAIT_MS)
    page.wait_for_timeout(800)  # the figure redraws after the text


def test_scroll_a_series_in_the_viewer(server, pw, tmp_path):
    from test_browser import CHROMIUM_ARGS, chromium_path

    archive = tmp_path / "study.zip"
    grey = grey_volume(SLICES, 128, seed=40, labels=(0, 1, 2))
    archive.write_bytes(zip_bytes(shuffled_names(dicom_series(grey), np.random.default_rng(41), "export/")))
    browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1440, "height": 1600})
    try:
        with explained_failure(page, "viewer"):
            page.goto(server, wait_until="networkidle")
            page.get_by_role("link", name="Series viewer").click()
            page.get_by_role("heading", name="Series viewer").wait_for(timeout=WAIT_MS)
            select_option(page, "Task", TASK)
            page.locator("input[type='file']").first.set_input_files([str(archive)])
            page.get_by_text("How the series verdict is reached", exact=False).wait_for(timeout=WAIT_MS)
            page.locator(".js-plotly-plot").nth(2).wait_for(timeout=WAIT_MS)  # slice, probabilities, profile
            wait_slice(page, 1)
            assert_clean(page)
            assert screenshot(page, "viewer-series.png").stat().st_size > 10_000

            for number in (2, 3, 4):
                page.get_by_role("button", name="Next").click()
                wait_slice(page, number)
            screenshot(page, "viewer-slice-4.png")

            slider = page.get_by_role("slider").first
            slider.focus()
            slider.press("End")
            wait_slice(page, SLICES)
            page.get_by_text("Mediastinum", exact=True).click()
            page.wait_for_timeout(1500)
            screenshot(page, "viewer-last-slice-mediastinum.png")
            slider.focus()
            slider.press("Home")
            wait_slice(page, 1)
            # A click on the 8th point of the first class's curve in the probability profile opens slice 8.
            profile = page.locator(".js-plotly-plot").nth(2)
            profile.locator(".scatterlayer .trace").first.locator("path.point").nth(7).click(force=True)
            wait_slice(page, 8)
            text = page.locator("body").inner_text()
            assert PATIENT_NAME.split("^")[0] not in text and "Hospital of Nowhere" not in text
            assert "All slices" in text
            assert_clean(page)
    finally:
        browser.close()
