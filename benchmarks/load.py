"""Load test of the department set-up on loopback: a throw-away PostgreSQL
cluster (Debian's server binaries), ``deploy/run-replicas.sh`` with 2 replicas
behind nginx, and K headless-Chromium users who each, in a loop, open the app,
upload a real CT slice and wait for its result. Halfway through, one replica
is killed (SIGKILL). Prints the diagnoses shown, the audit records stored
during the run (the two must be equal), errors, and p50/p95 upload-to-result,
overall and for the users of each replica.

    .venv/bin/python benchmarks/load.py --users 3 --duration 60

Bounded: K users, the run's duration, loopback addresses only; everything it
starts is stopped at the end. Slices come from ../shared/data/sarscov2-ctscan
(each upload re-encoded with a counter in a PNG text chunk, so every upload is
a new file with the same pixels); without that folder, generated phantoms.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app_server import CHROMIUM_ARGS, chromium_path, department, diagnose_once, result_shown  # noqa: E402
from pg_cluster import PostgresCluster, postgres_missing  # noqa: E402

SLICES = ROOT.parent / "shared" / "data" / "sarscov2-ctscan"


def source_slices(count: int = 16) -> tuple[list, str]:
    """Grey uint8 arrays: real slices when ../shared/data is here, else phantoms."""
    import numpy as np
    from PIL import Image

    files = sorted(SLICES.rglob("*.png")) if SLICES.is_dir() else []
    if files:
        chosen = files[:: max(1, len(files) // count)][:count]
        return [np.asarray(Image.open(f).convert("L")) for f in chosen], f"{len(chosen)} real slices from {SLICES}"
    from training.foreign import ct_phantom

    return [ct_phantom(512, seed=i) for i in range(4)], "generated phantoms (../shared/data is absent)"


def png_upload(pixels, n: int) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("upload", str(n))  # a new file (new SHA-256) with the same pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def user(k: int, browser, url: str, slices: list, folder: Path, deadline: float, log: dict,
               timeout_ms: int) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    page = await context.new_page()
    n = 0
    while time.monotonic() < deadline:
        name = f"u{k}-{n:04d}.png"
        path = folder / name
        path.write_bytes(png_upload(slices[(k * 7 + n) % len(slices)], k * 100_000 + n))
        n += 1
        try:
            await page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
            await page.get_by_role("heading", name="CT slice diagnosis").wait_for(timeout=timeout_ms)
            start = time.monotonic()
            await page.locator("input[type='file']").first.set_input_files([str(path)])
            await page.get_by_role("heading", name=name).wait_for(timeout=timeout_ms)
            await result_shown(page).wait_for(timeout=timeout_ms)
            log["shown"].append({"user": k, "at": time.monotonic(), "seconds": time.monotonic() - start})
        except Exception as exc:  # a killed replica, a timeout: counted, and the user starts again
            log["errors"].append({"user": k, "at": time.monotonic(), "error": type(exc).__name__,
                                  "detail": str(exc).splitlines()[0][:160]})
            if log["screenshots"] and len(log["errors"]) <= 5:
                await page.screenshot(path=str(Path(log["screenshots"]) / f"error-{len(log['errors'])}.png"))
        finally:
            path.unlink(missing_ok=True)
    cookies = {c["name"]: c["value"] for c in await context.cookies()}
    log["routes"][k] = cookies.get("ctapp_route", "")
    await context.close()


async def drive(url: str, users: int, duration: float, kill_after: float | None, victim_pid: int, slices: list,
                folder: Path, timeout_ms: int, screenshots: str | None = None) -> dict:
    from playwright.async_api import async_playwright

    log = {"shown": [], "errors": [], "routes": {}, "killed_at": None, "screenshots": screenshots}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        start = time.monotonic()
        deadline = start + duration

        async def killer() -> None:
            await asyncio.sleep(kill_after)
            os.kill(victim_pid, signal.SIGKILL)
            log["killed_at"] = time.monotonic()

        tasks = [user(k, browser, url, slices, folder, deadline, log, timeout_ms) for k in range(users)]
        try:
            await asyncio.gather(*tasks, *([killer()] if kill_after is not None else []))
        finally:
            await browser.close()
    log["start"] = start
    return log


def warm(url: str, slices: list, folder: Path) -> None:
    """One diagnosis straight on a replica, so that it has loaded its model."""
    path = folder / "warm.png"
    path.write_bytes(png_upload(slices[0], 999_999_999))
    diagnose_once(url, path, timeout_ms=180_000)


def summarise(log: dict, stored: int, replica_of: dict[int, str], victim: str) -> dict:
    seconds = [s["seconds"] for s in log["shown"]]
    out = {"diagnoses_shown": len(seconds), "audit_records_stored": stored, "equal": stored == len(seconds),
           "errors": len(log["errors"]), "p50_s": percentile(seconds, 50), "p95_s": percentile(seconds, 95),
           "killed_after_s": round(log["killed_at"] - log["start"], 1) if log["killed_at"] else None,
           "error_kinds": sorted({e["error"] for e in log["errors"]}), "users": {}}
    for k in sorted(replica_of):
        mine = [s for s in log["shown"] if s["user"] == k]
        after = [s for s in mine if log["killed_at"] and s["at"] > log["killed_at"]]
        out["users"][k] = {"replica": replica_of[k], "on_killed_replica": replica_of[k] == victim, "shown": len(mine),
                           "shown_after_kill": len(after),
                           "errors": sum(e["user"] == k for e in log["errors"]),
                           "p50_s": percentile([s["seconds"] for s in mine], 50)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3, help="concurrent browser users (1-10)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (10-600)")
    parser.add_argument("--kill-after", type=float, default=None, help="seconds until a replica is killed "
                        "(default: half the duration; negative: never)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds one upload may take before it counts "
                        "as an error")
    parser.add_argument("--screenshots", metavar="DIR", help="save the page of the first 5 errors here")
    args = parser.parse_args(argv)
    if not (1 <= args.users <= 10 and 10 <= args.duration <= 600):
        parser.error("--users must be 1-10 and --duration 10-600 s")
    for missing in (postgres_missing(), None if chromium_path() else "Chromium is not installed"):
        if missing:
            print(f"load: skipped: {missing}")
            return 0
    kill_after = args.duration / 2 if args.kill_after is None else args.kill_after
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what was started, as on Ctrl-C
    slices, source = source_slices()
    with tempfile.TemporaryDirectory(prefix="ctapp-load-") as tmp, PostgresCluster() as pg:
        tmp = Path(tmp)
        env = {"CTAPP_DATABASE_URL": pg.url, "CTAPP_REPORTS_DIR": str(tmp / "reports")}
        with department(env, tmp) as dept:
            replicas = dept.replica_addresses
            for address in replicas:
                warm(f"http://{address}", slices, tmp)
            from ctapp.store import Store

            store = Store(url=pg.url)
            before = store.count()
            killing = f"replica {replicas[0]} is killed at {kill_after:.0f} s" if kill_after >= 0 else "no kill"
            print(f"load: {args.users} users for {args.duration:.0f} s through nginx on {dept.proxy_url}, "
                  f"2 replicas, PostgreSQL {pg.bin.parent.name}; {source}; {killing}", flush=True)
            log = asyncio.run(drive(dept.proxy_url, args.users, args.duration,
                                    kill_after if kill_after >= 0 else None, dept.replica_pid(0), slices, tmp,
                                    int(args.timeout * 1000), args.screenshots))
            time.sleep(2)  # a write still in flight on the survivor
            stored = store.count() - before
            store.close()
            access = (dept.run_dir / "nginx-access.log").read_text()
            replica_of = {}
            for k, route in log["routes"].items():
                hits = re.findall(rf"upstream=(\S+) route={re.escape(route)}\b", access) if route else []
                replica_of[k] = hits[0].split(",")[0] if hits else "?"
    summary = summarise(log, stored, replica_of, replicas[0])
    print(f"diagnoses shown {summary['diagnoses_shown']}, audit records stored {summary['audit_records_stored']} "
          f"({'equal' if summary['equal'] else 'NOT EQUAL'}), errors {summary['errors']} "
          f"{summary['error_kinds'] or ''}, upload-to-result p50 {summary['p50_s'] or 0:.2f} s, "
          f"p95 {summary['p95_s'] or 0:.2f} s; replica killed at {summary['killed_after_s']} s")
    for k, u in summary["users"].items():
        print(f"  user {k}: first replica {u['replica']}{' (killed)' if u['on_killed_replica'] else ''}: "
              f"{u['shown']} shown ({u['shown_after_kill']} after the kill), {u['errors']} errors, "
              f"p50 {u['p50_s'] or 0:.2f} s")
    print(json.dumps(summary))
    return 0 if summary["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
