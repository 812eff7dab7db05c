"""``deploy/run-replicas.sh``: two replicas behind Debian's nginx on loopback.
The proxy answers health checks, hands out a route cookie and keeps each
cookie on one replica (and spreads cookies over both), upgrades WebSockets
(still refusing foreign origins and Host names), moves a dead replica's users
to the other one, and everything stops with the script; with Chromium, a
browser session through the proxy diagnoses a slice. With sign-in on, the
proxy serves the images of /media/ only to a signed-in browser. Skipped, with
the reason, without nginx (apt-get install nginx-light)."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from app_fixtures import REPO, TASK, app_env, png_bytes  # noqa: F401
from app_server import (
    chromium,
    chromium_path,
    department,
    diagnose,
    diagnose_once,
    secrets_toml,
    sign_in,
    websocket_status,
)
from pg_cluster import free_port

from ctapp.store import Store

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")]


def status(url: str, cookie: str | None = None, host: str | None = None) -> int:
    headers = {**({"Cookie": cookie} if cookie else {}), **({"Host": host} if host else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


def get(url: str, cookie: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers)


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

        host = f"127.0.0.1:{proxy}"
        assert websocket_status(proxy, host, origin=f"http://{host}") == 101
        assert websocket_status(proxy, host, origin="https://evil.example") == 403
        assert websocket_status(proxy, f"evil.example:{proxy}", origin=f"http://{host}") == 421  # the proxy's Host check
        if chromium_path():  # a whole session through the proxy: page, WebSocket, upload (HTTP), result
            upload = tmp_path / "through-the-proxy.png"
            upload.write_bytes(png_bytes(label=1, seed=123))
            diagnose_once(base, upload, TASK)
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


def test_with_sign_in_the_proxy_serves_media_only_to_signed_in_browsers(app_env, tmp_path):
    """Streamlit serves /media/<hash> (uploaded slices, overlays) to any request; behind the
    deployment's proxy, with sign-in on, only a browser holding the sign-in cookie and naming
    this deployment's host gets them (issue 24, item 8)."""
    oidc_provider_mock = pytest.importorskip("oidc_provider_mock", reason="oidc-provider-mock is not installed")
    if chromium_path() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    proxy = free_port()
    upload = tmp_path / "signed-in.png"
    upload.write_bytes(png_bytes(label=0, seed=7))
    with oidc_provider_mock.run_server_in_thread() as provider:
        secrets_file = secrets_toml(tmp_path, proxy, provider.server_port, admin="head.radiologist@example.org")
        with department({**app_env.env, "SECRETS_FILE": str(secrets_file)}, tmp_path, count=1, proxy=proxy) as dept:
            base = dept.proxy_url
            assert "sign-in on" in (tmp_path / "run-replicas.out").read_text()
            with chromium() as browser:
                page = browser.new_page(viewport={"width": 1400, "height": 1200})
                shown = []
                page.on("response", lambda r: shown.append(r.url) if r.url.startswith(base + "/media/")
                        and r.status == 200 else None)
                sign_in(page, base, "dr.b@example.org")
                diagnose(page, upload, TASK)
                page.locator("[data-testid='stImage'] img").first.wait_for()
                page.wait_for_timeout(1000)
                cookies = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
                assert shown and "_streamlit_user=" in cookies  # the signed-in browser got its images
                for url in shown:
                    assert status(url, cookie=cookies) == 200
                    assert status(url) == 403  # no session cookie
                    assert status(url, cookie="ctapp_route=" + cookies.split("ctapp_route=")[1].split(";")[0]) == 403
                    assert status(url, cookie=cookies, host="evil.example") == 421  # a foreign Host
