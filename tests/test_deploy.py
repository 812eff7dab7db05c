"""``deploy/run-replicas.sh``: two replicas behind Debian's nginx on loopback.
The proxy answers health checks, hands out a route cookie and keeps each
cookie on one replica (and spreads cookies over both), upgrades WebSockets
(still refusing foreign origins), moves a dead replica's users to the other
one, and everything stops with the script; with Chromium, a browser session
through the proxy diagnoses a slice. Skipped, with the reason, without
nginx (apt-get install nginx-light)."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
from app_fixtures import REPO, TASK, app_env, png_bytes  # noqa: F401
from app_server import CHROMIUM_ARGS, chromium_path, department, diagnose

from ctapp.store import Store

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")]


def get(url: str, cookie: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers)


def websocket_status(port: int, origin: str) -> int:
    lines = ["GET /_stcore/stream HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}", "Sec-WebSocket-Version: 13",
             f"Origin: {origin}"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return int(s.recv(4096).split(b" ", 2)[1])


def test_replicas_behind_nginx_are_sticky_upgrade_websockets_and_fail_over(app_env, tmp_path):
    with department(app_env.env, tmp_path) as dept:
        base, proxy, first, run_dir = dept.proxy_url, dept.proxy_port, dept.first_port, dept.run_dir
        status, headers = get(base + "/")
        assert status == 200 and re.match(r"ctapp_route=\w{32}; Path=/; HttpOnly; SameSite=Lax", headers["Set-Cookie"])
        status, headers = get(base + "/", cookie="ctapp_route=abc")
        assert "Set-Cookie" not in headers  # a browser that has a route keeps it

        routes = [f"route{i:02d}" for i in range(20)]
        for route in routes:
            for _ in range(3):
                assert get(base + "/_stcore/health", cookie=f"ctapp_route={route}")[0] == 200
        pairs = re.findall(r"upstream=(\S+) route=(route\d\d)", (run_dir / "nginx-access.log").read_text())
        by_route: dict[str, set[str]] = {}
        for upstream, route in pairs:
            by_route.setdefault(route, set()).add(upstream)
        assert sorted(by_route) == routes and all(len(u) == 1 for u in by_route.values())  # sticky
        assert {u for us in by_route.values() for u in us} == {f"127.0.0.1:{first}", f"127.0.0.1:{first + 1}"}

        assert websocket_status(proxy, f"http://127.0.0.1:{proxy}") == 101
        assert websocket_status(proxy, "https://evil.example") == 403
        if chromium_path():  # a whole session through the proxy: page, WebSocket, upload (HTTP), result
            from playwright.sync_api import sync_playwright

            upload = tmp_path / "through-the-proxy.png"
            upload.write_bytes(png_bytes(label=1, seed=123))
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1200})
                    page.goto(base, wait_until="networkidle")
                    diagnose(page, upload, TASK)
                finally:
                    browser.close()
            sha = hashlib.sha256(upload.read_bytes()).hexdigest()
            store = Store(app_env.audit_log)
            try:
                assert [r["image_sha256"] for r in store.diagnoses() if r["image_sha256"] == sha] == [sha]
            finally:
                store.close()

        victim = dept.replica_pid(0)
        os.kill(victim, signal.SIGKILL)
        moved = [r for r, u in by_route.items() if u == {f"127.0.0.1:{first}"}]
        for route in moved:
            assert get(base + "/_stcore/health", cookie=f"ctapp_route={route}")[0] == 200  # served by the survivor
