"""Issue 11, safe defaults: the shipped Streamlit settings listen on this machine
only and refuse WebSocket connections with a foreign Host (DNS rebinding) or
Origin, and the audit log is readable by the app's user only. Issue 24: both
make targets install the locked, hashed set, and this environment is that set."""
from __future__ import annotations

import re
import shutil
import stat
import subprocess
from contextlib import contextmanager
from importlib import metadata

import pytest
from app_fixtures import REPO
from app_server import start_replica, stop, wait_healthy, websocket_status
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ctapp.store import Store

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def settings() -> dict:
    return tomllib.loads((REPO / ".streamlit" / "config.toml").read_text(encoding="utf-8"))["server"]


def test_shipped_settings_bind_to_this_machine():
    server = settings()
    assert server["address"] == "localhost"
    assert server["allowedHosts"] and "*" not in server["allowedHosts"]
    assert server["enableXsrfProtection"] is True and server["enableCORS"] is True
    assert "*" not in server.get("corsAllowedOrigins", [])


@contextmanager
def shipped_server(tmp_path):
    """``streamlit run app.py`` in the repository with its own Host, Origin and XSRF settings."""
    process, url = start_replica({}, tmp_path / "server.log")
    try:
        wait_healthy(url, process, timeout=90)
        yield int(url.rsplit(":", 1)[1])
    finally:
        stop(process)


@pytest.mark.slow
def test_websocket_refuses_foreign_hosts_and_origins(tmp_path):
    with shipped_server(tmp_path) as port:
        assert websocket_status(port, f"localhost:{port}") == 101  # control: the app's own name is accepted
        assert websocket_status(port, f"127.0.0.1:{port}", origin=f"http://127.0.0.1:{port}") == 101
        assert websocket_status(port, f"evil.example:{port}") == 403  # DNS rebinding
        assert websocket_status(port, f"localhost:{port}", origin="https://evil.example") == 403


def test_audit_log_is_private(tmp_path):
    log = Store(tmp_path / "audit" / "audit.sqlite")
    log.record(model="m", model_version="1", image_sha256="0" * 64, prediction="a", probabilities={"a": 1.0})
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700
    for name in ("audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm"):
        assert stat.S_IMODE((tmp_path / "audit" / name).stat().st_mode) == 0o600, name
    log.close()


def test_an_existing_readable_audit_log_is_tightened(tmp_path):
    path = tmp_path / "audit.sqlite"
    Store(path).close()
    path.chmod(0o644)
    Store(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# ------------------------------------------------------------------ the lock is what installs (issue 24, item 9)

def lock_pins() -> dict[str, tuple[str, str]]:
    """requirements.lock as {normalised name: (version, environment marker)}."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)\s*(?:;\s*([^\\]*?))?\s*\\?$", line)
        if match:
            pins[canonicalize_name(match[1])] = (match[2], (match[3] or "").strip())
    return pins


def make_dry_run(target: str, tmp_path) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "fresh-venv"  # not there: make lists every step of a first install
    return subprocess.run([make, "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def test_both_make_targets_install_the_locked_hashed_set(tmp_path):
    for target in ("app", "test"):
        steps = make_dry_run(target, tmp_path).splitlines()
        installs = [s for s in steps if " -m pip install " in s]
        assert any("--require-hashes -r requirements.lock" in s for s in installs), installs
        assert not any("-r requirements.txt" in s for s in installs), installs  # the ranges are for library users
    dev = [s for s in make_dry_run("test", tmp_path).splitlines() if "-r requirements-dev.txt" in s]
    assert len(dev) == 1 and "-c " in dev[0] and "lock-constraints.txt" in dev[0]  # dev tools keep the lock's pins


def test_the_lock_pins_every_requirement_within_its_range_with_hashes():
    pins, lock = lock_pins(), (REPO / "requirements.lock").read_text()
    assert "uv pip compile requirements.txt --universal" in lock.splitlines()[1]  # how to regenerate it
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            version, _ = pins[canonicalize_name(requirement.name)]
            assert requirement.specifier.contains(version, prereleases=True), (line, version)
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock.split("\n", 2)[2])
    assert len(blocks) == len(pins) and all("--hash=sha256:" in block for block in blocks)


def test_this_environment_is_the_locked_set():
    """What `make` installed here is what the lock pins (a range install had drifted: cryptography
    51.0.1 against 50.0.2 in the lock)."""
    drift = {}
    for name, (version, marker) in lock_pins().items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or Version(installed.split("+")[0]) != Version(version):
            drift[name] = (installed, version)
    assert drift == {}, drift
