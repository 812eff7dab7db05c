"""Seconds from a single-slice upload to its result in a real browser, warm.

Starts ``streamlit run app.py`` on loopback the way the tests do
(``tests/app_server.py``: its own audit log and reports folder in a temporary
folder), opens the diagnosis page in headless Chromium with the page's default
model (or ``--model``), uploads one slice to warm the model up, then times
``--uploads`` more: new slices, and the first timed one once more (the same
file again). Each upload replaces the one before in the same tab, as a user
goes on to the next slice (``--fresh-session``: the page is reloaded first, a
new session whose browser side loads the page's scripts again), and is timed
from setting the file on the uploader to

* the finding: the predicted class, an uncertain state or "not a chest CT";
* the overlay: the Grad-CAM image loaded (or the note that a slice which is
  not a chest CT gets no map).

Prints each upload, the median and maximum of each, the model and precision
in use, the CPU count and the load average (before and after). Slices come
from ../shared/data (the lung task's validation slices, or the SARS-CoV-2
set), or are generated CT phantoms without it.

    .venv/bin/python benchmarks/upload_latency.py --uploads 6
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app_server import CHROMIUM_ARGS, chromium_path, result_shown, select_option, start_replica, stop, \
    wait_healthy  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
LUNG_SLICES, COVID_SLICES = DATA / "chest-ct-scan-images" / "Data" / "valid", DATA / "sarscov2-ctscan"
HEADING = "CT slice diagnosis"
READY_WORDS = "Upload one or more chest CT slices"  # the page's last element while nothing is uploaded
OVERLAY_CAPTION = "Grad-CAM for"
NO_MAP = "no Grad-CAM map"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=6, help="timed uploads after the warm-up (2-50): all but "
                        "the last are new slices, the last repeats the first (default 6)")
    parser.add_argument("--model", help="model folder name as the sidebar lists it (default: the page's default)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the app server (default 1, "
                        "as the tests start it; plain 'streamlit run app.py' runs torch on one thread per core)")
    parser.add_argument("--fresh-session", action="store_true", help="reload the page before each upload "
                        "(default: remove the earlier upload in the same tab)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one upload may take (default 120)")
    return parser


def slice_files(count: int, task: str, folder: Path) -> tuple[list[Path], str]:
    """``count`` distinct slices of the model's task: real ones spread over a
    dataset, else phantoms written to ``folder``."""
    source = LUNG_SLICES if "lung" in task.lower() else COVID_SLICES
    files = sorted(source.rglob("*.png")) if source.is_dir() else []
    if len(files) >= count:
        return files[:: len(files) // count][:count], f"real slices from {source}"
    from PIL import Image

    from training.foreign import ct_phantom

    paths = []
    for seed in range(count):
        path = folder / f"phantom-{seed}.png"
        Image.fromarray(ct_phantom(512, seed=seed)).save(path)
        paths.append(path)
    return paths, "generated CT phantoms (../shared/data is absent)"


def model_entry(name: str | None):
    """The model the page shows first (its first task's first model), or the one named."""
    from ctapp.model_folders import list_models, model_dirs

    entries = list_models(model_dirs())
    if not entries:
        raise SystemExit("upload_latency: no models found (models/ or CTAPP_MODELS_DIR)")
    if name is None:
        return entries[0]
    for entry in entries:
        if entry.name == name:
            return entry
    raise SystemExit(f"upload_latency: no model named {name!r}; there are {[e.name for e in entries]}")


def open_page(page, url: str, entry, timeout_ms: int) -> None:
    """A fresh session of the diagnosis page with ``entry`` chosen, idle and waiting for an upload."""
    page.goto(url, wait_until="networkidle", timeout=timeout_ms)
    page.get_by_role("heading", name=HEADING).wait_for(timeout=timeout_ms)
    select_option(page, "Task", entry.task)
    select_option(page, "Model", entry.name)
    page.get_by_text(READY_WORDS, exact=False).wait_for(timeout=timeout_ms)


def clear_upload(page, timeout_ms: int) -> None:
    """Remove the earlier upload (the uploader keeps it) and wait until the page asks for a new one."""
    page.locator("[data-testid='stFileChipDeleteBtn'] button").first.click()
    page.get_by_text(READY_WORDS, exact=False).wait_for(timeout=timeout_ms)
    result_shown(page).wait_for(state="detached", timeout=timeout_ms)


# The overlay is loaded: the Grad-CAM image's pixels are in (or the slice is not a chest CT: no map).
OVERLAY_LOADED = """([caption, noMap]) => [...document.querySelectorAll("[data-testid='stImage']")]
    .some(el => el.innerText.includes(caption) && [...el.querySelectorAll("img")]
        .some(img => img.complete && img.naturalWidth > 0)) || document.body.innerText.includes(noMap)"""


def timed_upload(page, path: Path, timeout_ms: int) -> tuple[float, float, str]:
    """Seconds from setting the file to the finding, and to the overlay; the finding's words."""
    start = time.perf_counter()
    page.locator("input[type='file']").first.set_input_files([str(path)])
    finding = result_shown(page)
    finding.wait_for(timeout=timeout_ms)
    to_finding = time.perf_counter() - start
    page.wait_for_function(OVERLAY_LOADED, arg=[OVERLAY_CAPTION, NO_MAP], timeout=timeout_ms)
    to_overlay = time.perf_counter() - start
    return to_finding, to_overlay, finding.inner_text().split("\n")[0][:60]


def describe_precision() -> str:
    """What the server's models answer at: it runs on this machine with this environment."""
    from ctapp.precision import inference_precision

    return inference_precision().describe()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summary_line(label: str, values: list[float]) -> str:
    return f"{label}: median {statistics.median(values):.2f} s, max {max(values):.2f} s"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not 2 <= args.uploads <= 50:
        get_args_parser().error("--uploads must be 2-50")
    if chromium_path() is None:
        print("upload_latency: skipped: Chromium is not installed (apt-get install chromium)")
        return 0
    from playwright.sync_api import sync_playwright

    entry = model_entry(args.model)
    timeout_ms = int(args.timeout * 1000)
    with tempfile.TemporaryDirectory(prefix="ctapp-upload-latency-") as tmp:
        tmp = Path(tmp)
        slices, source = slice_files(args.uploads, entry.task, tmp)  # the warm-up, then uploads - 1 new ones
        plan = [("warm-up", slices[0])] + [("new", s) for s in slices[1:]] + [("same again", slices[1])]
        env = {"CTAPP_AUDIT_LOG": str(tmp / "audit.sqlite"), "CTAPP_REPORTS_DIR": str(tmp / "reports"),
               "CTAPP_DATABASE_URL": "", "OMP_NUM_THREADS": str(args.threads)}
        session = "a fresh session" if args.fresh_session else "the same tab"
        print(f"upload_latency: model {entry.name} ({entry.task}), precision {describe_precision()}, "
              f"server threads {args.threads}, {session} per upload, CPUs {os.cpu_count()} "
              f"(usable {len(os.sched_getaffinity(0))}), load average {load_average()}; {source}", flush=True)
        process, url = start_replica(env, tmp / "server.log", args=["--server.fileWatcherType", "none"])
        rows = []
        try:
            wait_healthy(url, process)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1440, "height": 1200})
                try:
                    for n, (kind, path) in enumerate(plan):
                        if n == 0 or args.fresh_session:
                            open_page(page, url, entry, timeout_ms)
                        else:
                            clear_upload(page, timeout_ms)
                        to_finding, to_overlay, finding = timed_upload(page, path, timeout_ms)
                        print(f"  {kind:<10} {path.name:<22} finding {to_finding:6.2f} s   overlay {to_overlay:6.2f} s"
                              f"   ({finding})", flush=True)
                        rows.append((kind, to_finding, to_overlay))
                finally:
                    browser.close()
        finally:
            stop(process)
    for kind in ("new", "same again"):
        chosen = [r for r in rows if r[0] == kind]
        print(f"{kind} slices, warm: " + summary_line("upload to finding", [r[1] for r in chosen]) + "; "
              + summary_line("to Grad-CAM overlay", [r[2] for r in chosen]))
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
