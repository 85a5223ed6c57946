"""The dashboard behind an editor's webview or a proxy (code-server's /proxy/PORT/, a forwarded
port): the page's assets open with the asset key its HTML carries, a WebSocket from the page's own
(proxied) origin is accepted, and every foreign origin or host is still refused."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from onthefly.server import app as app_module
from onthefly.server.auth import AuthMiddleware, asset_key, cookie_name_for

TOKEN = "t" * 43
PORT = 18123


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The real app (no session: only the page and its assets are asked for) behind the real
    middleware, serving a built page that refers to its assets as Vite writes them."""
    (tmp_path / "assets").mkdir()
    (tmp_path / "index.html").write_text(
        '<!doctype html><title>On The Fly</title>\n'
        '<script type="module" crossorigin src="./assets/index-abc.js"></script>\n'
        '<link rel="stylesheet" crossorigin href="./assets/index-def.css">\n')
    (tmp_path / "assets" / "index-abc.js").write_text("console.log('dashboard')")
    (tmp_path / "assets" / "index-def.css").write_text("body {}")
    monkeypatch.setattr(app_module, "DASHBOARD_DIR", tmp_path)
    origins = {f"http://127.0.0.1:{PORT}"}
    app: Any = app_module.create_app(None, TOKEN, lambda: origins, cookie_name_for(PORT))  # type: ignore[arg-type]
    with TestClient(AuthMiddleware(app, TOKEN, lambda: origins, cookie_name_for(PORT), frozenset()),
                    base_url=f"http://127.0.0.1:{PORT}") as test_client:
        yield test_client


def test_the_page_carries_the_asset_key_in_its_asset_urls_and_the_key_opens_only_assets(client: TestClient) -> None:
    page = client.get("/", params={"token": TOKEN})
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    key = asset_key(TOKEN)
    assert key != TOKEN and TOKEN not in page.text
    urls = re.findall(r'(?:src|href)="(\./assets/[^"]+)"', page.text)
    assert urls == [f"./assets/index-abc.js?key={key}", f"./assets/index-def.css?key={key}"]
    client.cookies.clear()  # a cross-site frame: the browser sends no cookie
    assert client.get(f"/assets/index-abc.js?key={key}").text == "console.log('dashboard')"
    assert client.get(f"/assets/index-def.css?key={key}").status_code == 200
    for path in ("/", "/api/session", "/openapi.json", "/api/session/report"):
        assert client.get(path, params={"key": key}).status_code == 401, path
    assert client.post("/api/runs/1/commands", params={"key": key}, json={"kind": "pause"}).status_code == 401
    assert client.get("/assets/index-abc.js", params={"key": key[:-1] + "0"}).status_code == 401
    assert client.get("/assets/index-abc.js").status_code == 401


def _websocket_app() -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
    return app


def _connects(host: str, origin: str, allowed_hosts: frozenset[str] = frozenset()) -> bool:
    middleware = AuthMiddleware(_websocket_app(), TOKEN, lambda: {f"http://127.0.0.1:{PORT}"},
                                cookie_name_for(PORT), allowed_hosts)
    client = TestClient(middleware, base_url=f"http://{host}")
    try:
        with client.websocket_connect(f"/api/stream?token={TOKEN}", headers={"Host": host, "Origin": origin}):
            return True
    except WebSocketDisconnect:
        return False


@pytest.mark.parametrize(("host", "origin"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8080"),  # code-server's /proxy/PORT/ on this machine
    ("localhost:5555", "http://localhost:5555"),  # a forwarded port (remote SSH)
    (f"127.0.0.1:{PORT}", f"http://127.0.0.1:{PORT}"),  # the dashboard's own page
])
def test_a_websocket_from_the_page_behind_a_loopback_proxy_is_accepted(host: str, origin: str) -> None:
    assert _connects(host, origin)


@pytest.mark.parametrize(("host", "origin"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8081"),
    ("127.0.0.1:8080", "https://127.0.0.1:8080"),
    ("127.0.0.1:8080", "http://evil.example"),
    ("127.0.0.1:8080", "null"),
    ("localhost:5555", "http://localhost:5556"),
])
def test_a_websocket_from_another_origin_than_the_page_is_refused(host: str, origin: str) -> None:
    assert not _connects(host, origin)


def test_only_the_proxy_hosts_named_in_the_environment_pass_the_host_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONTHEFLY_ALLOWED_HOSTS", "code.example.org, other.example:8443")
    middleware = AuthMiddleware(_websocket_app(), TOKEN, set)
    assert middleware.allowed_hosts == {"code.example.org", "other.example"}
    assert _connects("code.example.org", "https://code.example.org", middleware.allowed_hosts)
    assert _connects("code.example.org:8080", "http://code.example.org:8080", middleware.allowed_hosts)
    assert not _connects("code.example.org", "https://evil.example", middleware.allowed_hosts)
    assert not _connects("evil.example", "http://evil.example", middleware.allowed_hosts)
    assert not _connects("code.example.org.evil.example", "http://code.example.org.evil.example",
                         middleware.allowed_hosts)
    # Without the variable, a proxy's name is a foreign host (DNS rebinding), token or not.
    assert not _connects("code.example.org", "https://code.example.org")
