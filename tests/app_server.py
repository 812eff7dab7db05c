"""``streamlit run app.py`` as a separate server process on loopback, the way
a replica runs, for the deployment tests and ``benchmarks/load.py``."""
from __future__ import annotations

import os
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
    shown = page.get_by_text("Prediction:", exact=False)
    for words in ("Uncertain:", "no result", "no reliable result"):
        shown = shown.or_(page.get_by_text(words, exact=False))
    shown.first.wait_for(timeout=timeout_ms)


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
def department(env: dict[str, str], folder: Path, count: int = 2, timeout: float = 300):
    """``count`` replicas behind nginx on loopback, started by the deployment script itself and
    stopped with it (SIGTERM to the script; its process group is killed if it hangs)."""
    proxy, first = free_port(), free_port_pair()
    run_dir, out = folder / "run", folder / "run-replicas.out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env, "PROXY_LISTEN": f"127.0.0.1:{proxy}",
           "FIRST_PORT": str(first), "RUN_DIR": str(run_dir)}
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
