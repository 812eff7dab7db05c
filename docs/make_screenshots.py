"""Regenerate the screenshots of docs/images/ from a running app and real slices.

    .venv/bin/python docs/make_screenshots.py [--data ../shared/data] [--port 8590]

Starts ``streamlit run app.py`` on loopback with the shipped models, drives it in
headless Chromium (Debian's ``/usr/bin/chromium`` under Playwright) and saves:
the Diagnosis page with a real SARS-CoV-2 slice's result and Grad-CAM, the
Series viewer with 16 consecutive real slices as a PNG stack,
and the Model comparison page. Each PNG is 1400 px wide and quantised to 256
colours, so it stays a few hundred kB.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from app_server import chromium, diagnose, select_option, start_replica, stop, wait_healthy  # noqa: E402
from series_synthetic import zip_bytes  # noqa: E402

IMAGES = REPO / "docs" / "images"
WIDTH = 1400
WAIT_MS = 300_000
SHOTS = ("diagnosis", "series-viewer", "model-comparison")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Regenerate docs/images/*.png from the running app.")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the public datasets' folder")
    p.add_argument("--port", type=int, default=8590, help="loopback port for the app while it runs")
    p.add_argument("--out", type=Path, default=IMAGES, help="where the PNGs go")
    p.add_argument("--only", nargs="+", choices=SHOTS, default=list(SHOTS), help="the screenshots to take")
    return p


def save_png(raw: bytes, path: Path, height: int | None = None) -> None:
    """A screenshot cut to ``height``, resized to WIDTH and quantised to 256 colours (no dithering: flat UI
    colours stay flat)."""
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    if height and image.height > height:
        image = image.crop((0, 0, image.width, height))
    if image.width != WIDTH:
        image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {path.stat().st_size / 1024:.0f} kB")


def series_zip(data: Path, folder: Path, slices: int = 16) -> Path:
    """Consecutive SARS-CoV-2 slices (consecutive numbers are usually one patient) as a zip of PNGs, a stack
    the viewer reads in the order of the names."""
    source = data / "sarscov2-ctscan" / "COVID"
    path = folder / "series.zip"
    path.write_bytes(zip_bytes({f"slice-{k:02d}.png": (source / f"Covid ({k}).png").read_bytes()
                                for k in range(1, slices + 1)}))
    return path


def wait_quiet(page, ms: int = 3000) -> None:
    """Until Streamlit has stopped running the script, then a moment for the plots to draw."""
    page.locator("[data-testid='stStatusWidget']").wait_for(state="hidden", timeout=WAIT_MS)
    page.wait_for_timeout(ms)


def main(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        process, url = start_replica({"CTAPP_AUDIT_LOG": str(folder / "audit.sqlite")}, folder / "server.log",
                                     port=args.port)
        try:
            wait_healthy(url, process)
            with chromium() as browser:
                page = browser.new_context(viewport={"width": WIDTH, "height": 1500}).new_page()
                page.set_default_timeout(WAIT_MS)

                if "diagnosis" in args.only:
                    page.goto(url, wait_until="networkidle")
                    diagnose(page, args.data / "sarscov2-ctscan" / "COVID" / "Covid (10).png", "COVID-19 vs non-COVID",
                             WAIT_MS)
                    wait_quiet(page)
                    save_png(page.screenshot(), args.out / "diagnosis.png", height=1000)
                if "series-viewer" in args.only:
                    page.goto(url + "/viewer", wait_until="networkidle")
                    page.get_by_role("heading", name="Series viewer").wait_for()
                    select_option(page, "Task", "COVID-19 vs non-COVID")
                    page.locator("input[type='file']").first.set_input_files([str(series_zip(args.data, folder))])
                    page.get_by_text("All slices", exact=True).wait_for(timeout=WAIT_MS)
                    wait_quiet(page, 5000)
                    page.set_viewport_size({"width": WIDTH, "height": 2000})  # the verdict and the slice on screen
                    wait_quiet(page, 3000)
                    save_png(page.screenshot(), args.out / "series-viewer.png")
                    page.set_viewport_size({"width": WIDTH, "height": 1500})
                if "model-comparison" in args.only:
                    page.goto(url + "/compare", wait_until="networkidle")
                    page.get_by_role("heading", name="Model comparison").wait_for()
                    select_option(page, "Task", "COVID-19 vs non-COVID")
                    page.get_by_role("tab", name="ROC curves").click()
                    wait_quiet(page, 4000)
                    save_png(page.screenshot(), args.out / "model-comparison.png", height=1150)
        finally:
            stop(process)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
