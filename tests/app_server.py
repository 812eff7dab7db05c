"""``streamlit run app.py`` as a separate server process on loopback, the way
a replica runs, and headless Chromium sessions against it, for the deployment
and sign-in tests and ``benchmarks/load.py``."""
from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from pg_cluster import free_port

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RESULT_WORDS = ("Prediction:", "Uncertain:", "no result", "no reliable result")  # what a diagnosis shows


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with status {process.returncode}")
        if healthy(url):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no answer from {url}/_stcore/health within {timeout:.0f} s")


def start_replica(env: dict[str, str], log: Path, port: int | None = None, args: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """One app server on 127.0.0.1; returns the process and its URL (not yet waited for)."""
    port = port or free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", *args],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def replicas(count: int, env: dict[str, str], folder: Path, args: list[str] = ()):
    """``count`` app servers, started together; yields [(process, url), ...]."""
    with ExitStack() as stack:
        started = []
        for i in range(count):
            process, url = start_replica(env, folder / f"replica-{i}.log", args=args)
            stack.callback(stop, process)
            started.append((process, url))
        for process, url in started:
            wait_healthy(url, process)
        yield started


def websocket_status(port: int, host: str, origin: str | None = None) -> int:
    """The HTTP status of a WebSocket handshake on the app's stream with these headers."""
    lines = ["GET /_stcore/stream HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}", "Sec-WebSocket-Version: 13"]
    lines += [f"Origin: {origin}"] if origin else []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return int(s.recv(4096).split(b" ", 2)[1])


@contextmanager
def chromium():
    """Debian's headless Chromium under Playwright (the caller skips where ``chromium_path()`` is None)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def select_option(page, label: str, option: str) -> None:
    """Choose ``option`` in the Streamlit selectbox labelled ``label`` (when not already chosen)."""
    widget = page.locator("[data-testid='stSelectbox']").filter(has=page.get_by_text(label, exact=True)).first
    if widget.get_by_text(option, exact=True).count():
        return
    page.get_by_label(label, exact=True).first.click()
    page.get_by_role("option", name=option, exact=True).click()


def diagnose(page, upload: Path, task: str | None = None, timeout_ms: int = 120_000) -> None:
    """On the diagnosis page: choose ``task``, upload one slice and wait until its
    result (a verdict, an uncertain state or 'not a chest CT') is on screen."""
    page.get_by_role("heading", name="CT slice diagnosis").wait_for(timeout=timeout_ms)
    if task:
        select_option(page, "Task", task)
    page.locator("input[type='file']").first.set_input_files([str(upload)])
    result_shown(page).wait_for(timeout=timeout_ms)


def result_shown(page):
    """The locator of a diagnosis result on ``page`` (a Playwright page, sync or async)."""
    shown = page.get_by_text(RESULT_WORDS[0], exact=False)
    for words in RESULT_WORDS[1:]:
        shown = shown.or_(page.get_by_text(words, exact=False))
    return shown.first


def diagnose_once(url: str, upload: Path, task: str | None = None, timeout_ms: int = 120_000) -> None:
    """A new browser opens the app at ``url`` and diagnoses one slice (:func:`diagnose`)."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(url, wait_until="domcontentloaded")
        diagnose(page, upload, task, timeout_ms)


def secrets_toml(folder: Path, port: int, provider_port: int, admin: str) -> Path:
    """A secrets file: sign-in at the local mock OpenID Connect provider on ``provider_port`` for the
    app (or its proxy) on ``port``, with ``admin`` as the one admin."""
    path = folder / "secrets.toml"
    path.write_text(f"""
[auth]
redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
cookie_secret = "{secrets.token_hex(32)}"
client_id = "ctapp-test"
client_secret = "{secrets.token_hex(16)}"
server_metadata_url = "http://localhost:{provider_port}/.well-known/openid-configuration"

[roles]
admin_emails = ["{admin}"]
""")
    return path


def sign_in(page, url: str, who: str, timeout_ms: int = 120_000) -> None:
    """Sign in as ``who`` at the mock provider (its own form: any subject, e-mail = subject)."""
    page.goto(url, wait_until="networkidle")
    page.get_by_role("button", name="Sign in").click()
    page.locator("input[name='sub']").fill(who)
    page.get_by_role("button", name="Authorize").click()
    page.get_by_text(f"Signed in as {who}", exact=False).wait_for(timeout=timeout_ms)


def free_port_pair() -> int:
    """A port p with p and p + 1 both free on loopback (run-replicas.sh numbers replicas upwards)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@dataclass
class Department:
    """``deploy/run-replicas.sh`` running: nginx on ``proxy_port``, replicas from ``first_port`` up."""
    proxy_port: int
    first_port: int
    run_dir: Path
    count: int

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def replica_addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.first_port + i}" for i in range(self.count)]

    def replica_pid(self, index: int) -> int:
        return int((self.run_dir / f"replica-{index}.pid").read_text())


@contextmanager
def department(env: dict[str, str], folder: Path, count: int = 2, timeout: float = 300, proxy: int | None = None):
    """``count`` replicas behind nginx on loopback (on port ``proxy``), started by the deployment
    script itself and stopped with it (SIGTERM to the script; its process group is killed if it
    hangs). Sign-in is off unless ``env`` names a ``SECRETS_FILE`` with an ``[auth]`` section."""
    proxy, first = proxy or free_port(), free_port_pair()
    run_dir, out = folder / "run", folder / "run-replicas.out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SECRETS_FILE": os.devnull, **env,
           "PROXY_LISTEN": f"127.0.0.1:{proxy}", "FIRST_PORT": str(first), "RUN_DIR": str(run_dir)}
    with open(out, "wb") as sink:
        script = subprocess.Popen(["bash", "deploy/run-replicas.sh", str(count)], cwd=REPO, env=env, stdout=sink,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while "ready:" not in out.read_text():
            if script.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"run-replicas.sh did not get ready:\n{out.read_text()}")
            time.sleep(0.5)
        yield Department(proxy, first, run_dir, count)
    finally:
        script.send_signal(signal.SIGTERM)
        try:
            script.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            raise
