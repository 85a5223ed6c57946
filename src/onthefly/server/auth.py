"""Who may talk to the server: a loopback Host, the session's token, and for WebSockets the
dashboard's own Origin.

A pure ASGI middleware, so it guards every route the same way (pages, API, OpenAPI document,
WebSocket). The token is accepted as ``Authorization: Bearer`` or as ``?token=``; the cookie the
page sets for itself only where a browser cannot send a header: GET of the page, its assets and
a finished export's download (whose id is random). Every other API call needs the token itself,
so another page on a loopback port, which the browser would send the cookie from, can make the
server do nothing.

The page's assets also open with an *asset key* (``?key=``, derived from the token, opening
nothing but ``/assets/``), which the page's HTML carries in its asset URLs: inside an editor's
webview the page is a cross-site frame, where browsers do not send a ``SameSite=strict`` cookie.
A leaked asset URL gives away the public bundle only.

Behind a proxy (code-server's ``/proxy/PORT/``, a forwarded port), the page's origin is the
proxy's: a WebSocket is accepted when its Origin is the very host the request was sent to
(``http://`` + Host), as well as the dashboard's own. A proxy on another machine sends its own
name as Host: the names in ``ONTHEFLY_ALLOWED_HOSTS`` (comma-separated, set by the tool that puts
the dashboard behind it, e.g. the VS Code extension under code-server) pass the Host check too,
over http or https. Every other name is still refused (DNS rebinding), and the token is always
needed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

__all__ = ["ALLOWED_HOSTS_ENV", "COOKIE", "AuthMiddleware", "allowed_hosts_from_env", "asset_key",
           "cookie_name_for", "is_loopback_host", "new_token"]

COOKIE = "onthefly_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
ALLOWED_HOSTS_ENV = "ONTHEFLY_ALLOWED_HOSTS"
ASSET_PATHS = re.compile(r"^/assets/[^?]*$")
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


def allowed_hosts_from_env() -> frozenset[str]:
    """The proxy host names ``ONTHEFLY_ALLOWED_HOSTS`` names (lower case, without ports)."""
    names = (_hostname(part) for part in os.environ.get(ALLOWED_HOSTS_ENV, "").split(","))
    return frozenset(name for name in names if name)


def asset_key(token: str) -> str:
    """The key that opens the page's assets, and nothing else (128 bits, derived from the token)."""
    return hmac.new(token.encode(), b"onthefly-assets", hashlib.sha256).hexdigest()[:32]


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
    if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD") \
            and ASSET_PATHS.match(scope.get("path", "")):
        tokens.extend(query.get("key", []))  # checked against the asset key, not the token
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
                 cookie_name: str = COOKIE, allowed_hosts: frozenset[str] | None = None) -> None:
        self.app = app
        self.token = token
        self.asset_key = asset_key(token)
        self.cookie_name = cookie_name
        self.allowed_origins = allowed_origins
        self.allowed_hosts = allowed_hosts_from_env() if allowed_hosts is None else allowed_hosts

    def _host_allowed(self, host: str | None) -> bool:
        return is_loopback_host(host) or (bool(host) and _hostname(host or "") in self.allowed_hosts)

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        """The dashboard's own origin, or the host the request was sent to (a proxy's page)."""
        origin = origin.rstrip("/").lower()
        if origin in self.allowed_origins():
            return True
        host = (host or "").strip().lower()
        if not host:
            return False
        if origin == f"http://{host}":
            return True
        # A named proxy (on another machine) may serve the page over TLS it terminates itself.
        return _hostname(host) in self.allowed_hosts and origin == f"https://{host}"

    def _authorised(self, scope: Scope, headers: dict[str, str]) -> bool:
        presented = _presented_tokens(scope, headers, self.cookie_name)
        if any(hmac.compare_digest(t.encode(), self.token.encode()) for t in presented):
            return True
        if scope["type"] == "http" and ASSET_PATHS.match(scope.get("path", "")):
            return any(hmac.compare_digest(t.encode(), self.asset_key.encode()) for t in presented)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if not self._host_allowed(headers.get("host")):
            await self._refuse(scope, receive, send, 403, "the Host header must name a loopback address "
                               "(localhost, 127.0.0.1 or [::1]); open the URL the server printed")
            return
        if not self._authorised(scope, headers):
            await self._refuse(scope, receive, send, 401, "missing or wrong token: open the URL the "
                               "server printed, or send 'Authorization: Bearer <token>' (the page's "
                               "cookie is only for the page, its assets and export downloads)")
            return
        if scope["type"] == "websocket":
            origin = headers.get("origin")
            # Browsers always send Origin on a WebSocket; it must be the dashboard's own page.
            # Tools without a browser (tests, the VS Code extension host) send none.
            if origin is not None and not self._origin_allowed(origin, headers.get("host")):
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

