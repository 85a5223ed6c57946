"""Who may talk to the server: a loopback Host, the session's token, and for WebSockets the
dashboard's own Origin.

A pure ASGI middleware, so it guards every route the same way (pages, API, OpenAPI document,
WebSocket). The token is accepted as ``Authorization: Bearer`` or as ``?token=``; the cookie the
page sets for itself only where a browser cannot send a header: GET of the page, its assets and
a finished export's download (whose id is random). Every other API call needs the token itself,
so another page on a loopback port, which the browser would send the cookie from, can make the
server do nothing.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

__all__ = ["COOKIE", "AuthMiddleware", "cookie_name_for", "is_loopback_host", "new_token"]

COOKIE = "onthefly_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# GET only: the page, its assets, and the native downloads it starts (which cannot carry a header).
COOKIE_PATHS = re.compile(r"^(/|/assets/[^?]*|/api/exports/[0-9a-f]{32}/file|/api/session/archives/[0-9a-f]{32}/file"
                          r"|/api/session/report|/api/runs/[0-9]+/mixture)$")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_host(host: str | None) -> bool:
    """A Host header naming this machine's loopback (any port): guards against DNS rebinding."""
    return bool(host) and _hostname(host or "") in LOOPBACK_NAMES


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def cookie_name_for(port: int) -> str:
    """Per port: two dashboards on one machine must not overwrite each other's cookie."""
    return f"{COOKIE}_{port}"


def _presented_tokens(scope: Scope, headers: dict[str, str], cookie_name: str) -> list[str]:
    tokens: list[str] = []
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        tokens.append(auth[7:].strip())
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    tokens.extend(query.get("token", []))
    if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD") \
            or not COOKIE_PATHS.match(scope.get("path", "")):
        return tokens
    # Cookies are parsed by hand: another local app's odd cookie must not hide ours.
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == cookie_name:
            tokens.append(value.strip('"'))
    return tokens


class AuthMiddleware:
    def __init__(self, app: ASGIApp, token: str, allowed_origins: Callable[[], set[str]],
                 cookie_name: str = COOKIE) -> None:
        self.app = app
        self.token = token
        self.cookie_name = cookie_name
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if not is_loopback_host(headers.get("host")):
            await self._refuse(scope, receive, send, 403, "the Host header must name a loopback address "
                               "(localhost, 127.0.0.1 or [::1]); open the URL the server printed")
            return
        if not any(hmac.compare_digest(t.encode(), self.token.encode())
                   for t in _presented_tokens(scope, headers, self.cookie_name)):
            await self._refuse(scope, receive, send, 401, "missing or wrong token: open the URL the "
                               "server printed, or send 'Authorization: Bearer <token>' (the page's "
                               "cookie is only for the page, its assets and export downloads)")
            return
        if scope["type"] == "websocket":
            origin = headers.get("origin")
            # Browsers always send Origin on a WebSocket; it must be the dashboard's own page.
            # Tools without a browser (tests, the VS Code extension host) send none.
            if origin is not None and origin.rstrip("/") not in self.allowed_origins():
                await self._refuse(scope, receive, send, 403, f"WebSocket Origin {origin!r} is not this dashboard")
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        if scope["type"] == "websocket":
            await receive()  # the websocket.connect message
            # Refusing the handshake (HTTP 403 from the server); the client sees the connection fail.
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
            return
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

